"""Holder latency under request floods (issue 13 item 3): quiet vs flooded, side by side.

    .venv/bin/python -m bench.floods [--seconds 5] [--rounds 2] [--json out.json]

Needs no pcscd. The real `tokenbridge-server` process (two simulated yubikey5 tokens, audit log
on) serves two CCID-level clients over mutual TLS on loopback:

- the *holder* leases token 0 and sends `SELECT PIV` back to back, timing each round trip;
- the *flooder* (another identity, in its own process) either re-sends `LeaseRequest` for token 0 while queued
  behind the holder ("lease-request flood"), or leases token 1 and sends PIV `PUT DATA`, which
  the policy refuses ("refusal flood"). It reads its answers (at most 16 outstanding) and, when
  the server disconnects it, reconnects and starts over, for the whole phase.

Phases alternate quiet / flood (`--rounds` times each) so machine noise hits both alike. Per
phase: the holder's p50/p99 and APDU count, the audit log's growth, and the flooder's
reconnects (= disconnects by the server). The figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from inproc import SELECT_PIV, apdu, expect, greet, power_on
from procstack import client_ssl

from bench.stats import summarize_ms
from bridge_admin.local_stack import BridgeStack
from protocol import ccid, wire
from protocol.runtime.connect import ConnectFailed, ConnectRefused
from protocol.runtime.framed import FramedConnection

REPO = Path(__file__).resolve().parents[1]
HOLDER = "bench-holder"
MAX_ROUNDS = 10


def flooder_name(index: int) -> str:
    """A fresh identity per flood phase: a banned one (flood_limits.PenaltyBox) floods no more."""
    return f"bench-flooder-{index}"


PUT_DATA = bytes.fromhex("00DB3FFF055C035FC10A")  # PIV PUT DATA: refused for non-admins
WINDOW = 16

Flood = Callable[[FramedConnection], Awaitable[None]]


class Flooder:
    """One flood for one phase: connect, flood until disconnected, reconnect; count it all."""

    def __init__(self, stack: BridgeStack, name: str) -> None:
        self.stack = stack
        self.name = name
        self.sent = 0
        self.connections = 0

    async def run(self, start: Flood) -> None:
        while True:  # until the phase's cancel scope ends it
            try:
                greeted = await greet(client_ssl(self.stack, self.name), self.stack.server_port, "flooder")
            except ConnectRefused:  # banned for flooding: the server answered, so it counts
                self.connections += 1
                continue
            except (ConnectFailed, OSError, trio.BrokenResourceError):
                await trio.sleep(0.05)
                continue
            self.connections += 1
            try:
                await start(greeted.conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError, AssertionError):
                pass
            finally:
                await greeted.aclose()

    async def flood(self, client: FramedConnection, make: Callable[[int], object]) -> None:
        """Send `make(i)` with at most WINDOW unanswered, until the server says Goodbye."""
        window = trio.Semaphore(WINDOW)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, client, window, nursery.cancel_scope)
            for i in range(1 << 62):
                await window.acquire()
                await client.send(make(i))
                self.sent += 1

    async def _reader(
        self, client: FramedConnection, window: trio.Semaphore, scope: trio.CancelScope
    ) -> None:
        while True:
            msg = await client.receive()
            if isinstance(msg, wire.Goodbye | wire.ConnectionClosed):
                scope.cancel()
                return
            if isinstance(msg, wire.Ping):
                await client.send(wire.Pong(nonce=msg.nonce))
            elif isinstance(msg, wire.ErrorMessage):
                window.release()

    async def lease_requests(self, client: FramedConnection) -> None:
        await client.send(wire.LeaseRequest(token_id=0))
        await expect(client, wire.LeaseQueued)
        await self.flood(client, lambda _: wire.LeaseRequest(token_id=0))

    async def refusals(self, client: FramedConnection) -> None:
        await client.send(wire.LeaseRequest(token_id=1))
        granted = await expect(client, wire.LeaseGranted)
        power = ccid.icc_power_on(0).encode()
        await client.send(wire.CcidFrame(token_id=1, epoch=granted.epoch, message=power))
        await expect(client, wire.CcidFrame)
        await self.flood(client, lambda i: refused_frame(granted.epoch, i + 1))


def refused_frame(epoch: int, seq: int) -> wire.CcidFrame:
    return wire.CcidFrame(token_id=1, epoch=epoch, message=ccid.xfr_block(seq % 256, PUT_DATA).encode())


async def holder_phase(client: FramedConnection, epoch: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    seq = 1
    while time.monotonic() < deadline:
        start = time.perf_counter()
        assert (await apdu(client, epoch, seq % 256, SELECT_PIV))[-2:] == b"\x90\x00"
        latencies.append(time.perf_counter() - start)
        seq += 1
    return latencies


async def phase(
    stack: BridgeStack, holder: FramedConnection, epoch: int, seconds: float, flood: str | None, flooder: str
) -> dict[str, Any]:
    audit = stack.workdir / "audit.jsonl"
    size_before = audit.stat().st_size
    counts = {"sent": 0, "connections": 0}
    if flood is None:
        latencies = await holder_phase(holder, epoch, seconds)
    else:
        async with flooder_process(stack, flood, flooder, counts):
            latencies = await holder_phase(holder, epoch, seconds)
    return {
        "flood": flood or "quiet",
        "holder_ms": summarize_ms(latencies),
        "holder_apdus": len(latencies),
        "audit_bytes": audit.stat().st_size - size_before,
        "flood_messages": counts["sent"],
        "flooder_connections": counts["connections"],
    }


@asynccontextmanager
async def flooder_process(
    stack: BridgeStack, flood: str, name: str, counts: dict[str, int]
) -> AsyncIterator[None]:
    """The flooder in its own process (it must not share the holder's event loop)."""
    args = [sys.executable, "-m", "bench.floods", "--flooder", flood, "--workdir", str(stack.workdir)]
    args += ["--port", str(stack.server_port), "--name", name]
    async with trio.open_nursery() as nursery:
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "check": False, "cwd": REPO}
        proc = await nursery.start(partial(trio.run_process, args, **pipes))
        assert proc.stdout is not None
        assert proc.stdin is not None
        with trio.fail_after(30):
            assert await proc.stdout.receive_some(64) == b"ready\n"
        await trio.sleep(0.2)  # let the flood start before timing the holder
        try:
            yield
        finally:
            await proc.stdin.aclose()  # the flooder stops, prints its counts and exits
            with trio.fail_after(10):
                out = b""
                while chunk := await proc.stdout.receive_some(4096):
                    out += chunk
            counts.update(json.loads(out))


