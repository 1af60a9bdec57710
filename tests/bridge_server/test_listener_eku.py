"""The server refuses a client certificate not made for clientAuth only (issue 13 item 11).

trustme's certificates carry clientAuth, serverAuth and codeSigning: OpenSSL takes them as a
client, and so did the server, before it checked the extended key usage itself.
"""

from __future__ import annotations

import ssl

import pytest
import structlog
import trio
import trio.testing
import trustme
from role_certs import CertRole, issue_cert
from server_fakes import FakeDevice, make_manager

from bridge_server.config import LimitsConfig
from bridge_server.net.hub import Hub
from bridge_server.net.listener import ConnectionHandler
from bridge_server.net.session import SessionContext
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode
from protocol.runtime.framed import FramedConnection

CA = trustme.CA()
SERVER_CERT = issue_cert(CA, "localhost", role="server")


def _server_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    CA.configure_trust(ctx)
    SERVER_CERT.configure_cert(ctx)
    return ctx


async def _connect_as(client: trustme.LeafCert) -> tuple[list[dict[str, object]], object]:
    """One connection to a listener; its log lines and the first frame the client received."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(ctx)
    client.configure_cert(ctx)
    tls = trio.SSLStream(client_stream, ctx, server_hostname="localhost")
    hub = Hub()
    session = SessionContext(
        hub=hub, tokens=[make_manager(hub, FakeDevice(), allow=("vm1",))], heartbeat_s=10.0
    )
    received: object = None
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ConnectionHandler(_server_ctx, LimitsConfig(), session), server_stream)
            try:
                await tls.do_handshake()
                received = await FramedConnection(tls, BridgeConnection(Role.CLIENT)).receive()
            except trio.BrokenResourceError:
                pass
            nursery.cancel_scope.cancel()
    return logs, received


@pytest.mark.parametrize(
    ("role", "problem"),
    [("none", "has no extended key usage"), ("both", "carries both clientAuth and serverAuth")],
)
async def test_a_client_certificate_without_clientauth_only_is_refused_with_the_reason(
    role: CertRole, problem: str
) -> None:
    logs, received = await _connect_as(issue_cert(CA, "vm1", common_name="vm1", role=role))
    reason = (
        f"client certificate 'vm1' {problem}: a bridge client certificate must carry clientAuth only; "
        "reissue it with `tokenbridge pki issue-client`"
    )
    # The client is told why, not just closed on (it shows `Refused` to its operator).
    assert isinstance(received, wire.Refused)
    assert (received.code, received.reason, received.message) == (
        CloseCode.NOT_AUTHORIZED,
        "certificate_purpose",
        reason,
    )
    assert [e["event"] for e in logs] == ["tls.handshake_failed"]
    assert logs[0]["reason"] == reason


async def test_trustmes_default_certificate_is_refused_as_a_client() -> None:
    logs, _ = await _connect_as(CA.issue_cert("vm1", common_name="vm1"))
    assert [e["event"] for e in logs] == ["tls.handshake_failed"]


async def test_a_clientauth_only_certificate_gets_a_session() -> None:
    logs, received = await _connect_as(issue_cert(CA, "vm1", common_name="vm1", role="client"))
    assert received != b""  # the Welcome frame
    assert "tls.handshake_failed" not in [e["event"] for e in logs]
