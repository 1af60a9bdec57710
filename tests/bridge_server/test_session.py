"""Sessions over memory streams: greeting, refusal, heartbeat, dispatch, admin, firewall."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import structlog
import trio
import trio.testing
from server_fakes import ATR, SW_OK, VERIFY, FakeDevice, identity, make_manager

from bridge_server.net.hub import Hub
from bridge_server.net.session import SessionContext, serve_session
from bridge_server.net.session_context import AdminAnswer
from bridge_server.tokens.manager import TokenManager
from protocol import ccid, wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode
from protocol.runtime.framed import FramedConnection

HEARTBEAT = 10.0


class StatusOnly:
    """A stand-in AdminHandler: answers `status` from the tokens, records what it was asked."""

    def __init__(self, tokens: list[TokenManager]) -> None:
        self.tokens = tokens
        self.asked: list[tuple[str, str]] = []

    async def handle(self, action: str, args: Mapping[str, Any] | None, *, actor: str) -> AdminAnswer:
        self.asked.append((action, actor))
        if action == "status":
            return True, {"tokens": {t.name: t.snapshot() for t in self.tokens}}, ""
        return False, {}, f"unknown action {action!r}"


class Env:
    def __init__(
        self, nursery: trio.Nursery, *, admins: tuple[str, ...] = ("ops",), dispatcher: bool = True
    ) -> None:
        self.nursery = nursery
        self.hub = Hub()
        self.device = FakeDevice()
        self.manager: TokenManager = make_manager(self.hub, self.device, allow=("vm1", "vm2"))
        self.admin = StatusOnly([self.manager])
        self.ctx = SessionContext(
            hub=self.hub, tokens=[self.manager], admins=admins, heartbeat_s=HEARTBEAT,
            **({"dispatcher": self.admin} if dispatcher else {}),
        )  # fmt: skip
        self.done: dict[str, float] = {}

    async def start(self) -> None:
        await self.nursery.start(self.manager.run)

    @asynccontextmanager
    async def connect(self, name: str, *, hello: bool = True) -> AsyncIterator[FramedConnection]:
        client_stream, server_stream = trio.testing.memory_stream_pair()

        async def server() -> None:
            await serve_session(server_stream, identity(name), self.ctx, peer="memory")
            self.done[name] = trio.current_time()

        self.nursery.start_soon(server)
        client = FramedConnection(client_stream, BridgeConnection(Role.CLIENT))
        try:
            if hello:
                welcome = await client.receive()
                assert isinstance(welcome, wire.Welcome)
                await client.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="test"))
            yield client
        finally:
            await client_stream.aclose()


async def expect(client: FramedConnection, cls: type) -> Any:
    while True:
        msg = await client.receive()
        if isinstance(msg, cls):
            return msg
        assert isinstance(msg, wire.TokenStatus | wire.Ping | wire.SpeculationPaths), msg


async def test_welcome_comes_first_then_token_status_after_hello(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1", hello=False) as client:
        welcome = await client.receive()
        assert welcome == wire.Welcome(
            version=wire.PROTOCOL_VERSION,
            server="tokenbridge-server/0.1.0",
            identity="vm1",
            heartbeat_interval=HEARTBEAT,
        )
        await client.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="test"))
        status = await client.receive()
        assert status == wire.TokenStatus(
            token_id=0, name="codesign", present=True, allowed=True, atr=ATR, state="idle"
        )


async def test_identity_allowed_nowhere_is_refused_before_any_token_frame(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("intruder", hello=False) as client:
        refused = await client.receive()
        assert isinstance(refused, wire.Refused)
        assert (refused.code, refused.reason) == (CloseCode.NOT_AUTHORIZED, "not_allowed")
        assert isinstance(await client.receive(), wire.ConnectionClosed)


async def test_admin_sees_every_token_flagged_and_gets_status(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("ops") as client:
        status = await client.receive()
        assert (status.name, status.allowed) == ("codesign", False)
        await client.send(wire.AdminRequest(request_id=7, action="status", args={}))
        resp = await expect(client, wire.AdminResponse)
        assert resp.ok
        assert resp.result["tokens"]["codesign"]["present"] is True
        await client.send(wire.AdminRequest(request_id=8, action="revoke", args={"token": "codesign"}))
        resp = await expect(client, wire.AdminResponse)
        assert (resp.ok, resp.error) == (False, "unknown action 'revoke'")
    assert env.admin.asked == [("status", "ops"), ("revoke", "ops")]


async def test_without_a_dispatcher_a_session_answers_no_admin_action_not_even_status(
    nursery: trio.Nursery,
) -> None:
    """One status path: the dispatcher's (bridge_server/net/admin.py); the session has no fallback."""
    env = Env(nursery, dispatcher=False)
    await env.start()
    async with env.connect("ops") as client:
        await client.send(wire.AdminRequest(request_id=7, action="status", args={}))
        resp = await expect(client, wire.AdminResponse)
        assert (resp.ok, resp.result) == (False, {})
        assert "answers no admin actions" in resp.error


