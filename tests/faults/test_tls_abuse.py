"""Bad input at the TLS listener (reliability-anchors §7.2 B7): garbage, slowloris, floods.

The server's limits (`limits` in the config, bridge_server/net/listener.py): at most
`max_handshakes` handshakes in flight, each bounded by `handshake_timeout_s` counted from
accept (queueing for a handshake slot included), the ClientHello within the first-flight
deadline (at most `handshake_timeout_s`), at most `max_connections` sessions.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from inproc import (
    SELECT_PIV,
    SIGN_9D,
    VERIFY_123456,
    Pki,
    apdu,
    open_fds,
    open_lease,
    power_on,
    raw_client,
    running_server,
    wait_until,
)
from structlog.testing import capture_logs

import bridge_server.app
from bridge_server.net.listener import ConnectionHandler

HANDSHAKE_TIMEOUT_S = 1.0
MAX_HANDSHAKES = 8
LIMITS = {"max_handshakes": MAX_HANDSHAKES, "handshake_timeout_s": HANDSHAKE_TIMEOUT_S, "max_connections": 64}


class RecordingHandler(ConnectionHandler):
    """The real handler, remembered so a test can read its counters."""

    instances: list[RecordingHandler] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingHandler.instances.append(self)


@asynccontextmanager
async def limited_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, int]]:
    RecordingHandler.instances = []
    monkeypatch.setattr(bridge_server.app, "ConnectionHandler", RecordingHandler)
    async with running_server(tmp_path, heartbeat_s=0.5, limits=LIMITS) as (server, port):
        yield server, port


def client_hello(pki: Pki) -> bytes:
    """The bytes of a real TLS 1.3 ClientHello from a legitimate client context."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = pki.client().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Read until the server closes (EOF or RST)."""
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass
    return True


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\xff\xff" + b"\x00" * 64,  # handshake record claiming 65535 bytes, then silence
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello of 1 byte
    b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(37),  # SSLv2-style hello
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert instead of a hello
    os.urandom(0) + bytes(range(256)) * 4,
]


@pytest.mark.parametrize(
    "garbage", GARBAGE, ids=["http", "huge-record", "tiny-hello", "sslv2", "alert", "bytes"]
)
async def test_garbage_client_hellos_are_dropped_within_the_handshake_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, garbage: bytes
) -> None:
    pki = Pki(tmp_path)
    with capture_logs() as logs:
        async with limited_server(tmp_path, monkeypatch) as (_server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                start = time.monotonic()
                await stream.send_all(garbage)
                with trio.fail_after(HANDSHAKE_TIMEOUT_S + 1):
                    assert await closed_by_server(stream)
                assert time.monotonic() - start <= HANDSHAKE_TIMEOUT_S + 0.5
            # ... and the server still serves a legitimate client.
            async with raw_client(pki, port) as client:
                granted = await open_lease(client)
                assert granted.epoch > 0
    failures = [e for e in logs if e["event"] == "tls.handshake_failed"]
    assert len(failures) == 1 and failures[0]["reason"]


async def test_a_slowloris_handshake_is_cut_at_the_handshake_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = Pki(tmp_path)
    hello = client_hello(pki)
    with capture_logs() as logs:
        async with limited_server(tmp_path, monkeypatch) as (_server, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                start = time.monotonic()
                with trio.fail_after(HANDSHAKE_TIMEOUT_S + 2):
                    try:
                        for byte in hello:  # one byte every 50 ms: ~15 s for the whole hello
                            await stream.send_all(bytes([byte]))
                            await trio.sleep(0.05)
                    except trio.BrokenResourceError:
                        pass
                    assert await closed_by_server(stream)
                elapsed = time.monotonic() - start
    assert HANDSHAKE_TIMEOUT_S - 0.1 <= elapsed <= HANDSHAKE_TIMEOUT_S + 0.5, elapsed
    reasons = [e["reason"] for e in logs if e["event"] == "tls.handshake_failed"]
    assert len(reasons) == 1 and reasons[0].startswith("handshake timed out"), reasons


async def _sign_loop(pki: Pki, port: int, latencies: list[float], stop: trio.Event) -> None:
    async with raw_client(pki, port) as client:
        granted = await open_lease(client)
        await power_on(client, granted.epoch)
        seq = 1
        while not stop.is_set():
            for command in (SELECT_PIV, VERIFY_123456, SIGN_9D):
                start = time.monotonic()
                assert (await apdu(client, granted.epoch, seq % 256, command))[-2:] == b"\x90\x00"
                latencies.append(time.monotonic() - start)
                seq += 1


@pytest.mark.parametrize("sends_partial_hello", [False, True])
async def test_500_half_open_handshakes_do_not_stall_a_signing_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sends_partial_hello: bool
) -> None:
    pki = Pki(tmp_path)
    partial = client_hello(pki)[:40]
    async with limited_server(tmp_path, monkeypatch) as (server, port):
        async with raw_client(pki, port) as warm:  # lazily created fds and caches
            await open_lease(warm)
        await wait_until(lambda: server.tokens[0].book.holder is None, what="lease release", within=5)
        baseline = open_fds()
        latencies: list[float] = []
        stop = trio.Event()
        attackers: list[trio.SocketStream] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sign_loop, pki, port, latencies, stop)
            await wait_until(lambda: len(latencies) >= 3, what="signing to start", within=10)
            flood_start = len(latencies)
            for _ in range(500):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                attackers.append(stream)
                if sends_partial_hello:
                    await stream.send_all(partial)
            handler = RecordingHandler.instances[0]
            # The flood really is in the server: the waiting room is full, the rest evicted.
            assert handler.pending >= 100 and handler.book.evictions >= 300, handler.book.evictions
            # Every stuck handshake is reaped within handshake_timeout_s of its accept.
            reaped_s = await wait_until(lambda: handler.pending == 0, what="reaping", within=10)
            assert reaped_s <= HANDSHAKE_TIMEOUT_S + 1.0, f"reaping took {reaped_s:.2f} s"
            stop.set()
        during = latencies[flood_start:]
        assert len(during) >= 3, "the legitimate client made no progress during the flood"
        assert max(during) < 0.5, f"slowest APDU during the flood: {max(during):.3f} s"
        assert handler.peak_handshakes <= MAX_HANDSHAKES
        # A new legitimate connection is accepted again right after the flood.
        async with raw_client(pki, port) as client:
            await open_lease(client)
        for stream in attackers:
            await trio.aclose_forcefully(stream)
        await wait_until(lambda: open_fds() <= baseline, what=f"fds back to {baseline}", within=5)
