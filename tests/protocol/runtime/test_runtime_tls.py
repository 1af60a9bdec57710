"""Mutual TLS 1.3 contexts over trio memory streams (reliability-anchors §3)."""

from __future__ import annotations

import hashlib
import ssl
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from runtime_tls_helpers import CertFiles, Pki, handshake

from protocol.errors import TlsSetupError
from protocol.runtime import tls as tls_module
from protocol.runtime.tls import (
    EXPIRED,
    HOSTNAME_MISMATCH,
    NO_CLIENT_CERT,
    NOT_OUR_CA,
    PROTOCOL_VERSION,
    REVOKED,
    client_context,
    crl_problem,
    describe_handshake_error,
    peer_identity,
    peer_identity_from_der,
    server_context,
)

NOW = datetime.now(UTC)


def _server(pki: Pki, crl: Path | None = None) -> ssl.SSLContext:
    return server_context(ca=pki.ca_file, cert=pki.server.cert, key=pki.server.key, crl=crl)


def _client(pki: Pki, files: CertFiles | None = None) -> ssl.SSLContext:
    files = files or pki.client
    return client_context(ca=pki.ca_file, cert=files.cert, key=files.key)


def _write_crl(pki: Pki, name: str, *, revoked: list[int], last: datetime, next_: datetime) -> Path:
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last)
        .next_update(next_)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    path = pki.root / f"{name}.crl.pem"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def _fresh_crl(pki: Pki, name: str, revoked: tuple[int, ...] | list[int] = ()) -> Path:
    return _write_crl(
        pki, name, revoked=list(revoked), last=NOW - timedelta(hours=1), next_=NOW + timedelta(days=7)
    )


def _serial(files: CertFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


# --- contexts ---------------------------------------------------------------------------------


def test_server_context_is_tls13_only_requires_client_cert_and_disables_tickets(pki: Pki) -> None:
    ctx = _server(pki)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.num_tickets == 0
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert not ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF


def test_contexts_trust_only_the_configured_ca(pki: Pki) -> None:
    for ctx in (_server(pki), _client(pki)):
        stats = ctx.cert_store_stats()
        assert stats["x509_ca"] == 1
        assert stats["x509"] == 1


def test_client_context_checks_hostname_and_is_tls13_only(pki: Pki) -> None:
    ctx = _client(pki)
    assert ctx.check_hostname is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3


async def test_mutual_auth_succeeds_and_each_side_sees_the_other(pki: Pki) -> None:
    srv, cli = await handshake(_server(pki), _client(pki))
    assert srv.error is None
    assert cli.error is None
    assert cli.received == b"welcome"
    assert cli.session_reused is False


async def test_server_sees_client_identity_from_its_certificate(pki: Pki) -> None:
    server_raw, client_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, _server(pki), server_side=True)
    client = trio.SSLStream(client_raw, _client(pki), server_hostname="bridge.example")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        await server.do_handshake()
        ident = peer_identity(server)
    der = x509.load_pem_x509_certificate(pki.client.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert ident.name == "builder-07"
    assert ident.names == ("builder-07", "builder-07.ci.example", "b7.ci.example")
    assert ident.fingerprint_sha256 == hashlib.sha256(der).hexdigest()


async def test_client_without_certificate_is_refused_with_no_client_certificate(pki: Pki) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cafile=str(pki.ca_file))
    srv, cli = await handshake(_server(pki), bare)
    assert cli.received == b""
    assert srv.error is not None
    assert describe_handshake_error(srv.error) == NO_CLIENT_CERT


async def test_client_cert_from_another_ca_is_refused_as_not_our_ca(pki: Pki) -> None:
    foreign = pki.issue("foreign", "builder-07.ci.example", ca=trustme.CA())
    srv, cli = await handshake(_server(pki), _client(pki, foreign))
    assert cli.received == b""
    assert srv.error is not None
    assert describe_handshake_error(srv.error) == NOT_OUR_CA


async def test_expired_client_cert_is_refused_as_expired(pki: Pki) -> None:
    start = NOW - timedelta(days=30)
    expired = pki.issue("expired", "old.ci.example", not_before=start, not_after=start + timedelta(days=1))
    srv, cli = await handshake(_server(pki), _client(pki, expired))
    assert cli.received == b""
    assert srv.error is not None
    assert describe_handshake_error(srv.error) == EXPIRED


