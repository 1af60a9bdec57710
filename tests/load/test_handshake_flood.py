"""1,000 unauthenticated sockets from one source must not lock out an allowed client (issue 13 item 2).

The attacker keeps 1,000 TCP connections open to the listener from 127.0.0.1 (silent, or having
sent the first 40 bytes of a real ClientHello) and re-opens each one the server drops. Meanwhile
an allowed client connects, takes a lease and signs through the simulator; it must finish within
1 s of the time the same work takes on a quiet server. The server runs with its default limits.

Bounded: at most FLOOD sockets at once (the test raises its own soft fd limit if it has to and
skips when the hard limit is too low), every socket is closed at the end, and the fd count
returns to its baseline.
"""

from __future__ import annotations

import os
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from flood_peer import raise_fd_limit
from inproc import (
    SELECT_PIV,
    SIGN_9D,
    SW_OK,
    VERIFY_123456,
    Pki,
    apdu,
    expect,
    open_fds,
    open_greeted_client,
    power_on,
    running_server,
    wait_until,
)

from protocol import wire

FLOOD = 1_000
ALLOWED_SLACK_S = 1.0  # the goal: within 1 s of the quiet time
WORST_SLACK_S = 3.0  # and never anywhere near the client's 10 s connect deadline
ATTEMPTS = 5
CLIENT_GIVES_UP_S = 15.0


def ensure_fd_room(needed: int) -> None:
    if not raise_fd_limit(needed):
        problem = f"needs {needed} file descriptors, more than the hard limit"
        if os.environ.get("CI") == "true":
            pytest.fail(problem + " (CI runs as root, which may raise it)")
        pytest.skip(problem)


def client_hello_prefix(pki: Pki, size: int) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = pki.client().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()[:size]


async def connect_and_sign(pki: Pki, port: int) -> float:
    """Seconds for one allowed client: TLS, greeting, lease, power on, SELECT, VERIFY, SIGN."""
    start = time.monotonic()
    with trio.fail_after(CLIENT_GIVES_UP_S):
        async with open_greeted_client(pki.client(), port) as client:
            await client.send(wire.LeaseRequest(token_id=0))
            msg = await expect(client, wire.LeaseGranted | wire.Refused | wire.ErrorMessage)
            assert isinstance(msg, wire.LeaseGranted), msg
            await power_on(client, msg.epoch)
            for seq, command in enumerate((SELECT_PIV, VERIFY_123456, SIGN_9D), start=1):
                assert (await apdu(client, msg.epoch, seq, command))[-2:] == SW_OK
            elapsed = time.monotonic() - start
            await client.send(wire.LeaseRelease(token_id=0, epoch=msg.epoch))
    return elapsed


@asynccontextmanager
async def flood(port: int, first_bytes: bytes) -> AsyncIterator[None]:
    """FLOOD sockets from another process (an attacker does not share our event loop)."""
    script = Path(__file__).with_name("flood_peer.py")
    args = [sys.executable, str(script), str(port), str(FLOOD), first_bytes.hex()]
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(trio.run_process, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        )
        try:
            with trio.fail_after(30):
                assert proc.stdout is not None
                assert await proc.stdout.receive_some(64) == b"ready\n"
            yield
        finally:
            assert proc.stdin is not None
            await proc.stdin.aclose()  # the attacker closes every socket and exits
            with trio.move_on_after(10):
                await proc.wait()
            proc.kill()


@pytest.mark.parametrize("first_bytes", [0, 40], ids=["silent", "partial-hello"])
async def test_an_allowed_client_signs_within_1s_of_quiet_while_1000_sockets_hold_the_listener(
    tmp_path: Path, first_bytes: int
) -> None:
    ensure_fd_room(open_fds() + 2 * FLOOD + 256)  # the server's ends of the flood
    pki = Pki(tmp_path)
    prefix = client_hello_prefix(pki, first_bytes) if first_bytes else b""
    async with running_server(tmp_path, heartbeat_s=5.0) as (server, port):
        quiet = min([await connect_and_sign(pki, port) for _ in range(3)])
        await wait_until(lambda: server.tokens[0].book.holder is None, what="lease release", within=5)
        baseline = open_fds()
        async with flood(port, prefix):
            loaded = [await connect_and_sign(pki, port) for _ in range(ATTEMPTS)]
        await wait_until(lambda: open_fds() <= baseline, what=f"fds back to {baseline}", within=10)
    print(f"handshake flood ({first_bytes} bytes each): quiet {quiet:.3f} s, under the flood {loaded}")
    # The goal is judged on the typical attempt (a 2-core machine running the flood peer, the
    # server and this client has outliers); no attempt may come near the client's 10 s give-up,
    # where the review's lock-out sat (9.3-9.6 s), let alone be refused.
    assert statistics.median(loaded) <= quiet + ALLOWED_SLACK_S, (
        f"quiet {quiet:.3f} s, under the flood {loaded}"
    )
    assert max(loaded) <= quiet + WORST_SLACK_S, f"quiet {quiet:.3f} s, under the flood {loaded}"
