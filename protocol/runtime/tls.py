"""Mutual TLS 1.3 contexts, peer identities and operator-readable handshake failures.

Both daemons build their `ssl.SSLContext` here so the two ends cannot drift apart. The rules
(reliability-anchors §3.1):

- TLS 1.3 only, on both ends; the private CA is the only trust anchor (no system store).
- The server sets `CERT_REQUIRED` explicitly: for `PROTOCOL_TLS_SERVER` the default is
  `CERT_NONE`, which does not even ask for a client certificate (bpo-31346).
- No session tickets: a resumed TLS 1.3 handshake reuses the original authentication
  (RFC 8446 §2.2), so a revoked client could come back in without a CRL check.
- A CRL, when configured, is checked for the leaf. A missing, unparsable or stale CRL is a
  setup error: OpenSSL would reject *every* client with it anyway, and an operator should
  hear why at startup rather than from a flood of handshake failures (fail closed, loudly).
- `VERIFY_X509_STRICT` is on whatever the Python version (3.13 turns it on by default), so a
  certificate that works here keeps working after an upgrade.
- `OP_IGNORE_UNEXPECTED_EOF` is off whatever the build's default, so a connection cut without
  close_notify is reported as lost, the same on every Python a user may run.
- Each end checks that the other's certificate is made for its role (`check_peer_purpose`,
  after the handshake): a client's carries the clientAuth extended key usage, the server's
  serverAuth, and neither carries both. OpenSSL only refuses an EKU that lacks the purpose; it
  takes a certificate with no EKU, or with both, in either role, and such a certificate could
  then pass for the other end (RFC 5280 §4.2.1.12: no EKU means "any purpose").
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import TlsSetupError
from protocol.runtime.config import CREDSTORE_DIRS

__all__ = [
    "EXPIRED",
    "HOSTNAME_MISMATCH",
    "NOT_OUR_CA",
    "NO_CLIENT_CERT",
    "PROTOCOL_VERSION",
    "REVOKED",
    "PeerIdentity",
    "check_peer_purpose",
    "client_context",
    "crl_problem",
    "describe_handshake_error",
    "peer_identity",
    "peer_identity_from_der",
    "purpose_problem",
    "server_context",
    "validity_problem",
]


# --- contexts ---------------------------------------------------------------------------------


def server_context(*, ca: Path, cert: Path, key: Path, crl: Path | None = None) -> ssl.SSLContext:
    """The server's context: TLS 1.3 only, client certificate required, no tickets, optional CRL."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 8446 §2.2: resumption skips client authentication, and so the CRL check.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    _load_ca(ctx, ca)
    _load_own_cert(ctx, cert, key)
    if crl is not None:
        problem = crl_problem(crl, datetime.now(UTC), ca=ca)
        if problem is not None:
            raise TlsSetupError(f"{problem}; refusing to start without a usable crl (fail closed)")
        try:
            # cadata= does not accept CRLs (cpython #149679): it has to be a file.
            ctx.load_verify_locations(cafile=str(crl))
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"crl {crl}: openssl could not load it: {exc}") from exc
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_context(*, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The client's context: TLS 1.3 only, server hostname checked against the private CA only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca)
    _load_own_cert(ctx, cert, key)
    return ctx


def _tls13_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    # A TCP close without close_notify is a cut connection, never a clean end (RFC 8446 §6.1).
    # Some builds set this option by default (Debian 12's Python 3.11.2 does; 3.11.7 built
    # from source does not): with it, truncation and a refused certificate both read as EOF.
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF


def read_pem(path: Path, what: str) -> bytes:
    """The file's bytes; a missing permission is said as such, not as a malformed file."""
    try:
        return path.read_bytes()
    except PermissionError as exc:
        raise TlsSetupError(
            f"cannot read {what} file {path}: permission denied (the service user must be able to read it)"
        ) from exc


def _missing_file(what: str, path: Path) -> str:
    """Not found: for a systemd credential (`credential:NAME`), say where systemd takes it from."""
    in_service = os.environ.get("CREDENTIALS_DIRECTORY")
    if path.parent in CREDSTORE_DIRS or (in_service and path.parent == Path(in_service)):
        source = CREDSTORE_DIRS[0] / path.name
        return (
            f"{what} credential {path.name} not found ({path}): install it as {source} "
            f"(`install -D -m 0600 FILE {source}`) and keep the unit's "
            f"LoadCredential={path.name}:{source} line"
        )
    return f"{what} file {path} not found; create it or fix tls.{what[:4]} in the config"


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    if not ca.is_file():
        raise TlsSetupError(f"ca file {ca} not found; point tls.ca at the bridge's private ca certificate")
    data = read_pem(ca, "ca")
    try:
        x509.load_pem_x509_certificates(data)
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"ca file {ca} is not a pem certificate ({exc}); use the ca's .pem file") from exc
    try:
        # Only this file: never load_default_certs(), the CA must issue only bridge certificates.
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"ca file {ca}: openssl could not load it: {exc}") from exc


