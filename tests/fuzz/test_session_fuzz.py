"""Fuzz the server's dispatcher: arbitrary frame sequences into `serve_session` over memory
streams, with a token manager and a card behind it (p11-kit rpc_fuzzer pattern, reliability
§2.1 and §7.2 B1).

Pass criteria: the session answers or closes with a clear error (Goodbye with a close code,
ErrorMessage, or EOF); it never logs `session.crashed`; when it ends, no task it started is
left running, it is gone from the hub, it holds no lease and waits in no queue; and the token
still serves the next client.
"""

from __future__ import annotations

import contextlib
import json
from functools import partial

import structlog
import trio
import trio.testing
from fuzz_support import budget
from hypothesis import example, given
from hypothesis import strategies as st
from server_fakes import FakeDevice, identity, make_manager

from bridge_server.net.hub import Hub
from bridge_server.net.session import SessionContext, serve_session
from protocol import ccid, wire
from protocol.connection import BridgeConnection, Role
from protocol.runtime.framed import FramedConnection

EPOCH = 1000  # make_manager's first epoch
HEARTBEAT = 10.0


class SturdyCard:
    """A card driver that answers anything (the fuzz target is the server, not the fake)."""

    async def power_on(self) -> bytes:
        return bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4")

    async def power_off(self) -> None:
        return None

    async def transmit(self, apdu: bytes) -> bytes:
        return apdu[:16] + b"\x90\x00"

    async def slot_present(self) -> bool:
        return True


def _frame(ftype: int, payload: bytes) -> bytes:
    return bytes([ftype, 0]) + len(payload).to_bytes(4, "big") + payload


_CCID_MESSAGES = st.one_of(
    st.builds(lambda s: ccid.icc_power_on(s).encode(), st.integers(0, 255)),
    st.builds(lambda s: ccid.icc_power_off(s).encode(), st.integers(0, 255)),
    st.builds(lambda s: ccid.get_slot_status(s).encode(), st.integers(0, 255)),
    st.builds(lambda s, d: ccid.xfr_block(s, d).encode(), st.integers(0, 255), st.binary(max_size=40)),
    st.builds(lambda s: ccid.abort(s).encode(), st.integers(0, 255)),
    st.binary(min_size=10, max_size=40),
    st.binary(min_size=1, max_size=8).map(lambda b: b"\x50" + b),  # interrupt-sized
)
_EPOCHS = st.sampled_from((EPOCH, EPOCH + 1, 0, 0xFFFFFFFF))
_TOKENS = st.sampled_from((0, 0, 0, 1, 0xFFFF))
_MESSAGES = st.one_of(
    st.builds(lambda t: wire.LeaseRequest(token_id=t), _TOKENS),
    st.builds(lambda t, e: wire.LeaseRelease(token_id=t, epoch=e), _TOKENS, _EPOCHS),
    st.builds(
        lambda t, e, m: wire.CcidFrame(token_id=t, epoch=e, message=m), _TOKENS, _EPOCHS, _CCID_MESSAGES
    ),
    st.builds(lambda n: wire.Ping(nonce=n), st.integers(0, 0xFFFFFFFF)),
    st.builds(lambda n: wire.Pong(nonce=n), st.integers(0, 0xFFFFFFFF)),
    st.builds(lambda a: wire.AdminRequest(request_id=1, action=a, args={}), st.sampled_from(("status", "x"))),
    st.builds(lambda c: wire.ErrorMessage(code=c, message="m"), st.sampled_from(wire.ErrorCode)),
    st.just(wire.ClientHello(version=1, software="again")),
    st.just(wire.LeaseGranted(token_id=0, epoch=EPOCH, atr=b"\x3b\x00")),  # server-only
    st.just(wire.Welcome(version=1, server="x", identity="y", heartbeat_interval=1.0)),
    st.just(wire.Goodbye(code=wire.CloseCode.NORMAL, reason="bye")),
)
_ITEMS = st.one_of(
    _MESSAGES.map(wire.encode_message),
    _MESSAGES.map(wire.encode_message),
    _MESSAGES.map(wire.encode_message),
    st.builds(_frame, st.sampled_from([int(t) for t in wire.FrameType]), st.binary(max_size=48)),
    st.builds(
        _frame,
        st.sampled_from([int(t) for t in wire.FrameType if t is not wire.FrameType.CCID]),
        st.dictionaries(st.text(max_size=6), st.integers() | st.text(max_size=4), max_size=4).map(
            lambda d: json.dumps(d).encode()
        ),
    ),
    st.binary(min_size=1, max_size=24),
)


