"""A trio adapter that runs a sans-I/O `BridgeConnection` over a `trio.abc.Stream`.

Theory of operation (trio-websocket over wsproto, style-anchors §1.6): the state machine owns
every protocol decision; this class only moves bytes. `send()` serialises through the state
machine and writes under one FIFO lock, so frames from concurrent tasks never interleave and
leave in the order the state machine accepted them. `receive()` asks the state machine for an
event and reads from the stream only when it says NEED_DATA, in bounded chunks (the state
machine checks frame lengths from the header before buffering, DESIGN §3).

Errors are not translated: `RemoteProtocolError` from the state machine, and
`trio.BrokenResourceError` / `trio.ClosedResourceError` from the stream, reach the caller as-is
so the session task can pick the close code. A send that raises or is cancelled half-way
leaves the stream unusable (trio's rule for `send_all`): the adapter then calls the state
machine's `send_failed()` (our side moves to ERROR, as in h11) and every later `send` raises
`trio.BrokenResourceError` without touching the stream; the session must close it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio
import trio.lowlevel

from protocol._sentinel import NEED_DATA

if TYPE_CHECKING:
    from protocol.connection import BridgeConnection, ConnectionClosed
    from protocol.wire import Message

__all__ = ["RECEIVE_CHUNK", "FramedConnection"]

# Largest single read from the stream. Bounded so one receive never buffers more than this
# beyond what the state machine has length-checked; 64 KiB covers a whole CCID frame in a
# couple of reads.
RECEIVE_CHUNK: Final = 65536


class FramedConnection:
    """`BridgeConnection` over a stream: one send lock, one reader at a time."""

    def __init__(
        self, stream: trio.abc.Stream, conn: BridgeConnection, *, receive_chunk: int = RECEIVE_CHUNK
    ):
        if receive_chunk < 1:
            raise ValueError(f"receive_chunk must be >= 1, got {receive_chunk}")
        self.stream = stream
        self.conn = conn
        self._receive_chunk = receive_chunk
        # StrictFIFOLock: senders go out in the order they asked (trio docs, "Lock fairness").
        self._send_lock = trio.StrictFIFOLock()
        self._receiving = False
        self._send_broken = False

    async def send(self, msg: Message) -> None:
        """Serialise `msg` through the state machine and write it whole before the next send."""
        async with self._send_lock:
            if self._send_broken:
                raise trio.BrokenResourceError("an earlier send on this connection failed half-way")
            # A cancellation that arrived while we waited for the lock is taken here, before
            # the state machine commits anything (no checkpoint between this and send_all's
            # own first check: trio streams write nothing when cancelled on entry).
            await trio.lowlevel.checkpoint_if_cancelled()
            # Inside the lock: the order on the wire equals the order the state machine saw.
            data = self.conn.send(msg)
            try:
                await self.stream.send_all(data)
            except BaseException:  # trio.Cancelled included: part of the frame may be out
                self._send_broken = True
                self.conn.send_failed()
                raise

    async def receive(self) -> Message | ConnectionClosed:
        """The next message, or `ConnectionClosed` once the peer's EOF has been processed."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        try:
            while True:
                event = self.conn.next_event()
                if event is not NEED_DATA:
                    return event
                # b"" is EOF; the state machine turns it into ConnectionClosed (or an error
                # if it arrives mid-frame).
                data = await self.stream.receive_some(self._receive_chunk)
                self.conn.receive_data(bytes(data))
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Close the stream (for TLS, sends close_notify). Idempotent, as trio streams are."""
        await self.stream.aclose()
