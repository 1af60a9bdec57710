"""F5: no busy loop while the token is absent (< 5 % of a core), measured by bench/absent_cpu.py.

The figure comes from the server process's own CPU times (/proc/<pid>/stat), not from wall
clock, so a loaded CI machine cannot make it pass or fail by timing. The long window is
`python -m bench.absent_cpu`; here 4 s per case (the presence poll runs every second).
"""

from __future__ import annotations

import subprocess
import sys

from bench.absent_cpu import MAX_PCT, cpu_seconds, run


def test_the_server_uses_under_5_percent_of_a_core_while_its_token_is_absent() -> None:
    results = run(window_s=4.0)
    assert [r["kind"] for r in results] == ["simulated", "libusb"]
    for r in results:
        assert r["wall_s"] >= 4.0
        assert r["pct"] < MAX_PCT, r


BURN = (
    "import sys, time\n"
    "while time.process_time() < 0.5:\n"
    "    pass\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_the_cpu_probe_reads_the_cpu_a_process_used() -> None:
    """The measurement can fail: a child that burns 0.5 s of CPU reads as at least that much,
    however loaded the machine is (the child counts its own CPU time; no wall clock involved)."""
    with subprocess.Popen(
        [sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        try:
            assert child.stdout.readline() == "burnt\n"
            used = cpu_seconds(child.pid)
        finally:
            child.kill()
    assert used >= 0.5 - 0.02, used  # clock-tick resolution (10 ms)