async def test_revoked_client_cert_is_refused_and_others_still_accepted(pki: Pki) -> None:
    revoked = pki.issue("revoked", "gone.ci.example")
    crl = _write_crl(
        pki,
        "revoking",
        revoked=[_serial(revoked)],
        last=NOW - timedelta(hours=1),
        next_=NOW + timedelta(days=7),
    )
    srv_ctx = _server(pki, crl)
    assert srv_ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    srv, cli = await handshake(srv_ctx, _client(pki, revoked))
    assert cli.received == b""
    assert srv.error is not None
    assert describe_handshake_error(srv.error) == REVOKED
    srv, cli = await handshake(srv_ctx, _client(pki))
    assert cli.received == b"welcome"


async def test_tls12_only_client_is_refused_as_protocol_version(pki: Pki) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cafile=str(pki.ca_file))
    old.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    srv, cli = await handshake(_server(pki), old)
    assert cli.received == b""
    assert srv.error is not None
    assert describe_handshake_error(srv.error) == PROTOCOL_VERSION


async def test_client_refuses_server_with_wrong_hostname(pki: Pki) -> None:
    _, cli = await handshake(_server(pki), _client(pki), hostname="elsewhere.example")
    assert cli.error is not None
    assert describe_handshake_error(cli.error) == HOSTNAME_MISMATCH


# --- CRL at setup -----------------------------------------------------------------------------


def test_stale_crl_fails_server_setup(pki: Pki) -> None:
    crl = _write_crl(pki, "stale", revoked=[], last=NOW - timedelta(days=10), next_=NOW - timedelta(days=1))
    with pytest.raises(TlsSetupError, match="stale"):
        _server(pki, crl)


def test_unreadable_key_is_said_as_permission_denied(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 #5: not "not a pem private key ([Errno 13] ...)" (root reads anything: simulate it)."""
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == pki.server.key:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(TlsSetupError) as caught:
        _server(pki)
    assert str(caught.value) == (
        f"cannot read key file {pki.server.key}: permission denied (the service user must be able to read it)"
    )


def test_missing_crl_fails_server_setup(pki: Pki) -> None:
    with pytest.raises(TlsSetupError, match="not found"):
        _server(pki, pki.root / "absent.crl.pem")


def test_unparsable_crl_fails_server_setup(pki: Pki) -> None:
    junk = pki.root / "junk.crl.pem"
    junk.write_text("not a crl\n")
    with pytest.raises(TlsSetupError, match="not a pem crl"):
        _server(pki, junk)


def test_crl_from_another_ca_fails_server_setup(pki: Pki) -> None:
    other = Pki(trustme.CA(), pki.ca_file, pki.server, pki.client, pki.root)
    crl = _write_crl(
        other, "foreign", revoked=[], last=NOW - timedelta(hours=1), next_=NOW + timedelta(days=1)
    )
    with pytest.raises(TlsSetupError, match="not signed by the ca"):
        _server(pki, crl)


def test_crl_problem_reports_staleness_only_once_next_update_has_passed(pki: Pki) -> None:
    crl = _write_crl(pki, "weekly", revoked=[], last=NOW - timedelta(hours=1), next_=NOW + timedelta(days=7))
    assert crl_problem(crl, NOW) is None
    assert crl_problem(crl, NOW, ca=pki.ca_file) is None
    later = crl_problem(crl, NOW + timedelta(days=8))
    assert later is not None
    assert "stale" in later
    earlier = crl_problem(crl, NOW - timedelta(days=1))
    assert earlier is not None
    assert "not yet valid" in earlier


# --- cert/key load failures -------------------------------------------------------------------


def test_missing_key_file_is_named_in_the_error(pki: Pki) -> None:
    absent = pki.root / "nope.key"
    with pytest.raises(TlsSetupError, match=r"key file .*nope\.key not found"):
        client_context(ca=pki.ca_file, cert=pki.client.cert, key=absent)


def test_missing_ca_file_is_named_in_the_error(pki: Pki) -> None:
    with pytest.raises(TlsSetupError, match=r"ca file .*nope-ca\.pem not found"):
        server_context(ca=pki.root / "nope-ca.pem", cert=pki.server.cert, key=pki.server.key)


def test_key_that_does_not_match_the_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsSetupError, match="key belongs to the certificate"):
        server_context(ca=pki.ca_file, cert=pki.server.cert, key=pki.client.key)


def test_garbage_certificate_file_is_named(pki: Pki) -> None:
    junk = pki.root / "junk-cert.pem"
    junk.write_text("hello\n")
    with pytest.raises(TlsSetupError, match=r"certificate file .*junk-cert\.pem is not a pem certificate"):
        server_context(ca=pki.ca_file, cert=junk, key=pki.server.key)


