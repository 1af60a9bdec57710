"""`python -m bench.roundtrips`: round trips and time per signature over a delayed link (issue 17).

For each delay (fault proxy, D ms each way) and each mode (`speculation: true`, the default, and
`speculation: false`, i.e. no taught paths and no GET RESPONSE prefetch), a fresh server with a
simulated safenet-5110 and a client reaching it through the proxy:

- **cold**: the first signature after `tokenbridge token reset` (the server forgets every path,
  as after a re-plug), so nothing is taught yet;
- **warm**: the next signatures (the card already used once since the reset).

Each signature runs in a lease of its own (we wait for the lease to end: pcscd's power-off grace
plus our linger), so its first APDU meets a freshly reset card, as on a build VM that signs
a file now and then. Round trips are the server's count for that lease (`lease.ended
round_trips`: the lease request or `LeaseExchange`, then every CCID frame), including the
power-off pcscd sends after the tool has exited; time is the tool's wall time.

    .venv/bin/python -m bench.roundtrips [--delays 0 1 10 25] [--warm 3] [--json out.json]

Needs pcscd with one vpcd slot free; about 5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from bench import run
from bench.stats import machine
from bridge_admin.local_stack import BridgeStack, DemoError, claim_vpcd_slot, wait_for
from bridge_admin.signing_tools import read_certificate_pem
from protocol.runtime.config import dump_yaml

SETTLE_S = 2.0
FAILURES: list[str] = []  # signatures that failed and were retried
TOOLS: dict[str, Callable[[int, Path], float]] = {
    "pkcs11-tool": run.pkcs11_sign,
    "osslsigncode": run.ossl_sign,
}


@contextlib.contextmanager
def _stack(slot: int, work: Path, *, speculation: bool, log_level: str = "info") -> Iterator[BridgeStack]:
    stack = BridgeStack(work, profiles=[run.PROFILE], log_level=log_level)
    try:
        stack.make_pki([run.CLIENT])
        path = stack.write_server_config(allow=[run.CLIENT])
        doc = yaml.safe_load(path.read_text())
        for token in doc["tokens"]:
            token["speculation"] = speculation
        path.write_text(dump_yaml(doc))
        stack.start_server()
        stack.wait_card(slot, stack.start_client(run.CLIENT, [slot]))
        yield stack
    finally:
        stack.stop()


def _leases(stack: BridgeStack) -> list[dict[str, object]]:
    assert stack.server is not None
    out = []
    for line in stack.server.log_path.read_text().splitlines():
        if '"lease.ended"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _client_events(stack: BridgeStack) -> list[str]:
    """The client's last lease endings, removals and server errors (why a signature failed)."""
    events = []
    for log in stack.workdir.glob("client-*.log"):
        for line in log.read_text().splitlines()[-200:]:
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                if d.get("event") in ("lease.ended", "reader.removed", "server.error"):
                    events.append(f"{d['event']}: {d.get('reason') or d.get('code')}")
    return events[-4:]


def _one(stack: BridgeStack, slot: int, work: Path, tool: str) -> dict[str, float]:
    """One signature in a lease of its own: wall time and the lease's round trips and APDUs."""
    for attempt in range(2):
        before = len(_leases(stack))
        try:
            with run.only_reader(slot, work):
                seconds = TOOLS[tool](slot, work)
        except DemoError as exc:  # reported, then retried once: the table says how often
            why = _client_events(stack)
            print(f"  {tool} failed (attempt {attempt + 1}): {str(exc).splitlines()[-2:]} {why}", flush=True)
            FAILURES.append(f"{tool}: {exc} {why}")
            wait_for(lambda n=before: len(_leases(stack)) > n, timeout=60, what="the failed lease to end")
            continue
        wait_for(lambda n=before: len(_leases(stack)) > n, timeout=60, what="the lease to end")
        lease = _leases(stack)[-1]
        return {
            "s": round(seconds, 4),
            "round_trips": int(lease["round_trips"]),
            "apdus": int(lease["apdus"]),
        }  # type: ignore[call-overload]
    raise RuntimeError(f"{tool} failed twice in a row: {FAILURES[-1]}")


