"""Soak: hours of lease churn and network faults; reports RSS and fd drift of both daemons.

    .venv/bin/python -m bench.soak --minutes 60 [--fault-every-s 60] [--json out.json]

The long soak is not part of CI (reliability-anchors §7.4 L1); a 30-second one is
(tests/load/test_short_soak.py, same code). Needs no pcscd: the soak plays vpcd itself.
Exit status 1 on overlapping leases or when RSS / open fds drift beyond `--max-rss-drift-pct` /
`--max-fd-drift` (measured from the end of warm-up, `--warmup-fraction`).

    soak (fake vpcd: ATR, power on, SELECT, VERIFY, sign, power off, pause)
      -> tokenbridge-client (real process) -> fault proxy (in this process) -> tokenbridge-server
    soak (CCID-level signer over mTLS, straight to the server, competing for the same token)

Every `--fault-every-s` the proxy applies one fault to the client daemon's connection, in turn:
black hole (for 3 heartbeats + 1 s), RST, TLS truncation, one flipped bit. Every `--sample-s`
it samples VmRSS and open fds of both daemons and checks the simulator's event log for
overlapping leases (control socket `simulator.evidence`). Drift is last sample vs the sample
at the end of warm-up (10 % of the run, at least one sample).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from faultproxy import FaultProxy, open_fault_proxy
from inproc import SELECT_PIV, SIGN_9D, VERIFY_123456, greet
from procstack import SignerLog, client_ssl, control, overlapping_leases, sign_once

from bridge_admin.local_stack import VPCD_BASE_PORT, BridgeStack
from protocol import vpcd
from protocol.runtime.connect import ConnectFailed

HEARTBEAT_S = 2.0


@dataclass
class Counters:
    vpcd_signatures: int = 0
    vpcd_card_removals: int = 0
    ccid_signatures: int = 0
    ccid_reconnects: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    invariant_violations: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def proc_sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_kb": rss_kb, "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


async def vpcd_driver(listener: trio.SocketListener, counters: Counters, pause_s: float) -> None:
    """Play pcscd's vpcd: take the client daemon's card connection and sign through it."""
    rng = random.Random(1)
    while True:
        stream = await listener.accept()
        async with stream:
            reader = vpcd.VpcdReaderSide()

            async def ask(
                payload: bytes, reader: vpcd.VpcdReaderSide = reader, stream: Any = stream
            ) -> bytes:
                await stream.send_all(payload)
                while True:
                    event = reader.next_event()
                    if isinstance(event, vpcd.Response):
                        return event.data
                    if isinstance(event, vpcd.Closed):
                        raise trio.BrokenResourceError("card removed")
                    reader.receive_data(await stream.receive_some(65536))

            try:
                while True:
                    await ask(reader.send_control(vpcd.VpcdControl.GET_ATR))
                    await stream.send_all(reader.send_control(vpcd.VpcdControl.POWER_ON))
                    for command in (SELECT_PIV, VERIFY_123456):
                        assert (await ask(reader.send_apdu(command)))[-2:] == b"\x90\x00"
                    signature = await ask(reader.send_apdu(SIGN_9D))
                    assert signature[-2:] == b"\x90\x00", signature.hex()
                    counters.vpcd_signatures += 1
                    await stream.send_all(reader.send_control(vpcd.VpcdControl.POWER_OFF))
                    await trio.sleep(rng.uniform(0.2, 2) * pause_s)  # around the 0.5 s linger
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                counters.vpcd_card_removals += 1  # a fault removed the card: expected


CONNECTION_LOST = (
    ConnectFailed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


async def ccid_loop(stack: BridgeStack, counters: Counters, pause_s: float) -> None:
    log = SignerLog()
    while True:
        try:
            with trio.fail_after(10):
                greeted = await greet(client_ssl(stack, "soak-vm"), stack.server_port, "soak")
            try:
                while True:
                    with trio.fail_after(30):
                        await sign_once(greeted.conn, log)
                    counters.ccid_signatures += 1
                    await trio.sleep(pause_s)
            finally:
                await greeted.aclose()
        except (
            ConnectFailed,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ):
            counters.ccid_reconnects += 1
            await trio.sleep(1)


async def fault_injector(proxy: FaultProxy, counters: Counters, every_s: float) -> None:
    kinds = ["black_hole", "reset", "truncate", "flip"]
    for n in range(10**9):
        await trio.sleep(every_s)
        kind = kinds[n % len(kinds)]
        counters.faults[kind] = counters.faults.get(kind, 0) + 1
        if kind == "black_hole":
            proxy.black_hole()
            await trio.sleep(3 * HEARTBEAT_S + 1)
            proxy.reset_all()  # what the kernel would do to a connection both ends have given up on
        elif kind == "reset":
            proxy.reset_all()
        elif kind == "truncate":
            proxy.truncate_after(3, "s2c")
            await trio.sleep(HEARTBEAT_S + 1)  # the next server->client bytes trigger it
        else:
            offsets = proxy.stream_offsets("s2c")
            if offsets:
                proxy.flip_bits("s2c", offset=offsets[0] + 20)
            await trio.sleep(HEARTBEAT_S + 1)
        proxy.pass_through()


async def sampler(
    stack: BridgeStack, client_pid: int, counters: Counters, every_s: float, start: float
) -> None:
    while True:
        assert stack.server is not None
        sample = {
            "t_s": round(time.monotonic() - start, 1),
            "server": proc_sample(stack.server.proc.pid),
            "client": proc_sample(client_pid),
            "vpcd_signatures": counters.vpcd_signatures,
            "ccid_signatures": counters.ccid_signatures,
        }
        counters.samples.append(sample)
        evidence = await trio.to_thread.run_sync(
            lambda: control(stack, "simulator.evidence", token="codesign")
        )
        for problem in overlapping_leases(evidence["events"]):
            if problem not in counters.invariant_violations:
                counters.invariant_violations.append(problem)
        print(json.dumps(sample), flush=True)
        await trio.sleep(every_s)


def drift(samples: list[dict[str, Any]], warmup_fraction: float = 0.1) -> dict[str, Any]:
    """Relative change of each daemon's RSS and fds, from the end of warm-up to the last sample."""
    if len(samples) < 2:
        return {}
    base = samples[min(len(samples) - 2, max(1, int(len(samples) * warmup_fraction)))]
    last = samples[-1]
    out: dict[str, Any] = {}
    for daemon in ("server", "client"):
        for key in ("rss_kb", "fds"):
            b, e = base[daemon][key], last[daemon][key]
            out[f"{daemon}.{key}"] = {
                "base": b,
                "end": e,
                "drift_pct": round(100 * (e - b) / b, 2) if b else None,
            }
    out["base_t_s"], out["end_t_s"] = base["t_s"], last["t_s"]
    return out


