"""Connection handler limits over memory streams: handshake deadline, connection cap."""

from __future__ import annotations

import ssl

import structlog
import trio
import trio.testing
import trustme
from role_certs import issue_cert
from server_fakes import FakeDevice, make_manager

from bridge_server.config import LimitsConfig
from bridge_server.net.hub import Hub
from bridge_server.net.listener import FIRST_FLIGHT_TIMEOUT_S, ConnectionHandler
from bridge_server.net.session import SessionContext
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode
from protocol.runtime.framed import FramedConnection

CA = trustme.CA()
SERVER_CERT = issue_cert(CA, "localhost", role="server")
CLIENT_CERT = issue_cert(CA, "vm1", common_name="vm1", role="client")


def server_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    CA.configure_trust(ctx)
    SERVER_CERT.configure_cert(ctx)
    return ctx


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(ctx)
    CLIENT_CERT.configure_cert(ctx)
    return ctx


def handler(limits: LimitsConfig) -> ConnectionHandler:
    hub = Hub()
    ctx = SessionContext(hub=hub, tokens=[make_manager(hub, FakeDevice(), allow=("vm1",))], heartbeat_s=10.0)
    return ConnectionHandler(server_ctx, limits, ctx)


async def test_silent_peer_fails_the_handshake_at_exactly_the_first_flight_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        await handler(LimitsConfig(handshake_timeout_s=10.0))(server)
    assert trio.current_time() - start == FIRST_FLIGHT_TIMEOUT_S
    reason = "handshake timed out before a complete ClientHello"
    assert [(e["event"], e["reason"]) for e in logs] == [("tls.handshake_failed", reason)]


async def test_silent_peer_fails_at_the_handshake_timeout_when_that_is_shorter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    await handler(LimitsConfig(handshake_timeout_s=0.5))(server)
    assert trio.current_time() - start == 0.5


async def test_connection_over_the_cap_is_refused_with_a_reason_after_the_handshake() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    h = handler(LimitsConfig(max_connections=1))
    h.connections = 1  # one session already open
    tls = trio.SSLStream(client_stream, client_ctx(), server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h, server_stream)
        await tls.do_handshake()
        refused = await FramedConnection(tls, BridgeConnection(Role.CLIENT)).receive()
    assert isinstance(refused, wire.Refused)
    assert refused.code is CloseCode.TOO_MANY_CONNECTIONS
    assert h.connections == 1


async def test_untrusted_client_certificate_is_logged_with_a_reason() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    other = issue_cert(trustme.CA(), "vm1", common_name="vm1", role="client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(ctx)
    other.configure_cert(ctx)
    tls = trio.SSLStream(client_stream, ctx, server_hostname="localhost")
    h = handler(LimitsConfig())
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h, server_stream)
            try:
                await tls.do_handshake()
                await tls.receive_some(1)
            except trio.BrokenResourceError:
                pass
    failed = [e for e in logs if e["event"] == "tls.handshake_failed"]
    assert len(failed) == 1
    assert failed[0]["reason"]
    assert h.connections == 0