def test_encrypted_key_is_refused_with_advice(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    locked = pki.root / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hunter2"),
        )
    )
    with pytest.raises(TlsSetupError, match="encrypted") as info:
        server_context(ca=pki.ca_file, cert=pki.server.cert, key=locked)
    assert "hunter2" not in str(info.value)


# --- peer identity ----------------------------------------------------------------------------


def _self_signed(subject: list[x509.NameAttribute], san: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime(2024, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 6, 1, tzinfo=UTC))
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_peer_identity_without_cn_uses_first_san_dns_name_and_lists_uris() -> None:
    der = _self_signed(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ci")],
        [
            x509.UniformResourceIdentifier("spiffe://ci/builder-07"),
            x509.DNSName("builder-07.ci.example"),
            x509.DNSName("b7.ci.example"),
        ],
    )
    ident = peer_identity_from_der(der)
    assert ident.name == "builder-07.ci.example"
    assert ident.names == ("builder-07.ci.example", "b7.ci.example", "spiffe://ci/builder-07")
    assert ident.not_after == datetime(2030, 6, 1, tzinfo=UTC)
    assert ident.fingerprint_sha256 == hashlib.sha256(der).hexdigest()
    assert len(ident.fingerprint_sha256) == 64


def test_peer_identity_prefers_cn_over_san() -> None:
    der = _self_signed([x509.NameAttribute(NameOID.COMMON_NAME, "admin-1")], [x509.DNSName("a.example")])
    ident = peer_identity_from_der(der)
    assert ident.name == "admin-1"
    assert ident.names == ("admin-1", "a.example")


def test_peer_identity_without_certificate_raises() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    with pytest.raises(TlsSetupError, match="no certificate"):
        peer_identity(NoCert())


# --- describe_handshake_error -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", "peer refused our certificate: " + REVOKED),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "peer refused our certificate: " + EXPIRED),
        ("TLSV1_ALERT_UNKNOWN_CA", "peer refused our certificate: " + NOT_OUR_CA),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "peer refused our certificate: " + NO_CLIENT_CERT),
        ("TLSV1_ALERT_PROTOCOL_VERSION", PROTOCOL_VERSION),
        ("SOMETHING_NEW", "tls handshake failed: something_new"),
    ],
)
def test_alerts_received_from_the_peer_say_the_peer_refused_us(reason: str, expected: str) -> None:
    err = ssl.SSLError(1, f"[SSL: {reason}] whatever")
    err.reason = reason
    try:
        raise RuntimeError("wrapped") from err
    except RuntimeError as wrapped:
        assert describe_handshake_error(wrapped) == expected


def test_plain_eof_during_handshake_is_described_as_closed() -> None:
    assert describe_handshake_error(ConnectionResetError()) == "connection closed during the tls handshake"


@pytest.fixture
def eof_tolerant_ssl(monkeypatch: pytest.MonkeyPatch) -> list[ssl.SSLContext]:
    """Contexts built with Debian 12's Python 3.11.2 default: OP_IGNORE_UNEXPECTED_EOF set."""
    made: list[ssl.SSLContext] = []

    def debian_default_context(protocol: ssl._SSLMethod) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        made.append(ctx)
        return ctx

    fake_ssl = types.SimpleNamespace(**vars(ssl))
    fake_ssl.SSLContext = debian_default_context
    monkeypatch.setattr(tls_module, "ssl", fake_ssl)
    return made


def test_contexts_never_treat_a_cut_connection_as_a_clean_close(
    pki: Pki, eof_tolerant_ssl: list[ssl.SSLContext]
) -> None:
    contexts = [_server(pki), _client(pki)]
    assert contexts == eof_tolerant_ssl  # the build default really was in force
    for ctx in contexts:
        assert not ctx.options & ssl.OP_IGNORE_UNEXPECTED_EOF


@pytest.mark.usefixtures("eof_tolerant_ssl")
async def test_tcp_close_without_close_notify_reads_as_a_broken_connection(pki: Pki) -> None:
    server_raw, client_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, _server(pki), server_side=True)
    client = trio.SSLStream(client_raw, _client(pki), server_hostname="bridge.example")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        await server.do_handshake()
    await client.send_all(b"partial frame")
    await client_raw.aclose()  # the TCP connection ends, no TLS close_notify
    assert await server.receive_some() == b"partial frame"
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await trio.aclose_forcefully(server)
