"""The first lines a long-running command prints (`--watch`), read without sleeps, then it is stopped."""

from __future__ import annotations

import subprocess

import trio


async def read_lines(argv: list[str], count: int, *, within: float = 30.0) -> list[str]:
    """Start `argv`, return its first `count` stdout lines, kill it; fail after `within` seconds."""
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    buf = b""
    try:
        with trio.fail_after(within):
            while buf.count(b"\n") < count:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, f"the command ended early: {buf!r}"
                buf += chunk
    finally:
        proc.kill()
        await proc.wait()
    return buf.decode().splitlines()[:count]