def _load_own_cert(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Parse both files first so the error names the file at fault, then hand them to OpenSSL."""
    for what, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise TlsSetupError(_missing_file(what, path))
    cert_data, key_data = read_pem(cert, "certificate"), read_pem(key, "key")
    try:
        x509.load_pem_x509_certificates(cert_data)
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"certificate file {cert} is not a pem certificate ({exc})") from exc
    try:
        serialization.load_pem_private_key(key_data, password=None)
    except TypeError as exc:
        raise TlsSetupError(
            f"key file {key} is encrypted; the daemon needs an unencrypted key readable only by its user"
        ) from exc
    except (OSError, ValueError) as exc:
        raise TlsSetupError(f"key file {key} is not a pem private key ({exc})") from exc
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(
            f"certificate {cert} and key {key} could not be loaded together ({exc}); "
            "check that the key belongs to the certificate"
        ) from exc


def validity_problem(cert_path: Path, now: datetime) -> str | None:
    """Why the certificate at `cert_path` is not valid at `now` (expired, not yet valid), or None.

    For `check-config`: OpenSSL would refuse it at every handshake, the peer with "certificate
    expired", which reads like the other end's fault.
    """
    try:
        cert = x509.load_pem_x509_certificate(read_pem(cert_path, "certificate"))
    except (OSError, ValueError) as exc:
        return f"certificate {cert_path} could not be read: {exc}"
    if cert.not_valid_after_utc < now:
        days = (now - cert.not_valid_after_utc).days
        return (
            f"certificate {cert_path} expired on {cert.not_valid_after_utc.isoformat()} ({days} day(s) ago); "
            "issue a new one (`tokenbridge pki renew NAME` on the CA host)"
        )
    if cert.not_valid_before_utc > now:
        return (
            f"certificate {cert_path} is not valid before {cert.not_valid_before_utc.isoformat()}; "
            "check this machine's clock (timedatectl)"
        )
    return None


# --- CRL --------------------------------------------------------------------------------------


def crl_problem(crl_path: Path, now: datetime, *, ca: Path | None = None) -> str | None:
    """Why this CRL would make OpenSSL reject every client, or None when it is usable.

    The server calls this at startup and periodically, to warn before `next_update` passes.
    With `ca`, the CRL's signature is checked too: a CRL from another CA matches no client.
    """
    try:
        raw = crl_path.read_bytes()
    except FileNotFoundError:
        return f"crl {crl_path} not found"
    except OSError as exc:
        return f"crl {crl_path} could not be read: {exc.strerror or exc}"
    try:
        crl = x509.load_pem_x509_crl(raw)
    except ValueError as exc:
        return f"crl {crl_path} is not a pem crl: {exc}"
    last_update = crl.last_update_utc
    next_update = crl.next_update_utc
    if last_update > now:
        return f"crl {crl_path} is not yet valid: last update {last_update.isoformat()} is in the future"
    if next_update is not None and next_update < now:
        return f"crl {crl_path} is stale: next update was due {next_update.isoformat()}; publish a fresh crl"
    if ca is not None:
        return _crl_signature_problem(crl, crl_path, ca)
    return None


def _crl_signature_problem(crl: x509.CertificateRevocationList, crl_path: Path, ca: Path) -> str | None:
    try:
        ca_certs = x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError) as exc:
        return f"ca file {ca} could not be read to check the crl: {exc}"
    for ca_cert in ca_certs:
        try:
            if crl.issuer == ca_cert.subject and crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
                return None
        except TypeError:  # a key type that cannot sign CRLs
            continue
    return f"crl {crl_path} is not signed by the ca in {ca}"


# --- peer identity ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end, as the certificate says. Log `fingerprint_sha256` and `names`."""

    name: str  # CN if present, else the first SAN DNS name
    names: tuple[str, ...]  # CN, then every SAN DNS name and URI (for allow-lists)
    fingerprint_sha256: str  # lowercase hex of SHA-256 over the whole DER certificate
    not_after: datetime  # aware, UTC


class _HasPeerCert(Protocol):
    @property
    def server_side(self) -> bool: ...
    def getpeercert(self, binary_form: bool = ...) -> object: ...


def peer_identity(ssl_object: _HasPeerCert) -> PeerIdentity:
    """The identity of a handshaken peer (`ssl.SSLObject` or a `trio.SSLStream`).

    Raises:
        TlsSetupError: no certificate, or one not made for the peer's role (`check_peer_purpose`).
    """
    return peer_identity_from_der(check_peer_purpose(ssl_object))


_ROLES: Final = {
    # our side -> (the peer's role, the EKU it needs, the other role's EKU, how to reissue it)
    True: ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH, "issue-client"),
    False: ("server", ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, "issue-server"),
}
_EKU_NAMES: Final = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
}


