"""FramedConnection over trio memory streams, with a tiny line-based stand-in state machine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import trio
import trio.lowlevel
import trio.testing

from protocol import NEED_DATA
from protocol.connection import BridgeConnection, ConnState, Role
from protocol.errors import CloseCode, RemoteProtocolError
from protocol.runtime.framed import RECEIVE_CHUNK, FramedConnection
from protocol.wire import PROTOCOL_VERSION, ClientHello, ConnectionClosed, Goodbye, Ping, Pong, Welcome


@dataclass(frozen=True)
class Closed:
    """Stand-in for protocol.connection.ConnectionClosed."""


class LineConnection:
    """Stand-in for BridgeConnection: messages are bytes, framed as lines."""

    def __init__(self, *, max_line: int = 1 << 20) -> None:
        self.buffer = b""
        self.eof = False
        self.max_line = max_line
        self.sent: list[bytes] = []

    def receive_data(self, data: bytes) -> None:
        if data == b"":
            self.eof = True
        self.buffer += data

    def next_event(self) -> bytes | Closed | object:
        line, sep, rest = self.buffer.partition(b"\n")
        if sep:
            self.buffer = rest
            return line
        if len(self.buffer) > self.max_line:
            raise RemoteProtocolError(f"line longer than {self.max_line}")
        if self.eof:
            if self.buffer:
                raise RemoteProtocolError("eof mid-line")
            return Closed()
        return NEED_DATA

    def send(self, msg: bytes) -> bytes:
        self.sent.append(msg)
        return msg + b"\n"

    def send_failed(self) -> None:
        self.broken = True


class ChoppyStream(trio.abc.Stream):
    """Wraps a stream; send_all writes in small pieces with a checkpoint between each, and
    receive_some records the max_bytes it was asked for."""

    def __init__(self, inner: trio.abc.Stream, piece: int = 3) -> None:
        self.inner = inner
        self.piece = piece
        self.asked: list[int | None] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = bytes(data)
        for i in range(0, len(view), self.piece):
            await self.inner.send_all(view[i : i + self.piece])
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _pair() -> tuple[FramedConnection, FramedConnection]:
    a, b = trio.testing.memory_stream_pair()
    return FramedConnection(a, LineConnection()), FramedConnection(b, LineConnection())  # type: ignore[arg-type]


async def test_message_sent_on_one_end_is_received_on_the_other() -> None:
    left, right = _pair()
    await left.send(b"hello")
    await right.send(b"back")
    assert await right.receive() == b"hello"
    assert await left.receive() == b"back"


async def test_several_buffered_messages_come_out_one_per_receive() -> None:
    left, right = _pair()
    for msg in (b"one", b"two", b"three"):
        await left.send(msg)
    assert [await right.receive() for _ in range(3)] == [b"one", b"two", b"three"]


async def test_message_split_across_many_reads_is_reassembled() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = FramedConnection(b, LineConnection())  # type: ignore[arg-type]
    got: list[object] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _collect(right, got))
        for byte in b"split-message\n":
            await a.send_all(bytes([byte]))
            await trio.testing.wait_all_tasks_blocked()
    assert got == [b"split-message"]


async def _collect(framed: FramedConnection, out: list[object]) -> None:
    out.append(await framed.receive())


async def test_peer_eof_returns_connection_closed() -> None:
    left, right = _pair()
    await left.send(b"last")
    await left.aclose()
    assert await right.receive() == b"last"
    assert isinstance(await right.receive(), Closed)


async def test_reads_are_bounded_by_the_receive_chunk() -> None:
    a, b = trio.testing.memory_stream_pair()
    choppy = ChoppyStream(b)
    right = FramedConnection(choppy, LineConnection(), receive_chunk=4)  # type: ignore[arg-type]
    await a.send_all(b"0123456789\n")
    assert await right.receive() == b"0123456789"
    assert choppy.asked == [4, 4, 4]


def test_default_receive_chunk_is_64_kib() -> None:
    assert RECEIVE_CHUNK == 65536


async def test_concurrent_sends_never_interleave_on_the_wire() -> None:
    a, b = trio.testing.memory_stream_pair()
    left = FramedConnection(ChoppyStream(a, piece=2), LineConnection())  # type: ignore[arg-type]
    messages = [bytes([ord("a") + i]) * 20 for i in range(5)]
    async with trio.open_nursery() as nursery:
        for msg in messages:
            nursery.start_soon(left.send, msg)
    received = b""
    while received.count(b"\n") < len(messages):
        received += await b.receive_some()
    lines = received.split(b"\n")[:-1]
    assert sorted(lines) == sorted(messages)
    # and the wire order is the order the state machine serialised them
    assert lines == left.conn.sent  # type: ignore[attr-defined]


async def test_remote_protocol_error_from_state_machine_passes_through() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = FramedConnection(b, LineConnection(max_line=8))  # type: ignore[arg-type]
    await a.send_all(b"x" * 20)
    with pytest.raises(RemoteProtocolError, match="longer than 8"):
        await right.receive()


async def test_send_after_peer_closed_raises_broken_resource_error() -> None:
    left, right = _pair()
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await left.send(b"anyone there")


async def test_send_after_own_close_raises_closed_resource_error() -> None:
    left, _right = _pair()
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await left.send(b"too late")


async def test_two_concurrent_receivers_is_an_error() -> None:
    _left, right = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(right.receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await right.receive()
        nursery.cancel_scope.cancel()


# --- with the real BridgeConnection -----------------------------------------------------------


def _bridge_pair() -> tuple[FramedConnection, FramedConnection]:
    a, b = trio.testing.memory_stream_pair()
    return FramedConnection(a, BridgeConnection(Role.SERVER)), FramedConnection(
        b, BridgeConnection(Role.CLIENT)
    )


async def test_greeting_ping_and_close_over_a_real_bridge_connection() -> None:
    server, client = _bridge_pair()
    welcome = Welcome(version=PROTOCOL_VERSION, server="test", identity="bridge", heartbeat_interval=10.0)
    await server.send(welcome)
    assert await client.receive() == welcome
    hello = ClientHello(version=PROTOCOL_VERSION, software="tokenbridge-test")
    await client.send(hello)
    assert await server.receive() == hello
    await client.send(Ping(nonce=7))
    assert await server.receive() == Ping(nonce=7)
    await server.send(Pong(nonce=7))
    assert await client.receive() == Pong(nonce=7)
    await client.aclose()
    assert await server.receive() == ConnectionClosed()


async def test_garbage_from_the_peer_raises_remote_protocol_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    client = FramedConnection(b, BridgeConnection(Role.CLIENT))
    await a.send_all(b"\xee" * 64)
    with pytest.raises(RemoteProtocolError):
        await client.receive()


# --- a failed or cancelled send breaks the connection (h11's send_failed) -----------------------


class _FailingStream(ChoppyStream):
    """send_all writes a few bytes, then fails (or blocks until cancelled)."""

    def __init__(self, inner: trio.abc.Stream, *, block: bool) -> None:
        super().__init__(inner)
        self.block = block

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(bytes(data)[:3])
        if self.block:
            await trio.sleep_forever()
        raise trio.BrokenResourceError("wire cut")


@pytest.mark.parametrize("block", [False, True])
async def test_a_send_that_fails_half_way_marks_the_state_machine_broken(block: bool) -> None:
    a, _b = trio.testing.memory_stream_pair()
    conn = BridgeConnection(Role.SERVER)
    framed = FramedConnection(_FailingStream(a, block=block), conn)
    welcome = Welcome(version=PROTOCOL_VERSION, server="test", identity="bridge", heartbeat_interval=10.0)
    with trio.move_on_after(1) as scope:
        with contextlib.nullcontext() if block else pytest.raises(trio.BrokenResourceError):
            await framed.send(welcome)
    assert scope.cancelled_caught is block
    assert conn.our_state is ConnState.ERROR
    # the stream may hold half a frame: nothing more may be written to it
    with pytest.raises(trio.BrokenResourceError, match="earlier send"):
        await framed.send(Goodbye(code=CloseCode.NORMAL, reason="bye"))


async def test_a_send_cancelled_before_it_starts_changes_nothing() -> None:
    server, client = _bridge_pair()
    welcome = Welcome(version=PROTOCOL_VERSION, server="test", identity="bridge", heartbeat_interval=10.0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.send(welcome)
    assert scope.cancelled_caught
    assert server.conn.our_state is ConnState.AWAIT_GREETING  # nothing committed, nothing broken
    await server.send(welcome)
    assert await client.receive() == welcome


async def test_a_send_cancelled_while_it_waited_for_the_lock_changes_nothing() -> None:
    """The cancellation lands just as the lock is handed over: taken before the state commits."""
    server, client = _bridge_pair()
    welcome = Welcome(version=PROTOCOL_VERSION, server="test", identity="bridge", heartbeat_interval=10.0)
    scope = trio.CancelScope()

    async def sender() -> None:
        with scope:
            await server.send(welcome)

    await server._send_lock.acquire()  # another send in progress
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        server._send_lock.release()  # ownership passes to the waiting sender...
        scope.cancel()  # ...which is cancelled before it runs again
    assert scope.cancelled_caught
    assert server.conn.our_state is ConnState.AWAIT_GREETING  # nothing committed, nothing broken
    await server.send(welcome)
    assert await client.receive() == welcome
