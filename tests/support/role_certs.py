"""Test certificates with one role each, like `tokenbridge pki` issues them.

trustme's `issue_cert` always puts clientAuth, serverAuth and codeSigning in the extended key
usage; the bridge refuses such a certificate in either role (docs/guardrails.md, issue 13
item 11). `issue_cert(ca, ..., role=...)` signs a leaf with the trustme CA's key instead and
returns a `trustme.LeafCert`, so callers keep trustme's API.
"""

from __future__ import annotations

import datetime
from typing import Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CertRole = Literal["client", "server", "both", "none"]
_USAGES: dict[str, list[x509.ObjectIdentifier]] = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "both": [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
}


def issue_cert(
    ca: trustme.CA,
    *identities: str,
    role: CertRole,
    common_name: str | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> trustme.LeafCert:
    """A leaf for `identities` (SAN DNS names) with the extended key usage of `role`."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if identities:
        builder = builder.add_extension(
            # RFC 5280 §4.2.1.6: critical when the subject is empty (VERIFY_X509_STRICT checks)
            x509.SubjectAlternativeName([x509.DNSName(i) for i in identities]),
            critical=not common_name,
        )
    if role != "none":
        builder = builder.add_extension(x509.ExtendedKeyUsage(_USAGES[role]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return trustme.LeafCert(key_pem, cert.public_bytes(serialization.Encoding.PEM), [ca.cert_pem.bytes()])