def drift_violations(drift_doc: dict[str, Any], *, max_rss_pct: float, max_fds: int) -> list[str]:
    """What in `drift(...)` is beyond the limits: RSS growth in %, open fds in absolute count."""
    problems = []
    for daemon in ("server", "client"):
        rss, fds = drift_doc.get(f"{daemon}.rss_kb"), drift_doc.get(f"{daemon}.fds")
        if rss is None or fds is None:
            problems.append(f"{daemon}: fewer than two samples, no drift measured")
            continue
        if rss["drift_pct"] is None or rss["drift_pct"] > max_rss_pct:
            grew = f"{rss['base']} -> {rss['end']} kB ({rss['drift_pct']} %"
            problems.append(f"{daemon} RSS grew {grew}, limit {max_rss_pct} %)")
        if fds["end"] - fds["base"] > max_fds:
            problems.append(f"{daemon} open fds grew {fds['base']} -> {fds['end']} (limit +{max_fds})")
    return problems


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    counters = Counters()
    stack = BridgeStack(
        work / "stack", profiles=["yubikey5"], heartbeat_s=HEARTBEAT_S,
        lease={"linger_s": 0.5, "idle_timeout_s": 60.0},
    )  # fmt: skip
    stack.make_pki(["soak-vm"])
    stack.write_server_config(allow=["soak-vm"])
    await trio.to_thread.run_sync(stack.start_server)
    fake_vpcd = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    vpcd_port = fake_vpcd.socket.getsockname()[1]
    try:
        async with open_fault_proxy("127.0.0.1", stack.server_port) as proxy:
            real_port, stack.server_port = stack.server_port, proxy.port  # the client goes via the proxy
            client = stack.start_client("soak-vm", [vpcd_port - VPCD_BASE_PORT])
            stack.server_port = real_port
            start = time.monotonic()
            with trio.move_on_after(args.minutes * 60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(vpcd_driver, fake_vpcd, counters, args.pause_s)
                    nursery.start_soon(ccid_loop, stack, counters, args.pause_s)
                    nursery.start_soon(fault_injector, proxy, counters, args.fault_every_s)
                    nursery.start_soon(sampler, stack, client.proc.pid, counters, args.sample_s, start)
    finally:
        await fake_vpcd.aclose()
        stack.stop()
    result = asdict(counters)
    result["drift"] = drift(counters.samples, getattr(args, "warmup_fraction", 0.1))
    result["minutes"] = args.minutes
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"soak: {result['minutes']} min, samples {len(result['samples'])}"]
    for key, d in result["drift"].items():
        if isinstance(d, dict):
            lines.append(f"  {key:<16} {d['base']:>9} -> {d['end']:>9}  drift {d['drift_pct']:+.2f} %")
    lines.append(
        f"  signatures: vpcd path {result['vpcd_signatures']}, ccid path {result['ccid_signatures']}; "
        f"card removals {result['vpcd_card_removals']}; faults {result['faults']}"
    )
    lines.append(f"  invariant violations: {len(result['invariant_violations'])}")
    for problem in result.get("drift_violations", []):
        lines.append(f"  DRIFT: {problem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--fault-every-s", type=float, default=60.0)
    p.add_argument("--pause-s", type=float, default=0.5, help="pause between signatures per signer")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--workdir", type=Path, default=None, help="keep configs and daemon logs here")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="drift is measured after this")
    p.add_argument("--max-rss-drift-pct", type=float, default=10.0, help="fail above this RSS growth")
    p.add_argument("--max-fd-drift", type=int, default=4, help="fail above this many extra open fds")
    args = p.parse_args(argv)
    if args.workdir is not None:
        result = trio.run(soak, args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="tokenbridge-soak-") as tmp:
            result = trio.run(soak, args, Path(tmp))
    result["drift_violations"] = drift_violations(
        result["drift"], max_rss_pct=args.max_rss_drift_pct, max_fds=args.max_fd_drift
    )
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["invariant_violations"] or result["drift_violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
