"""A TCP fault proxy for tests and benchmarks (reliability-anchors §9, OpenSSH `modpipe` idea).

In-process (trio)::

    async with open_fault_proxy("127.0.0.1", server_port) as proxy:
        client connects to ("127.0.0.1", proxy.port)
        proxy.set_delay(c2s_ms=10, s2c_ms=10)   # latency, pipelined (not a throughput cap)
        proxy.black_hole()                      # stop forwarding, keep both sockets open
        proxy.reset_all()                       # RST both sides of every connection (SO_LINGER 0)
        proxy.truncate_after(100, "s2c")        # FIN both sides after 100 more server->client bytes
        proxy.flip_bits("c2s", offset=40)       # XOR 0x01 into byte 40 of each connection's c2s stream
        proxy.flip_bits("s2c", rate=0.01, seed=7)   # random flips, seeded
        proxy.drop_after_next_client_write(min_bytes=100)  # black-hole once that write went through
        proxy.pass_through()                    # clear every fault

As a process (the benchmarks use this)::

    python tests/support/faultproxy.py --listen 127.0.0.1:0 --target HOST:PORT --delay-ms 10

prints the bound port on the first stdout line; modes also via flags (`--help`), and at run time
one command per stdin line: `pass`, `delay C2S_MS S2C_MS`, `blackhole`, `reset`, `truncate N DIR`,
`flip DIR OFFSET`, `drop-after-write MIN_BYTES`.

Faults apply to connections already open and to new ones. Every mode is a plain attribute on a
`Direction` so the decision (`Direction.filter`) is sync and testable.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import trio

DirName = Literal["c2s", "s2c"]
_CHUNK = 65536


@dataclass
class Direction:
    """The faults of one direction; `filter` decides what happens to a chunk (sync)."""

    delay_s: float = 0.0
    black_hole: bool = False
    truncate_after: int | None = None  # bytes still allowed before the proxy closes the connection
    flip_offset: int | None = None  # absolute stream offset (per connection) whose low bit flips
    flip_rate: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def clear(self) -> None:
        self.delay_s, self.black_hole, self.truncate_after = 0.0, False, None
        self.flip_offset, self.flip_rate = None, 0.0

    def filter(self, data: bytes, stream_offset: int) -> tuple[bytes, bool]:
        """Return (bytes to forward, close the connection after forwarding them)."""
        if self.black_hole:
            return b"", False
        out = bytearray(data)
        if self.flip_offset is not None and stream_offset <= self.flip_offset < stream_offset + len(out):
            out[self.flip_offset - stream_offset] ^= 0x01
        if self.flip_rate:
            for i in range(len(out)):
                if self.rng.random() < self.flip_rate:
                    out[i] ^= 1 << self.rng.randrange(8)
        close = False
        if self.truncate_after is not None:
            if len(out) >= self.truncate_after:
                out, close = out[: self.truncate_after], True
            self.truncate_after -= len(out)
        return bytes(out), close


@dataclass(eq=False)
class _Conn:
    client: trio.SocketStream
    server: trio.SocketStream
    cancel: trio.CancelScope
    offsets: dict[str, int] = field(default_factory=lambda: {"c2s": 0, "s2c": 0})


def _rst(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """One listening port forwarding to one target, with runtime-switchable faults."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.c2s = Direction()
        self.s2c = Direction()
        self.accepted = 0
        self.bytes_forwarded = {"c2s": 0, "s2c": 0}
        self._conns: set[_Conn] = set()
        self._drop_armed: int | None = None  # min_bytes of the next client write that triggers a drop
        self.dropped = trio.Event()  # set when an armed drop fired

    # -- modes -------------------------------------------------------------------------------
    def pass_through(self) -> None:
        self.c2s.clear()
        self.s2c.clear()
        self._drop_armed = None

    def set_delay(self, c2s_ms: float = 0.0, s2c_ms: float = 0.0) -> None:
        self.c2s.delay_s, self.s2c.delay_s = c2s_ms / 1000, s2c_ms / 1000

    def black_hole(self) -> None:
        self.c2s.black_hole = self.s2c.black_hole = True

    def truncate_after(self, nbytes: int, direction: DirName) -> None:
        self._dir(direction).truncate_after = nbytes

    def flip_bits(
        self, direction: DirName, *, offset: int | None = None, rate: float = 0.0, seed: int = 0
    ) -> None:
        d = self._dir(direction)
        d.flip_offset, d.flip_rate, d.rng = offset, rate, random.Random(seed)

    def drop_after_next_client_write(self, *, min_bytes: int = 1) -> None:
        """Forward the next client->server chunk of >= min_bytes, then black-hole everything."""
        self._drop_armed = min_bytes
        self.dropped = trio.Event()

    def reset_all(self) -> None:
        """RST both sides of every open connection (SO_LINGER 0 then close)."""
        for conn in list(self._conns):
            _rst(conn.client)
            _rst(conn.server)
            conn.cancel.cancel()

    def stream_offsets(self, direction: DirName) -> list[int]:
        """Bytes received so far in `direction`, per open connection (to aim `flip_bits`)."""
        return [conn.offsets[direction] for conn in self._conns]

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def _dir(self, direction: DirName) -> Direction:
        return self.c2s if direction == "c2s" else self.s2c

    # -- plumbing ----------------------------------------------------------------------------
    async def serve(self, listen_host: str, listen_port: int, *, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            try:
                server = await trio.open_tcp_stream(*self.target)
            except OSError:
                _rst(client)
                return
            conn = _Conn(client, server, trio.CancelScope())
            self._conns.add(conn)
            try:
                with conn.cancel:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, conn, "c2s", client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pump, conn, "s2c", server, client, nursery.cancel_scope)
            finally:
                self._conns.discard(conn)
                await trio.aclose_forcefully(server)
        finally:
            await trio.aclose_forcefully(client)

    async def _pump(
        self,
        conn: _Conn,
        name: DirName,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        """Read, filter, and hand to a writer that honours the delay (pipelined latency)."""
        send, recv = trio.open_memory_channel[tuple[float, bytes, bool]](64)
        direction = self._dir(name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, name, recv, dst, scope)
            async with send:
                while True:
                    try:
                        data = await src.receive_some(_CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:  # peer closed: pass the FIN on once queued bytes went out ...
                        if not direction.black_hole:  # ... unless it fell into the black hole
                            await send.send((trio.current_time(), b"", True))
                        return
                    out, close = direction.filter(data, conn.offsets[name])
                    conn.offsets[name] += len(data)
                    drop = name == "c2s" and self._drop_armed is not None and len(data) >= self._drop_armed
                    await send.send((trio.current_time() + direction.delay_s, out, close))
                    if drop:
                        self._drop_armed = None
                        self.black_hole()
                        self.dropped.set()
                    if close:
                        return

    async def _writer(
        self,
        name: DirName,
        recv: trio.MemoryReceiveChannel[tuple[float, bytes, bool]],
        dst: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        async with recv:
            async for due, data, close in recv:
                await trio.sleep_until(due)
                if data:
                    try:
                        await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        scope.cancel()
                        return
                    self.bytes_forwarded[name] += len(data)
                if close:
                    scope.cancel()  # FIN both sides (no TLS close_notify): a truncation
                    return


@contextlib.asynccontextmanager
async def open_fault_proxy(
    target_host: str, target_port: int, *, listen_host: str = "127.0.0.1"
) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(target_host, target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listen_host, 0)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# -- command line ------------------------------------------------------------------------------
def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def apply_command(proxy: FaultProxy, line: str) -> str:
    """Apply one stdin control line; return 'ok' or an error text (sync, testable)."""
    words = line.split()
    try:
        match words:
            case ["pass"]:
                proxy.pass_through()
            case ["delay", c2s, s2c]:
                proxy.set_delay(float(c2s), float(s2c))
            case ["blackhole"]:
                proxy.black_hole()
            case ["reset"]:
                proxy.reset_all()
            case ["truncate", n, ("c2s" | "s2c") as d]:
                proxy.truncate_after(int(n), d)
            case ["flip", ("c2s" | "s2c") as d, offset]:
                proxy.flip_bits(d, offset=int(offset))
            case ["drop-after-write", n]:
                proxy.drop_after_next_client_write(min_bytes=int(n))
            case _:
                return f"error: unknown command {line.strip()!r}"
    except ValueError as exc:
        return f"error: {exc}"
    return "ok"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="TCP fault proxy (prints the bound port on stdout)")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT (port 0 = any)")
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="added latency, each direction")
    p.add_argument("--delay-c2s-ms", type=float, default=None)
    p.add_argument("--delay-s2c-ms", type=float, default=None)
    p.add_argument("--blackhole", action="store_true", help="forward nothing (sockets stay open)")
    p.add_argument("--truncate-after", type=int, default=None, help="close after N server->client bytes")
    p.add_argument("--flip-offset", type=int, default=None, help="flip a bit at this s2c stream offset")
    p.add_argument("--flip-rate", type=float, default=0.0, help="per-byte s2c flip probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-after-client-write", type=int, default=None, metavar="MIN_BYTES")
    return p


def configure(proxy: FaultProxy, args: argparse.Namespace) -> None:
    c2s = args.delay_ms if args.delay_c2s_ms is None else args.delay_c2s_ms
    s2c = args.delay_ms if args.delay_s2c_ms is None else args.delay_s2c_ms
    proxy.set_delay(c2s, s2c)
    if args.blackhole:
        proxy.black_hole()
    if args.truncate_after is not None:
        proxy.truncate_after(args.truncate_after, "s2c")
    if args.flip_offset is not None or args.flip_rate:
        proxy.flip_bits("s2c", offset=args.flip_offset, rate=args.flip_rate, seed=args.seed)
    if args.drop_after_client_write is not None:
        proxy.drop_after_next_client_write(min_bytes=args.drop_after_client_write)


async def _main(args: argparse.Namespace) -> None:
    proxy = FaultProxy(*args.target)
    configure(proxy, args)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.serve, args.listen[0], args.listen[1])
        print(port, flush=True)
        stdin = trio.wrap_file(sys.stdin)
        async for line in stdin:
            if line.strip():
                print(apply_command(proxy, line), flush=True)
        await trio.sleep_forever()  # stdin closed: keep serving until killed


def main(argv: list[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, _parser().parse_args(argv))


if __name__ == "__main__":
    main()
