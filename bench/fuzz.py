"""Fuzzing that searches: the tests/fuzz targets, for a time budget, with new inputs every round.

    make fuzz                                 # FUZZ_MINUTES=10 by default
    .venv/bin/python -m bench.fuzz --minutes 30 [--examples 2000] [--json out.json]

In CI the fuzz targets are derandomised at a few hundred examples each (tests/conftest.py
profile `ci`), so every run feeds them the same inputs: a regression net, not a search. This
runs the same targets in rounds until the budget is spent. Each round is one pytest run with

- fresh random inputs: no `--hypothesis-seed` (Hypothesis then seeds every target from the OS;
  a forced seed would also switch the example database off),
- `TOKENBRIDGE_FUZZ_EXAMPLES` examples per target (tests/fuzz/fuzz_support.py),
- the Hypothesis profile `fuzz`: an example database in `.hypothesis-fuzz/` (gitignored, kept
  between runs), so a failing input found once is replayed first by every later run until fixed.

The round that is running when the budget ends is stopped (SIGTERM to the pytest process
this started) and counted as cut short, not as failed. Exit status: 0 when every round
passed, 1 when one failed, 2 on a usage error. A failure reproduces by running the printed
command again (the database replays it first) or from the `@reproduce_failure` blob. A
crasher worth keeping for CI goes into the target as `@example(...)` or as a file in
`tests/fuzz/corpus/<target>/` (see fuzz_support.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB = ROOT / ".hypothesis-fuzz"
TARGETS = "tests/fuzz"


@dataclass
class Round:
    number: int
    seconds: float
    outcome: str  # passed | failed | cut_short
    tail: str = ""


@dataclass
class FuzzRun:
    minutes: float
    examples_per_target: int
    rounds: list[Round] = field(default_factory=list)

    @property
    def clean_seconds(self) -> float:
        return sum(r.seconds for r in self.rounds if r.outcome != "failed")


def pytest_command(targets: str) -> list[str]:
    # No per-test timeout: one target at thousands of examples may take minutes.
    return [sys.executable, "-m", "pytest", targets, "-q", "-x", "-o", "timeout=0"]


def run_round(number: int, examples: int, remaining_s: float, targets: str, db: Path = DB) -> Round:
    env = dict(os.environ)
    env.pop("CI", None)
    env.update(
        TOKENBRIDGE_HYPOTHESIS_PROFILE="fuzz",
        TOKENBRIDGE_FUZZ_EXAMPLES=str(examples),
        TOKENBRIDGE_FUZZ_DB=str(db),
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        pytest_command(targets), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(timeout=max(1.0, remaining_s))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return Round(number, round(time.monotonic() - started, 1), "cut_short")
    outcome = "passed" if proc.returncode == 0 else "failed"
    tail = "" if outcome == "passed" else "\n".join(out.decode(errors="replace").splitlines()[-60:])
    return Round(number, round(time.monotonic() - started, 1), outcome, tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("FUZZ_MINUTES", "10")))
    parser.add_argument("--examples", type=int, default=2000, help="examples per target per round")
    parser.add_argument("--targets", default=TARGETS, help="pytest path(s) (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.examples <= 0:
        parser.error("--minutes and --examples must be positive")
    run = FuzzRun(args.minutes, args.examples)
    deadline = time.monotonic() + args.minutes * 60
    print(f"fuzzing {args.targets} for {args.minutes:g} min, {args.examples} examples/target/round, db {DB}")
    while (remaining := deadline - time.monotonic()) > 5:
        rnd = run_round(len(run.rounds) + 1, args.examples, remaining, args.targets)
        run.rounds.append(rnd)
        print(f"  round {rnd.number}: {rnd.outcome} in {rnd.seconds:.1f} s", flush=True)
        if rnd.outcome == "failed":
            print(rnd.tail)
            repro = " ".join(pytest_command(args.targets))
            env = f"TOKENBRIDGE_HYPOTHESIS_PROFILE=fuzz TOKENBRIDGE_FUZZ_EXAMPLES={args.examples}"
            print(f"\nreproduce: {env} {repro}")
            break
    failed = any(r.outcome == "failed" for r in run.rounds)
    summary = {**asdict(run), "clean_seconds": run.clean_seconds, "failed": failed}
    print(f"{'FAILED' if failed else 'clean'}: {run.clean_seconds / 60:.1f} min without a failure")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
