"""The fault proxy itself: each mode does what it says, in-process and as a subprocess."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
from faultproxy import Direction, FaultProxy, apply_command, open_fault_proxy

PROXY_SCRIPT = Path(__file__).resolve().parent.parent / "support" / "faultproxy.py"


class EchoServer:
    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0
        self.changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._echo, listeners)
            task_status.started(self.port)

    async def _echo(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                async for data in stream:
                    self.received += data
                    self.changed.set()
                    self.changed = trio.Event()
                    await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


Connect = Callable[[int], Awaitable[trio.SocketStream]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    streams: list[trio.SocketStream] = []

    async def _connect(port: int) -> trio.SocketStream:
        streams.append(await trio.open_tcp_stream("127.0.0.1", port))
        return streams[-1]

    yield _connect
    for stream in streams:
        await trio.aclose_forcefully(stream)


@pytest.fixture
async def echo(nursery: trio.Nursery) -> EchoServer:
    server = EchoServer()
    await nursery.start(server.run)
    return server


async def test_pass_through_forwards_both_ways(echo: EchoServer, connect: Connect) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        stream = await connect(proxy.port)
        await stream.send_all(b"hello proxy")
        assert await _receive_exactly(stream, 11) == b"hello proxy"
        await stream.aclose()
    assert proxy.accepted == 1


async def test_delay_adds_latency_in_each_direction(echo: EchoServer, connect: Connect) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        proxy.set_delay(c2s_ms=40, s2c_ms=60)
        stream = await connect(proxy.port)
        start = time.monotonic()
        await stream.send_all(b"x")
        assert await _receive_exactly(stream, 1) == b"x"
        assert time.monotonic() - start >= 0.100
        await stream.aclose()


async def test_black_hole_forwards_nothing_and_keeps_the_socket_open(
    echo: EchoServer, connect: Connect
) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        stream = await connect(proxy.port)
        proxy.black_hole()
        await stream.send_all(b"lost")
        with trio.move_on_after(0.3) as scope:
            await stream.receive_some(10)  # neither data nor EOF may arrive
        assert scope.cancelled_caught
        assert echo.received == b""
        assert proxy.open_connections == 1
        proxy.pass_through()
        await stream.send_all(b"back")
        assert await _receive_exactly(stream, 4) == b"back"


async def test_reset_sends_rst_to_the_client(echo: EchoServer, connect: Connect) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        stream = await connect(proxy.port)
        await stream.send_all(b"a")
        await _receive_exactly(stream, 1)
        proxy.reset_all()
        with pytest.raises(trio.BrokenResourceError):
            with trio.fail_after(5):
                await stream.receive_some(10)


async def test_truncate_closes_after_n_bytes(echo: EchoServer, connect: Connect) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        proxy.truncate_after(5, "s2c")
        stream = await connect(proxy.port)
        await stream.send_all(b"0123456789")
        with trio.fail_after(5):
            assert await _receive_exactly(stream, 10) == b"01234"  # then EOF


async def test_flip_at_offset_changes_exactly_one_bit(echo: EchoServer, connect: Connect) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        proxy.flip_bits("c2s", offset=3)
        stream = await connect(proxy.port)
        await stream.send_all(b"\x00" * 8)
        assert await _receive_exactly(stream, 8) == b"\x00\x00\x00\x01\x00\x00\x00\x00"


def test_random_flips_are_reproducible_from_the_seed() -> None:
    def run(seed: int) -> bytes:
        d = Direction()
        d.flip_rate, d.rng = 0.05, __import__("random").Random(seed)
        return d.filter(bytes(1000), 0)[0]

    assert run(3) == run(3)
    assert run(3) != bytes(1000)
    assert run(3) != run(4)


def test_truncation_counts_across_chunks() -> None:
    d = Direction(truncate_after=5)
    assert d.filter(b"abc", 0) == (b"abc", False)
    assert d.filter(b"defg", 3) == (b"de", True)


async def test_drop_after_next_client_write_lets_that_write_through_only(
    echo: EchoServer, connect: Connect
) -> None:
    async with open_fault_proxy("127.0.0.1", echo.port) as proxy:
        stream = await connect(proxy.port)
        await stream.send_all(b"hi")  # below min_bytes: not the trigger
        assert await _receive_exactly(stream, 2) == b"hi"
        proxy.drop_after_next_client_write(min_bytes=10)
        await stream.send_all(b"APDU-0123456789")
        with trio.fail_after(5):
            await proxy.dropped.wait()
        with trio.move_on_after(0.3) as scope:
            await stream.receive_some(100)  # the echo (the "response") is dropped
        assert scope.cancelled_caught
        with trio.fail_after(5):
            while bytes(echo.received) != b"hiAPDU-0123456789":
                await echo.changed.wait()


def test_control_commands_switch_modes() -> None:
    proxy = FaultProxy("127.0.0.1", 1)
    assert apply_command(proxy, "delay 1 10") == "ok"
    assert (proxy.c2s.delay_s, proxy.s2c.delay_s) == (0.001, 0.01)
    assert apply_command(proxy, "blackhole") == "ok"
    assert proxy.c2s.black_hole and proxy.s2c.black_hole
    assert apply_command(proxy, "pass") == "ok"
    assert not proxy.s2c.black_hole and proxy.s2c.delay_s == 0
    assert apply_command(proxy, "bogus").startswith("error")
    assert apply_command(proxy, "truncate x s2c").startswith("error")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


def test_runs_as_a_subprocess_and_prints_its_port() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as echo:
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        target = f"127.0.0.1:{echo.server_address[1]}"
        proc = subprocess.Popen(
            [sys.executable, str(PROXY_SCRIPT), "--listen", "127.0.0.1:0", "--target", target,
             "--delay-ms", "30"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdin is not None
            port = int(proc.stdout.readline())
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                start = time.monotonic()
                sock.sendall(b"ping")
                assert sock.recv(10) == b"ping"
                assert time.monotonic() - start >= 0.060
                proc.stdin.write("blackhole\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "ok"
                sock.sendall(b"gone")
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(10)
        finally:
            proc.kill()
            proc.communicate()
            echo.shutdown()
