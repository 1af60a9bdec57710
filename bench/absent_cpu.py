"""CPU of tokenbridge-server while its token is absent (reliability-anchors §7.1 F5: no busy loop).

    .venv/bin/python -m bench.absent_cpu [--window-s 10] [--json out.json]

Two absent tokens, each in a real server process with no client connected:

- `simulated`: the simulated token behind the pyusb backend, pulled with the control socket's
  `simulator.unplug` (the server's presence poll then finds no device);
- `libusb`: a token matched by a VID:PID that is not plugged in, so every presence poll is a
  real libusb enumeration of this machine's buses.

For each it reads the server's utime + stime from /proc/<pid>/stat over the window (CPU time,
not wall clock, so a loaded machine does not inflate it) and reports it as a share of one
core. Exit status 1 when either exceeds `--max-pct` (default 5, the anchor's bound).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from procstack import control

from bridge_admin.local_stack import BridgeStack, wait_for
from protocol.runtime.config import dump_yaml

MAX_PCT = 5.0
# A VID:PID nobody makes (0xF055 is the "FOSS" test vendor ID, product 0x7B7B unassigned).
ABSENT_VID, ABSENT_PID = 0xF055, 0x7B7B


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (proc(5): fields 14 and 15, in clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, window_s: float) -> dict[str, float]:
    """CPU seconds used by `pid` over `window_s` of wall time, and as a percentage of one core."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)  # the measurement window itself, not a wait for a condition
    used, elapsed = cpu_seconds(pid) - start_cpu, time.monotonic() - start
    return {"cpu_s": round(used, 3), "wall_s": round(elapsed, 3), "pct": round(100 * used / elapsed, 2)}


def _server(folder: Path, *, real_usb: bool) -> BridgeStack:
    stack = BridgeStack(folder)
    stack.make_pki(["build-vm-01"])
    config = stack.write_server_config(allow=["build-vm-01"])
    if real_usb:
        doc = yaml.safe_load(config.read_text())
        doc["tokens"][0]["match"] = {"vid": ABSENT_VID, "pid": ABSENT_PID}
        config.write_text(dump_yaml(doc))
    stack.start_server()
    return stack


def _absent(stack: BridgeStack) -> bool:
    tokens = control(stack, "status")["tokens"]
    return not tokens[0]["present"]


def measure(kind: str, folder: Path, window_s: float) -> dict[str, Any]:
    stack = _server(folder, real_usb=kind == "libusb")
    try:
        assert stack.server is not None
        if kind == "simulated":
            control(stack, "simulator.unplug", token="codesign")
        wait_for(lambda: _absent(stack), timeout=30, what=f"the {kind} token to be absent")
        return {"kind": kind, **cpu_share(stack.server.proc.pid, window_s)}
    finally:
        stack.stop()


def run(window_s: float, kinds: tuple[str, ...] = ("simulated", "libusb")) -> list[dict[str, Any]]:
    results = []
    for kind in kinds:
        folder = Path(tempfile.mkdtemp(prefix=f"tb-absent-{kind}-"))
        try:
            results.append(measure(kind, folder, window_s))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.absent_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window-s", type=float, default=10.0, help="measurement window per case")
    parser.add_argument("--max-pct", type=float, default=MAX_PCT, help="fail above this share of one core")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.window_s)
    for r in results:
        share = f"{r['cpu_s']:.3f} s CPU in {r['wall_s']:.1f} s = {r['pct']:.2f} % of a core"
        print(f"{r['kind']:10s} absent: {share}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    over = [r for r in results if r["pct"] > args.max_pct]
    if over:
        print(f"FAIL: above {args.max_pct} % while the token is absent: {[r['kind'] for r in over]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
