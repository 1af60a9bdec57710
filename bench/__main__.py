"""`make bench`: measure the bridge against DESIGN §9 and write bench/results/<time>.json.

Exits 1 when a budget is missed (bench/budget.py: the known, documented misses only warn
unless `--strict`, as long as they are no worse than recorded), after printing the table.

    .venv/bin/python -m bench [--apdus N] [--sign-runs K] [--clients 200] [--quick] [--profiles ...]

Each profile is compared against two direct baselines in turn: "card" (PIV card straight to vpcd)
and "usb" (the same simulated USB token and host stack, no bridge; `simulator --via-usb`).

Needs pcscd with both vpcd slots free (it claims them like the e2e tests do).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import run
from bench.budget import BUDGETS, Checked, summary
from bench.stats import machine, table
from bridge_admin.local_stack import BridgeStack

RESULTS = Path(__file__).parent / "results"


def _compare(args: argparse.Namespace, work: Path, direct_slot: int, bridge_slot: int) -> dict[str, object]:
    """Latency, APDU/s and both signing tools: the direct baseline in slot A vs the bridge."""
    entry: dict[str, object] = {"latency": run.interleaved_latency(direct_slot, bridge_slot, args.apdus)}
    if not args.quick:
        entry["pkcs11_sign"] = run.side_by_side(
            run.pkcs11_sign, direct_slot, bridge_slot, work, args.sign_runs
        )
        entry["osslsigncode_sign"] = run.side_by_side(
            run.ossl_sign, direct_slot, bridge_slot, work, args.sign_runs
        )
    return entry


def _collect(args: argparse.Namespace, work: Path) -> dict[str, object]:
    out: dict[str, object] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    profiles: dict[str, dict[str, object]] = {}
    out["profiles"] = profiles
    with run.claim_vpcd_slot() as direct_slot, run.claim_vpcd_slot() as bridge_slot:
        out["slots"] = {"direct": direct_slot, "bridge": bridge_slot}
        for profile in args.profiles:
            per = profiles[profile] = {}
            pwork = work / profile  # own PIV keys and cached certificates per profile
            pwork.mkdir()
            with run.bridge(bridge_slot, pwork, profile) as stack:
                for baseline in run.BASELINES:
                    print(f"{profile}: direct ({baseline}) vs bridge, interleaved ...", flush=True)
                    with run.direct_simulator(direct_slot, pwork, profile, baseline):
                        per[baseline] = _compare(args, pwork, direct_slot, bridge_slot)
                if args.quick or profile != run.PROFILE:
                    continue
                with run.direct_simulator(direct_slot, pwork, profile, "usb"):
                    _server_side(args, out, stack, pwork, direct_slot, bridge_slot)
    return out


def _server_side(
    args: argparse.Namespace,
    out: dict[str, object],
    stack: BridgeStack,
    work: Path,
    direct: int,
    bridged: int,
) -> None:
    """Round trips, RSS, idle clients and network delay (profile safenet-5110, usb baseline)."""
    print("round trips per signature ...", flush=True)
    out["round_trips"] = run.round_trips(stack, bridged, work, 4)
    out["rss_idle"] = run.daemon_rss(stack)
    print(f"{args.clients} idle clients ...", flush=True)
    with run.swarm(stack, args.clients):
        out["rss_with_clients"] = {**run.daemon_rss(stack), "clients": args.clients}
        out["latency_with_clients"] = run.interleaved_latency(direct, bridged, args.apdus // 2)
    for delay in (0.0, 1.0, 10.0):
        print(f"added network delay {delay:g} ms each way ...", flush=True)
        with run.client_via_proxy(stack, bridged, delay):
            entry: dict[str, object] = {"latency": run.interleaved_latency(direct, bridged, args.delay_apdus)}
            entry["pkcs11_sign"] = run.side_by_side(run.pkcs11_sign, direct, bridged, work, 1)
            out[f"delay_{delay:g}ms"] = entry


Row = tuple[str, str, str, str]


def _check(checks: list[Checked], metric: str, measured: str, key: str, value: float) -> Row:
    """A budget row: its verdict comes from bench/budget.py and is collected for the exit status."""
    checked = Checked(metric, measured, key, float(value))
    checks.append(checked)
    return (metric, measured, BUDGETS[key].text, checked.status)


def _latency_rows(tag: str, lat: dict, checks: list[Checked]) -> list[Row]:  # type: ignore[type-arg]
    p50, p99 = lat["added_p50_ms"], lat["added_p99_ms"]
    return [
        _check(checks, f"{tag} added p50", f"{p50:.3f} ms", "added_p50_ms", p50),
        _check(checks, f"{tag} added p99", f"{p99:.3f} ms", "added_p99_ms", p99),
        (
            f"{tag} direct / bridge p50",
            f"{lat['direct']['p50_ms']:.3f} / {lat['bridge']['p50_ms']:.3f} ms",
            "-",
            "",
        ),
        _check(
            checks,
            f"{tag} APDU/s",
            f"{lat['bridge_apdu_per_s']} (direct {lat['direct_apdu_per_s']})",
            "apdu_per_s",
            lat["bridge_apdu_per_s"],
        ),
    ]


def _sign_rows(tag: str, entry: dict, checks: list[Checked]) -> list[Row]:  # type: ignore[type-arg]
    if "pkcs11_sign" not in entry:
        return []
    p, o = entry["pkcs11_sign"], entry["osslsigncode_sign"]
    measured = f"{p['bridge_s']:.3f} s vs {p['direct_s']:.3f} s = {p['ratio']}x"
    return [
        _check(checks, f"{tag} pkcs11-tool --sign", measured, "sign_ratio", p["ratio"]),
        (f"{tag} osslsigncode", f"{o['bridge_s']:.3f} s vs {o['direct_s']:.3f} s = {o['ratio']}x", "-", ""),
    ]


def _rows(r: dict, checks: list[Checked]) -> list[Row]:  # type: ignore[type-arg]
    rows: list[Row] = []
    for profile, per in r["profiles"].items():
        for baseline, entry in per.items():
            tag = f"{profile} vs {baseline}:"
            rows += _latency_rows(tag, entry["latency"], checks) + _sign_rows(tag, entry, checks)
    if "round_trips" not in r:
        return rows
    rows.append(("round trips per sign", f"{r['round_trips']['round_trips_per_sign']}", "reported", ""))
    idle, busy = r["rss_idle"], r["rss_with_clients"]
    lw = r["latency_with_clients"]
    n = busy["clients"]
    rows += [
        _check(
            checks,
            "RSS idle server/client",
            f"{idle['server_mb']} / {idle['client_mb']} MB",
            "rss_mb",
            max(idle["server_mb"], idle["client_mb"]),
        ),
        _check(
            checks,
            f"RSS with {n} clients",
            f"{busy['server_mb']} / {busy['client_mb']} MB",
            "rss_mb",
            max(busy["server_mb"], busy["client_mb"]),
        ),
        _check(
            checks,
            f"added p50 with {n} clients (vs usb)",
            f"{lw['added_p50_ms']:.3f} ms",
            "added_p50_with_clients_ms",
            lw["added_p50_ms"],
        ),
    ]
    for key in ("delay_0ms", "delay_1ms", "delay_10ms"):
        d = r[key]
        rows.append(
            (
                f"{key}: added p50 / sign ratio (vs usb)",
                f"{d['latency']['added_p50_ms']:.2f} ms / {d['pkcs11_sign']['ratio']}x",
                "reported",
                "",
            )
        )
    return rows


def report(result: dict, *, strict: bool) -> tuple[str, int]:  # type: ignore[type-arg]
    """The table, the verdict lines under it, and the exit status (bench/budget.py)."""
    checks: list[Checked] = []
    text = table(_rows(result, checks))
    lines, status = summary(checks, strict=strict)
    return text + "\n\n" + "\n".join(lines), status


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--apdus", type=int, default=2000, help="timed APDUs per side (default 2000)")
    p.add_argument("--delay-apdus", type=int, default=200)
    p.add_argument("--sign-runs", type=int, default=5)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="latency only (the smoke test's mode)")
    p.add_argument(
        "--profiles",
        nargs="+",
        default=list(run.PROFILES),
        choices=list(run.PROFILES),
        help="simulated tokens to compare (default: safenet-5110 yubikey5)",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--strict", action="store_true", help="fail on the known budget misses too (bench/budget.py)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokenbridge-bench-") as tmp:
        result = _collect(args, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    text, status = report(result, strict=args.strict)
    print(text)
    print(f"\nmachine: {result['machine']}\nresults: {out}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
