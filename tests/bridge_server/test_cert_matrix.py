"""S1 / B8: pathological client certificates against the real server (issue 18 item 8).

Each certificate below is presented by a client to a running server whose CA is the one
`tokenbridge pki` makes (pathLenConstraint 0, so it signs leaves only). Each must be refused in
the handshake, before any application frame, with a reason an operator can act on (the
`tls_refusals` counters, the `tls.handshake_failed` log line), within the handshake timeout, and
the server must serve a valid client right afterwards. An intermediate CA configured as the trust
anchor is refused too (OpenSSL needs a self-signed anchor; PARTIAL_CHAIN is not set).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge_admin.pki import Pki
from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import NOT_OUR_CA, client_context

Key = ec.EllipticCurvePrivateKey
HANDSHAKE_TIMEOUT_S = 5.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    subject: str,
    issuer: tuple[x509.Name, Key],
    *,
    key: Key | None = None,
    ca: bool = False,
    path_length: int | None = None,
    not_before: dt.datetime | None = None,
    sans: list[str] | None = None,
) -> tuple[x509.Certificate, Key]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, ca, ca, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans or [subject]]), critical=False
        )
    )
    return builder.sign(issuer_key, hashes.SHA256()), key


def write_identity(folder: Path, stem: str, chain: list[x509.Certificate], key: Key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    pki = Pki(folder / "pki")
    pki.init()
    pki.issue_server(["localhost"])
    pki.issue_client("build-vm-01")
    return pki


def make_server(folder: Path, ca: str = "pki/ca.pem") -> BridgeServer:
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": ca, "cert": "pki/localhost.pem", "key": "pki/localhost.key"},
        "tokens": [{"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": ["build-vm-01", "evil"]}],
        "limits": {"handshake_timeout_s": HANDSHAKE_TIMEOUT_S},
    }
    return BridgeServer(parse_server_config(doc, folder / "server.yaml"))


async def welcomed(port: int, ca: Path, cert: Path, key: Path) -> bool:
    """True when the server welcomes this identity, False when it refuses the handshake."""
    ctx = client_context(ca=ca, cert=cert, key=key)
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
        first = await FramedConnection(stream, BridgeConnection(Role.CLIENT)).receive()
        return isinstance(first, wire.Welcome)
    except trio.BrokenResourceError:  # TLS 1.3: a refused client certificate shows on the first read
        return False
    finally:
        await trio.aclose_forcefully(stream)


def _root(pki: Pki) -> tuple[x509.Name, Key]:
    cert, key = pki._ca()
    return cert.subject, key


def not_yet_valid(pki: Pki, out: Path) -> tuple[Path, Path]:
    cert, key = make_cert("evil", _root(pki), not_before=_now() + dt.timedelta(days=1))
    return write_identity(out, "evil", [cert], key)


def self_signed(pki: Pki, out: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = make_cert("evil", (_name("evil"), key), key=key)
    return write_identity(out, "evil", [cert], key)


def forged_issuer(pki: Pki, out: Path) -> tuple[Path, Path]:
    """Our CA's name, another key: the signature does not verify."""
    root_name, _ = _root(pki)
    cert, key = make_cert("evil", (root_name, ec.generate_private_key(ec.SECP256R1())))
    return write_identity(out, "evil", [cert], key)


def ca_as_leaf(pki: Pki, out: Path) -> tuple[Path, Path]:
    cert, key = make_cert("evil", _root(pki), ca=True, path_length=0)
    return write_identity(out, "evil", [cert], key)


def deep_chain(pki: Pki, out: Path, depth: int = 50) -> tuple[Path, Path]:
    issuer = _root(pki)
    chain: list[x509.Certificate] = []
    for i in range(depth - 1):
        cert, key = make_cert(f"intermediate-{i}", issuer, ca=True)
        chain.insert(0, cert)
        issuer = (cert.subject, key)
    leaf, leaf_key = make_cert("evil", issuer)
    return write_identity(out, "evil", [leaf, *chain], leaf_key)


def oversized(pki: Pki, out: Path) -> tuple[Path, Path]:
    sans = ["evil"] + [f"host-{i:05d}.build.example" for i in range(10_000)]
    cert, key = make_cert("evil", _root(pki), sans=sans)
    return write_identity(out, "evil", [cert], key)


CASES: dict[str, tuple[Callable[[Pki, Path], tuple[Path, Path]], str]] = {
    "not yet valid": (not_yet_valid, "certificate not yet valid (check clocks)"),
    "self-signed": (self_signed, NOT_OUR_CA),
    "forged issuer signature": (forged_issuer, NOT_OUR_CA),
    "ca certificate as a leaf": (ca_as_leaf, "is a CA certificate (basicConstraints CA:TRUE)"),
    "50-deep chain": (deep_chain, "certificate verify failed: path length constraint exceeded"),
    "10,000 SANs": (oversized, "tls handshake failed: excessive_message_size"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_pathological_client_certificate_is_refused_with_a_reason_and_the_server_stays_healthy(
    case: str, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    build, reason = CASES[case]
    cert, key = build(pki, tmp_path)
    good = pki.folder / "clients" / "build-vm-01"
    server = make_server(tmp_path)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(30):
            start = time.monotonic()
            accepted = await welcomed(port, pki.ca_cert_path, cert, key)
            took = time.monotonic() - start
            refusals = dict(server.tls_refusals)
            healthy = await welcomed(
                port, good / "ca.pem", good / "build-vm-01.pem", good / "build-vm-01.key"
            )
        server.request_shutdown()
    assert not accepted
    assert list(refusals.values()) == [1], refusals
    assert reason in next(iter(refusals)), refusals
    assert took < HANDSHAKE_TIMEOUT_S
    assert healthy


async def test_an_intermediate_ca_configured_as_the_trust_anchor_is_refused(tmp_path: Path) -> None:
    """OpenSSL anchors only at a self-signed CA here: a chain that ends at an intermediate fails."""
    pki = make_pki(tmp_path)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_root, _ = make_cert("another root", (_name("another root"), other_key), key=other_key, ca=True)
    inter, inter_key = make_cert("intermediate", (other_root.subject, other_key), ca=True, path_length=0)
    (tmp_path / "intermediate.pem").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    leaf, leaf_key = make_cert("build-vm-01", (inter.subject, inter_key))
    cert, key = write_identity(tmp_path, "under-intermediate", [leaf, inter], leaf_key)
    server = make_server(tmp_path, ca="intermediate.pem")
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(30):
            accepted = await welcomed(port, pki.ca_cert_path, cert, key)
            refusals = dict(server.tls_refusals)
        server.request_shutdown()
    assert not accepted
    assert refusals == {NOT_OUR_CA: 1}, refusals
