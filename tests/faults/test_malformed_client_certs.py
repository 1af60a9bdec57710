"""B8: client certificates no well-behaved TLS library would send, through `openssl s_client`.

reliability-anchors §7.2 B8 lists a huge serial and a wrong signature algorithm beside the
deep chains and 10,000 SANs of bridge_server/test_cert_matrix.py. Python's ssl module and
cryptography refuse to build or load such certificates, so they are made here by editing DER
and re-signing with the CA's key, and presented by OpenSSL's own client (`openssl s_client
-cert`), which sends whatever parses. Each must be refused in the handshake with a reason an
operator can act on (the server's `tls_refusals`), within the handshake timeout, and the
server must serve a valid client right afterwards.

- a 1,000-byte serial number (RFC 5280 §4.1.2.2 allows 20 octets), signed by our CA;
- a subjectAltName whose DER does not decode (its length lies), signed by our CA;
- an outer signatureAlgorithm that contradicts the one inside the signed part (RFC 5280
  §4.1.1.2 requires them to be equal).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID
from test_cert_matrix import HANDSHAKE_TIMEOUT_S, Key, _root, make_cert, make_pki, make_server, welcomed

from bridge_admin.pki import Pki
from bridge_server.net.listener import check_leaf
from protocol.errors import TlsSetupError
from protocol.runtime.tls import NOT_OUR_CA

ECDSA_WITH_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")  # AlgorithmIdentifier, RFC 5758 §3.2


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def children(der: bytes) -> list[bytes]:
    """The encoded elements inside one constructed DER element."""
    _, start, length = _header(der, 0)
    out, off = [], start
    while off < start + length:
        _, body, size = _header(der, off)
        out.append(der[off : body + size])
        off = body + size
    return out


def _header(der: bytes, off: int) -> tuple[int, int, int]:
    first = der[off + 1]
    if first < 0x80:
        return der[off], off + 2, first
    count = first & 0x7F
    return der[off], off + 2 + count, int.from_bytes(der[off + 2 : off + 2 + count], "big")


def signed(tbs: bytes, issuer_key: Key, algorithm: bytes | None = None) -> bytes:
    """A Certificate (RFC 5280 §4.1) around `tbs`, signed ECDSA-SHA256 by `issuer_key`."""
    signature = issuer_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    inner_algorithm = children(tbs)[2]
    return tlv(0x30, tbs + (algorithm or inner_algorithm) + tlv(0x03, b"\x00" + signature))


def _pem(der: bytes) -> bytes:
    import base64

    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def _write(out: Path, der: bytes, key: Key) -> tuple[Path, Path]:
    cert_path, key_path = out / "evil.pem", out / "evil.key"
    cert_path.write_bytes(_pem(der))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def huge_serial(pki: Pki, out: Path) -> tuple[Path, Path]:
    cert, key = make_cert("evil", _root(pki))
    parts = children(cert.tbs_certificate_bytes)
    parts[1] = tlv(
        0x02, b"\x01" + bytes(range(256)) * 4 + b"\x2a" * 23
    )  # 1,048 octets, positive, no sign octet needed
    _, ca_key = _root(pki)
    return _write(out, signed(tlv(0x30, b"".join(parts)), ca_key), key)


def undecodable_san(pki: Pki, out: Path) -> tuple[Path, Path]:
    name, ca_key = _root(pki)
    cert, key = make_cert("evil", (name, ca_key))
    parts = children(cert.tbs_certificate_bytes)
    ext_wrapper = parts[-1]  # [3] { SEQUENCE OF Extension }
    (ext_seq,) = children(ext_wrapper)
    san_oid = tlv(0x06, bytes.fromhex("551d11"))
    broken = tlv(0x30, san_oid + tlv(0x04, b"\x30\x7f\x82\x04evil"))  # inner length 127, 6 bytes follow
    exts = [e for e in children(ext_seq) if not e[2:].startswith(san_oid)] + [broken]
    parts[-1] = tlv(0xA3, tlv(0x30, b"".join(exts)))
    return _write(out, signed(tlv(0x30, b"".join(parts)), ca_key), key)


def mismatched_algorithm(pki: Pki, out: Path) -> tuple[Path, Path]:
    cert, key = make_cert("evil", _root(pki))
    _, ca_key = _root(pki)
    return _write(out, signed(cert.tbs_certificate_bytes, ca_key, algorithm=ECDSA_WITH_SHA384), key)


CASES: dict[str, tuple[Callable[[Pki, Path], tuple[Path, Path]], str]] = {
    # Refused by the server's own leaf check (bridge_server/net/listener.py): OpenSSL accepts it.
    "1,000-byte serial": (huge_serial, "1048-octet serial number (RFC 5280 allows 20)"),
    # OpenSSL cannot parse the extensions, so it cannot match the issuer (X509 error 20).
    "undecodable subjectAltName": (undecodable_san, NOT_OUR_CA),
    "outer signature algorithm contradicts the signed one": (
        mismatched_algorithm,
        "cert info signature and signature algorithm mismatch",
    ),
}


async def s_client(port: int, ca: Path, cert: Path, key: Path) -> trio.Process:
    cmd = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-servername", "localhost",
        "-CAfile", str(ca), "-cert", str(cert), "-key", str(key), "-quiet",
    ]  # fmt: skip
    return await trio.lowlevel.open_process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_the_crafted_certificates_are_what_they_claim(tmp_path: Path) -> None:
    """The DER edits really produce each defect (and only it: OpenSSL still loads the file)."""
    pki = make_pki(tmp_path)
    cert, _ = huge_serial(pki, tmp_path)
    assert x509.load_pem_x509_certificate(cert.read_bytes()).serial_number.bit_length() > 8000
    cert, _ = undecodable_san(pki, tmp_path)
    with pytest.raises(ValueError):
        x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    cert, _ = mismatched_algorithm(pki, tmp_path)
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    assert loaded.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384  # the outer one
    assert children(loaded.tbs_certificate_bytes)[2] != ECDSA_WITH_SHA384
    for build, _ in CASES.values():
        cert, _key = build(pki, tmp_path)
        shown = subprocess.run(
            ["openssl", "x509", "-in", str(cert), "-noout", "-subject"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "CN = evil" in shown.stdout, shown.stderr


@pytest.mark.parametrize("case", list(CASES))
async def test_a_malformed_client_certificate_sent_by_openssl_is_refused_with_a_reason(
    case: str, tmp_path: Path
) -> None:
    assert shutil.which("openssl"), "openssl is in .ci/system-deps.sh"
    pki = make_pki(tmp_path)
    build, reason = CASES[case]
    cert, key = build(pki, tmp_path)
    good = pki.folder / "clients" / "build-vm-01"
    server = make_server(tmp_path)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(30):
            start = time.monotonic()
            proc = await s_client(port, pki.ca_cert_path, cert, key)
            try:
                while not server.tls_refusals:  # noqa: ASYNC110 -- the server's counter, same loop
                    await trio.sleep(0.02)
                took = time.monotonic() - start
                refusals = dict(server.tls_refusals)
            finally:
                proc.kill()
                await proc.wait()
            healthy = await welcomed(
                port, good / "ca.pem", good / "build-vm-01.pem", good / "build-vm-01.key"
            )
        server.request_shutdown()
    assert list(refusals.values()) == [1], refusals
    assert reason in next(iter(refusals)), refusals
    assert took < HANDSHAKE_TIMEOUT_S
    assert healthy


class _PeerWith:
    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


@pytest.mark.parametrize(
    ("content", "accepted"), [(b"\x7f" + b"\xff" * 19, True), (b"\x00\x80" + bytes(19), False)]
)
def test_the_leaf_check_allows_serials_up_to_20_octets(
    content: bytes, accepted: bool, tmp_path: Path
) -> None:
    """RFC 5280 §4.1.2.2 boundary: 20 content octets pass, 21 (a sign octet too many) do not."""
    pki = make_pki(tmp_path)
    cert, _ = make_cert("evil", _root(pki))
    parts = children(cert.tbs_certificate_bytes)
    parts[1] = tlv(0x02, content)
    _, ca_key = _root(pki)
    peer = _PeerWith(signed(tlv(0x30, b"".join(parts)), ca_key))
    identity = types.SimpleNamespace(name="evil")
    if accepted:
        check_leaf(peer, identity)  # type: ignore[arg-type]
    else:
        with pytest.raises(TlsSetupError, match="21-octet serial number"):
            check_leaf(peer, identity)  # type: ignore[arg-type]