def check_peer_purpose(ssl_object: _HasPeerCert) -> bytes:
    """The peer's DER certificate, after checking it is made for the peer's role only.

    Raises:
        TlsSetupError: naming the certificate, what its extended key usage lacks or has too
            much of, and how to reissue it.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise TlsSetupError("peer presented no certificate; is the context built with CERT_REQUIRED?")
    role, needed, other, command = _ROLES[bool(ssl_object.server_side)]
    problem = purpose_problem(x509.load_der_x509_certificate(der), needed=needed, other=other)
    if problem is not None:
        name = peer_identity_from_der(der).name
        raise TlsSetupError(
            f"{role} certificate {name!r} {problem}: a bridge {role} certificate must carry "
            f"{_EKU_NAMES[needed]} only; reissue it with `tokenbridge pki {command}`"
        )
    return der


def purpose_problem(
    cert: x509.Certificate, *, needed: x509.ObjectIdentifier, other: x509.ObjectIdentifier
) -> str | None:
    """What is wrong with `cert`'s extended key usage for the role that needs `needed`, or None."""
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return "has no extended key usage"
    if needed not in usages:
        return f"lacks {_EKU_NAMES[needed]} in its extended key usage"
    if other in usages:
        return "carries both clientAuth and serverAuth"
    return None


def peer_identity_from_der(der: bytes) -> PeerIdentity:
    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
        names.append(value)
    has_cn = bool(names)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    dns_names = san.get_values_for_type(x509.DNSName) if san is not None else []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    names.extend(dns_names)
    names.extend(uris)
    if has_cn:
        name = names[0]
    elif dns_names:
        name = dns_names[0]
    elif uris:
        name = uris[0]
    else:
        name = ""
    return PeerIdentity(
        name=name,
        names=tuple(dict.fromkeys(names)),  # de-duplicated, order kept
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        not_after=cert.not_valid_after_utc,
    )


# --- handshake failures -----------------------------------------------------------------------

NOT_OUR_CA = "certificate unknown / not signed by our CA"
EXPIRED = "certificate expired"
REVOKED = "certificate revoked"
NO_CLIENT_CERT = "no client certificate"
PROTOCOL_VERSION = "protocol version (peer does not speak TLS 1.3)"
HOSTNAME_MISMATCH = "hostname mismatch"

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) seen when *we* verify the peer.
_VERIFY_CODES: dict[int, str] = {
    2: NOT_OUR_CA,  # UNABLE_TO_GET_ISSUER_CERT
    3: "no crl for the peer's ca (check the crl file)",  # UNABLE_TO_GET_CRL
    7: NOT_OUR_CA,  # CERT_SIGNATURE_FAILURE
    9: "certificate not yet valid (check clocks)",  # CERT_NOT_YET_VALID
    10: EXPIRED,  # CERT_HAS_EXPIRED
    11: "crl not yet valid (check clocks)",  # CRL_NOT_YET_VALID
    12: "crl expired (publish a fresh crl)",  # CRL_HAS_EXPIRED
    18: NOT_OUR_CA,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: NOT_OUR_CA,  # SELF_SIGNED_CERT_IN_CHAIN
    20: NOT_OUR_CA,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: NOT_OUR_CA,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: REVOKED,  # CERT_REVOKED
    26: "certificate not valid for this purpose (extended key usage)",  # INVALID_PURPOSE
    62: HOSTNAME_MISMATCH,  # HOSTNAME_MISMATCH
    64: HOSTNAME_MISMATCH,  # IP_ADDRESS_MISMATCH
}

# OpenSSL reason codes (ssl_err.h names, as Python puts them in SSLError.reason).
_REASONS: dict[str, str] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CLIENT_CERT,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": NO_CLIENT_CERT,
    "UNSUPPORTED_PROTOCOL": PROTOCOL_VERSION,
    "NO_PROTOCOLS_AVAILABLE": PROTOCOL_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": PROTOCOL_VERSION,
    "WRONG_SSL_VERSION": PROTOCOL_VERSION,
    "TLSV1_ALERT_UNKNOWN_CA": NOT_OUR_CA,
    "SSLV3_ALERT_BAD_CERTIFICATE": NOT_OUR_CA,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": NOT_OUR_CA,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": EXPIRED,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": REVOKED,
    "WRONG_VERSION_NUMBER": "not tls (is the peer speaking plain tcp?)",
    "HTTP_REQUEST": "not tls (the peer sent http)",
}


def describe_handshake_error(exc: BaseException) -> str:
    """A short reason an operator can act on, for log lines and refusal reasons.

    Accepts the `ssl.SSLError` itself or anything chaining to one (trio raises
    `BrokenResourceError` from the `SSLError`). Alerts *received* from the peer mean the peer
    refused us, and say so.
    """
    err = _find_ssl_error(exc)
    if err is None:
        return "connection closed during the tls handshake"
    if isinstance(err, ssl.SSLCertVerificationError):
        code = err.verify_code
        known = _VERIFY_CODES.get(code)
        return known if known is not None else f"certificate verify failed: {err.verify_message}"
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "connection closed during the tls handshake"
    reason = err.reason or ""
    known = _REASONS.get(reason)
    if known is None:
        return f"tls handshake failed: {reason.lower() or err}"
    if "ALERT" in reason and known != PROTOCOL_VERSION:
        return f"peer refused our certificate: {known}"
    return known


def _find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