async def test_non_admin_admin_request_is_refused(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1") as client:
        await client.send(wire.AdminRequest(request_id=1, action="status", args={}))
        resp = await expect(client, wire.AdminResponse)
        assert (resp.ok, resp.result) == (False, {})


async def test_lease_and_apdu_round_trip_through_a_session(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1") as client:
        await client.send(wire.LeaseRequest(token_id=0))
        granted = await expect(client, wire.LeaseGranted)
        await client.send(
            wire.CcidFrame(token_id=0, epoch=granted.epoch, message=ccid.icc_power_on(1).encode())
        )
        atr = ccid.decode_message((await expect(client, wire.CcidFrame)).message)
        assert atr.data == ATR
        await client.send(
            wire.CcidFrame(token_id=0, epoch=granted.epoch, message=ccid.xfr_block(2, VERIFY).encode())
        )
        resp = ccid.decode_message((await expect(client, wire.CcidFrame)).message)
        assert (resp.seq, resp.data) == (2, SW_OK)
        await client.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
        ended = await expect(client, wire.LeaseEnded)
        assert ended.reason == "released"


async def test_unknown_token_id_is_an_error_not_a_crash(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1") as client:
        await client.send(wire.LeaseRequest(token_id=5))
        err = await expect(client, wire.ErrorMessage)
        assert (err.code, err.token_id) == ("unknown_token", 5)
        await client.send(wire.Ping(nonce=42))
        assert await expect(client, wire.Pong) == wire.Pong(nonce=42)


async def test_server_pings_every_heartbeat_interval(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1") as client:
        opened = trio.current_time()
        pings = []
        for _ in range(2):
            msg = await expect(client, wire.Ping)
            pings.append(trio.current_time() - opened)
            await client.send(wire.Pong(nonce=msg.nonce))
        assert pings == [HEARTBEAT, 2 * HEARTBEAT]


async def test_silent_client_loses_its_session_and_lease_after_three_intervals(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = Env(nursery)
    await env.start()
    with structlog.testing.capture_logs() as logs:
        async with env.connect("vm1") as client:
            await client.send(wire.LeaseRequest(token_id=0))
            granted = await expect(client, wire.LeaseGranted)
            last_heard = trio.current_time()
            goodbye = await expect(client, wire.Goodbye)
            assert goodbye.code is CloseCode.HEARTBEAT_TIMEOUT
            assert trio.current_time() - last_heard == 3 * HEARTBEAT
        await trio.testing.wait_all_tasks_blocked()
    closed = [e for e in logs if e["event"] == "session.closed"]
    assert [e["reason"] for e in closed] == ["heartbeat_lost"]
    ended = [e for e in logs if e["event"] == "lease.ended"]
    assert [(e["reason"], e["lease_epoch"]) for e in ended] == [("heartbeat_lost", granted.epoch)]
    assert env.manager.book.holder is None


async def test_client_that_never_says_hello_is_dropped_after_the_hello_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1", hello=False) as client:
        start = trio.current_time()
        assert isinstance(await client.receive(), wire.Welcome)
        assert isinstance(await client.receive(), wire.ConnectionClosed)
        assert trio.current_time() - start == 3 * HEARTBEAT


async def test_protocol_violation_gets_goodbye_and_does_not_crash_the_server(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with structlog.testing.capture_logs() as logs:
        nursery.start_soon(partial(serve_session, server_stream, identity("vm1"), env.ctx, peer="memory"))
        await client_stream.receive_some(65536)  # Welcome
        await client_stream.send_all(b"\x99\x00\x00\x00\x00\x00")  # unknown frame type
        data = b""
        while chunk := await client_stream.receive_some(65536):
            data += chunk
    assert data[0] == wire.FrameType.GOODBYE
    assert [e["reason"] for e in logs if e["event"] == "session.closed"] == ["protocol_error"]


async def test_disconnect_mid_lease_releases_the_token_for_the_next_client(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm2") as second:
        async with env.connect("vm1") as first:
            await first.send(wire.LeaseRequest(token_id=0))
            await expect(first, wire.LeaseGranted)
            await second.send(wire.LeaseRequest(token_id=0))
            assert (await expect(second, wire.LeaseQueued)).position == 1
        granted = await expect(second, wire.LeaseGranted)
        assert granted.token_id == 0


async def test_shutdown_goodbye_from_the_outbox_ends_the_session(nursery: trio.Nursery) -> None:
    env = Env(nursery)
    await env.start()
    async with env.connect("vm1") as client:
        await expect(client, wire.TokenStatus)
        await trio.testing.wait_all_tasks_blocked()
        (sub,) = list(env.hub)
        sub.push(wire.Goodbye(code=CloseCode.SHUTTING_DOWN, reason="server shutting down"))
        bye = await expect(client, wire.Goodbye)
        assert bye.code is CloseCode.SHUTTING_DOWN
        assert isinstance(await client.receive(), wire.ConnectionClosed)


class WhoWrites(trio.abc.Stream):
    """A server-side stream that records the task behind every write."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writers: list[str] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writers.append(trio.lowlevel.current_task().name.rsplit(".", 1)[-1])
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _serve_and_watch(env: Env, client_moves: Any) -> tuple[list[str], list[Any]]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    watched = WhoWrites(server_stream)
    client = FramedConnection(client_stream, BridgeConnection(Role.CLIENT))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_session, watched, identity("vm1"), env.ctx, peer="memory"))
        received = await client_moves(client, client_stream)
    return watched.writers, received


async def _drain(client: FramedConnection) -> list[Any]:
    got: list[Any] = []
    while not isinstance(msg := await client.receive(), wire.ConnectionClosed):
        got.append(msg)
    return got


async def test_only_the_writer_task_writes_whatever_ends_the_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Greeting, heartbeat Goodbye and protocol-error Goodbye all leave through the writer."""
    env = Env(nursery)
    await env.start()

    async def silent(client: FramedConnection, raw: trio.abc.Stream) -> list[Any]:
        await client.receive()  # Welcome
        await client.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="test"))
        return await _drain(client)  # Pongs never sent: heartbeat_lost

    writers, got = await _serve_and_watch(env, silent)
    assert isinstance(got[-1], wire.Goodbye) and got[-1].code is CloseCode.HEARTBEAT_TIMEOUT
    assert set(writers) == {"_writer"}, writers

    async def rude(client: FramedConnection, raw: trio.abc.Stream) -> list[Any]:
        await client.receive()  # Welcome
        await raw.send_all(b"\x99\x00\x00\x00\x00\x00")  # unknown frame type, before ClientHello
        data = b""
        while chunk := await raw.receive_some(65536):
            data += chunk
        return [data]

    writers, (data,) = await _serve_and_watch(env, rude)
    assert data[0] == wire.FrameType.GOODBYE
    assert set(writers) == {"_writer"}, writers