def _reset(stack: BridgeStack, slot: int, daemon: object) -> None:
    """`tokenbridge token reset`: the server forgets every taught path (a cold card)."""
    assert stack.server is not None
    attached = stack.server.log_path.read_text().count('"device.attached"')
    name = stack.token_names[0]
    socket = str(stack.workdir / "control.sock")
    cmd = [sys.executable, "-m", "bridge_admin", "token", "reset", name, "--socket", socket]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    wait_for(
        lambda: stack.server.log_path.read_text().count('"device.attached"') > attached,  # type: ignore[union-attr]
        timeout=30,
        what="the token back after its reset",
    )
    # The reader is removed and inserted again within milliseconds; give pcscd time to see both
    # (it polls), or the tool's first APDUs meet a reader in the middle of its card change.
    time.sleep(SETTLE_S)
    stack.wait_card(slot, daemon)  # type: ignore[arg-type]


def _clean(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of the runs with the fewest APDUs: pcscd is shared, and another program that
    enumerates every reader (another user's OpenSC) adds its APDUs to our lease now and then."""
    fewest = min(r["apdus"] for r in runs)
    clean = sorted((r for r in runs if r["apdus"] == fewest), key=lambda r: r["s"])
    return {**clean[len(clean) // 2], "clean_runs": len(clean), "runs": len(runs)}


def measure(
    slot: int,
    work: Path,
    delays: list[float],
    warm: int,
    modes: list[bool],
    log_level: str = "info",
    cold_tries: int = 2,
) -> dict[str, object]:
    results: dict[str, object] = {}
    for speculation in modes:
        for delay in delays:
            tag = f"{'on' if speculation else 'off'}-{delay:g}ms"
            print(f"speculation {'on' if speculation else 'off'}, {delay:g} ms each way ...", flush=True)
            sub = work / tag
            with (
                _stack(slot, sub, speculation=speculation, log_level=log_level) as stack,
                run.client_via_proxy(stack, slot, delay) as daemon,
            ):
                cert = sub / f"cert-{slot}.pem"
                with run.only_reader(slot, sub):
                    read_certificate_pem(slot, "01", cert)  # osslsigncode needs it; a lease of its own
                wait_for(lambda: bool(_leases(stack)), timeout=60, what="the certificate lease to end")
                per_tool: dict[str, object] = {}
                for tool in TOOLS:
                    colds = []
                    for _ in range(cold_tries):
                        _reset(stack, slot, daemon)
                        colds.append(_one(stack, slot, sub, tool))
                    warms = [_one(stack, slot, sub, tool) for _ in range(warm)]
                    per_tool[tool] = {"cold": _clean(colds), "warm": _clean(warms), "runs": colds + warms}
                results[tag] = per_tool
    return results


def rows(results: dict[str, object]) -> list[tuple[str, str, str, str]]:
    out = []
    for tag, per_tool in results.items():
        for tool, runs in per_tool.items():  # type: ignore[attr-defined]
            cold, warm = runs["cold"], runs["warm"]
            out.append(
                (
                    f"{tag} {tool}",
                    f"{cold['round_trips']} / {warm['round_trips']}",
                    f"{cold['s']:.3f} / {warm['s']:.3f} s",
                    f"{cold['apdus']} / {warm['apdus']}",
                )
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roundtrips", description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", type=float, nargs="+", default=[0.0, 1.0, 10.0, 25.0], help="ms each way")
    p.add_argument("--warm", type=int, default=4, help="warm signatures per tool (median reported)")
    p.add_argument("--cold", type=int, default=2, help="cold signatures per tool, each after a reset")
    p.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    p.add_argument("--keep", type=Path, default=None, help="keep the stacks' folders (logs) here")
    p.add_argument("--log-level", default="info", help="the daemons' (debug logs every APDU)")
    p.add_argument(
        "--modes", nargs="+", default=["on", "off"], choices=["on", "off"], help="speculation modes"
    )
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = args.keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenbridge-roundtrips-"))
        )
        slot = stack.enter_context(claim_vpcd_slot())
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results = measure(
            slot, tmp, args.delays, args.warm, [m == "on" for m in args.modes], args.log_level, args.cold
        )
    doc = {"machine": machine(), "started": started, "results": results, "failures": FAILURES}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    header = ("speculation-delay tool", "round trips cold / warm", "time cold / warm", "APDUs cold / warm")
    lines = [header, *rows(results)]
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    print(f"signatures that failed and were retried: {len(FAILURES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