async def _drain(stream: trio.abc.Stream) -> bytes:
    """Read what the server says until EOF or until it has nothing more to say for now."""
    got = bytearray()
    while True:
        with trio.move_on_after(3 * HEARTBEAT + 1) as quiet:
            chunk = await stream.receive_some(65536)
        if quiet.cancelled_caught or not chunk:
            return bytes(got)
        got += chunk


async def _fuzz_session(hello: bool, items: list[bytes]) -> list[dict[str, object]]:
    hub = Hub()
    device = FakeDevice()
    device.card = SturdyCard()  # type: ignore[assignment]
    manager = make_manager(hub, device, allow=("vm1",))
    ctx = SessionContext(hub=hub, tokens=[manager], admins=(), heartbeat_s=HEARTBEAT)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            baseline = len(nursery.child_tasks)
            client, server = trio.testing.memory_stream_pair()
            done = trio.Event()

            async def run_server() -> None:
                await serve_session(server, identity("vm1"), ctx, peer="fuzz")
                done.set()

            nursery.start_soon(run_server)
            with trio.fail_after(3600):  # virtual seconds: a hang shows up as a timeout
                stream = (
                    wire.encode_message(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="fuzz"))
                    if hello
                    else b""
                )
                stream += b"".join(items)
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.send_all(stream)
                await _drain(client)
                await client.aclose()
                await done.wait()
                await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == baseline, "the session left tasks behind"
            assert len(hub) == 0
            assert manager.book.holder is None and not manager.book.waiting
            await _still_serves(ctx, nursery)
            nursery.cancel_scope.cancel()
    return logs


async def _still_serves(ctx: SessionContext, nursery: trio.Nursery) -> None:
    """A fresh, well-behaved client still gets a lease and an ATR."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(partial(serve_session, server_stream, identity("vm1"), ctx, peer="fuzz2"))
    client = FramedConnection(client_stream, BridgeConnection(Role.CLIENT))
    with trio.fail_after(600):
        assert isinstance(await client.receive(), wire.Welcome)
        await client.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="next"))
        await client.send(wire.LeaseRequest(token_id=0))
        while not isinstance(msg := await client.receive(), wire.LeaseGranted):
            assert isinstance(msg, wire.TokenStatus | wire.LeaseQueued | wire.Ping | wire.SpeculationPaths), (
                msg
            )
        await client_stream.aclose()


@budget(300)
@given(hello=st.booleans() | st.just(True), items=st.lists(_ITEMS, max_size=12))
# Crashers found by this target (both logged session.crashed before the fix in session.py):
# a silent client: the heartbeat Goodbye and the third Ping raced, the Ping went after Goodbye;
@example(hello=True, items=[])
# Goodbye as the client's first frame: the session registered it and sent TokenStatus.
@example(hello=False, items=[b'\x7f\x00\x00\x00\x00\x19{"code":0,"reason":"bye"}'])
def test_session_answers_or_closes_cleanly_whatever_the_client_sends(hello: bool, items: list[bytes]) -> None:
    logs = trio.run(_fuzz_session, hello, items, clock=trio.testing.MockClock(autojump_threshold=0))
    events = [e["event"] for e in logs]
    assert "session.crashed" not in events, [e for e in logs if e["event"] == "session.crashed"]
    closed = [e for e in logs if e["event"] == "session.closed"]
    assert len(closed) == 2  # the fuzzed session and the well-behaved one, one summary line each