async def run_flooder(flood: str, workdir: Path, port: int, name: str) -> None:
    stack = BridgeStack(workdir, profiles=["yubikey5", "yubikey5"], server_port=port)
    flooder = Flooder(stack, name)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flooder.run, getattr(flooder, flood))
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await trio.wrap_file(sys.stdin).read()  # until the bench closes our stdin
        nursery.cancel_scope.cancel()
    sys.stdout.write(json.dumps({"sent": flooder.sent, "connections": flooder.connections}))
    sys.stdout.flush()


async def floods(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    stack = BridgeStack(
        work / "stack", profiles=["yubikey5", "yubikey5"], heartbeat_s=2.0,
        lease={"linger_s": 0.5, "idle_timeout_s": 60.0},
    )  # fmt: skip
    names = [HOLDER] + [flooder_name(i) for i in range(2 * args.rounds)]
    stack.make_pki(names)
    stack.write_server_config(allow=names)
    await trio.to_thread.run_sync(stack.start_server)
    phases: list[dict[str, Any]] = []
    try:
        greeted = await greet(client_ssl(stack, HOLDER), stack.server_port, "holder")
        holder = greeted.conn
        try:
            await holder.send(wire.LeaseRequest(token_id=0))
            granted = await expect(holder, wire.LeaseGranted)
            await power_on(holder, granted.epoch)
            await holder_phase(holder, granted.epoch, 0.5)  # warm-up
            for r in range(args.rounds):
                for i, flood in enumerate((None, "lease_requests", None, "refusals")):
                    name = flooder_name(2 * r + i // 2)
                    phases.append(await phase(stack, holder, granted.epoch, args.seconds, flood, name))
        finally:
            await greeted.aclose()
    finally:
        stack.stop()
    return {"seconds": args.seconds, "phases": phases, "summary": summarize(phases)}


def summarize(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Per flood: its holder p50/p99 against the quiet phase just before it (paired, so the
    machine's drift over the run cancels out), the median over the rounds."""
    out: dict[str, Any] = {}
    for name in ("lease_requests", "refusals"):
        pairs = [(phases[i - 1], p) for i, p in enumerate(phases) if p["flood"] == name]
        p50 = [p["holder_ms"]["p50_ms"] / q["holder_ms"]["p50_ms"] for q, p in pairs]
        p99 = [p["holder_ms"]["p99_ms"] / q["holder_ms"]["p99_ms"] for q, p in pairs]
        out[name] = {
            "p50_vs_quiet_pct": round((statistics.median(p50) - 1) * 100, 1),
            "p99_vs_quiet_pct": round((statistics.median(p99) - 1) * 100, 1),
            "audit_bytes_max": max(p["audit_bytes"] for _, p in pairs),
            "flooder_connections_max": max(p["flooder_connections"] for _, p in pairs),
        }
    return out


def render(result: dict[str, Any]) -> str:
    lines = [f"holder SELECT latency, {result['seconds']} s phases (p50 / p99 ms, APDUs, audit bytes):"]
    for p in result["phases"]:
        ms = p["holder_ms"]
        lines.append(
            f"  {p['flood']:<15} {ms['p50_ms']:7.3f} / {ms['p99_ms']:7.3f}  {p['holder_apdus']:6d} APDUs  "
            f"audit +{p['audit_bytes']:>8} B  flood {p['flood_messages']:>6} msgs, "
            f"{p['flooder_connections']} connections"
        )
    for name in ("lease_requests", "refusals"):
        s = result["summary"][name]
        lines.append(
            f"  {name}: p50 {s['p50_vs_quiet_pct']:+.1f} %, p99 {s['p99_vs_quiet_pct']:+.1f} % "
            "vs the quiet phase before it (median over rounds)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--rounds", type=int, default=2, choices=range(1, MAX_ROUNDS + 1), metavar="1..10")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--workdir", type=Path, default=None, help="keep configs and daemon logs here")
    p.add_argument("--flooder", choices=["lease_requests", "refusals"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--name", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flooder is not None:  # the child process of flooder_process()
        trio.run(run_flooder, args.flooder, args.workdir, args.port, args.name)
        return 0
    if args.workdir is not None:
        result = trio.run(floods, args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="tokenbridge-floods-") as tmp:
            result = trio.run(floods, args, Path(tmp))
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
