"""`make mutation`: mutation testing of the modules whose mistakes lock a token, leak a PIN or answer wrong.

    .venv/bin/python -m bench.mutation [MODULE ...] [--survivors-only] [--report-only] [--min-score 90]

For each module in turn (highest value first), mutmut 2.x changes one thing in the source (an
operator, a constant, a keyword...), runs only the fast unit tests that exercise that module, and
records whether they failed ("killed") or passed ("survived"). Each module keeps its own result
cache in `.mutation/<module>.sqlite`, so a later `--survivors-only` run re-tests only the mutants
that survived last time (what you want after writing a test) and `--report-only` re-prints.

Survivors that are equivalent (no test could tell them apart from the original) are listed with a
reason in `bench/mutation/equivalent.toml`, the one reviewed place; the score leaves them out. The run
fails if a module scores below `--min-score` or an equivalence entry no longer matches anything.
How long it takes, how often to run it and the recorded scores: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".mutation"
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.toml"
CACHE = ROOT / ".mutmut-cache"  # where mutmut 2.x keeps its results (the current directory)


@dataclass(frozen=True)
class Target:
    source: str
    tests: tuple[str, ...]


def load_targets(path: Path) -> dict[str, Target]:
    """The modules to mutate, from `targets.toml` (one line each); a clear error for a bad entry."""
    with path.open("rb") as f:
        doc = tomllib.load(f)
    targets = {}
    for name, entry in doc.items():
        where = f"{path.name}: {name}"
        if not isinstance(entry, dict) or set(entry) != {"source", "tests"}:
            raise ValueError(f'{where}: expected {{ source = "path.py", tests = ["tests/...py", ...] }}')
        source, tests = entry["source"], entry["tests"]
        if not isinstance(source, str) or not isinstance(tests, list) or not tests:
            raise ValueError(f"{where}: source is one path, tests a non-empty list of paths")
        for file in (source, *tests):
            if not isinstance(file, str) or not (ROOT / file).is_file():
                raise ValueError(f"{where}: {file!r} is not a file under {ROOT}")
        targets[name] = Target(source, tuple(tests))
    return targets


TARGETS_FILE = Path(__file__).resolve().parent / "targets.toml"
TARGETS: dict[str, Target] = {}  # filled from TARGETS_FILE by main()


@dataclass
class Mutant:
    ident: str
    line: int
    status: str  # "killed" | "survived" | "timeout" | "untested"
    before: str = ""
    after: str = ""
    diff: str = ""
    function: str = ""  # the enclosing def, to tell apart two identical lines


@dataclass
class Score:
    module: str
    mutants: list[Mutant] = field(default_factory=list)
    equivalent: list[Mutant] = field(default_factory=list)
    seconds: float | None = None

    def count(self, status: str) -> int:
        return sum(m.status == status for m in self.mutants)

    @property
    def survivors(self) -> list[Mutant]:
        return [m for m in self.mutants if m.status in ("survived", "untested") and m not in self.equivalent]

    @property
    def percent(self) -> float:
        judged = len(self.mutants) - len(self.equivalent)
        return 100.0 if judged == 0 else 100.0 * (judged - len(self.survivors)) / judged


def _mutmut(*args: str, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # Derandomised Hypothesis (tests/conftest.py): the same examples for every mutant.
    env["TOKENBRIDGE_HYPOTHESIS_PROFILE"] = "ci"
    # mutmut rewrites the source in place; a stale .pyc of the same size and second would hide it.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [str(Path(sys.executable).parent / "mutmut"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=quiet, check=False)


def _runner(target: Target) -> str:
    # -p no:randomly: the same order every time; -x: a kill needs only the first failing test.
    return (
        f"{sys.executable} -m bench.mutation.pytest_exit -x -q -p no:randomly -p no:cacheprovider "
        + " ".join(target.tests)
    )


def _keep_kills(cache: Path) -> None:
    """Mark every mutant but the survivors as tested against the tests as they are now.

    mutmut re-runs a mutant when the tests changed since it was judged; adding a test cannot
    revive a killed mutant, so after writing tests only the survivors (and mutants of lines that
    changed, which mutmut registers as new) need running again.
    """
    from mutmut.cache import hash_of_tests  # type: ignore[import-untyped]  # the mutation extra

    current = hash_of_tests(["tests/"])  # what `mutmut run --tests-dir tests/` compares against
    with sqlite3.connect(cache) as db:
        db.execute(
            "UPDATE Mutant SET tested_against_hash = ? WHERE status NOT IN ('bad_survived', 'untested')",
            (current,),
        )
        # and the survivors always again: a test file added to targets.toml leaves tests/ as it
        # was, and mutmut (which hashes tests/, not the runner) would otherwise skip them
        db.execute(
            "UPDATE Mutant SET tested_against_hash = 'retest' WHERE status IN ('bad_survived', 'untested')"
        )


def _not_retested(cache: Path, current: str) -> list[str]:
    """Survivors a `mutmut run` left judged against tests older than `current` (their hash).

    mutmut 2.5.1 sometimes ends a run before the last queued mutants of a file (seen on the last
    lines of protocol/t1.py): those are re-tested one by one (`mutmut run ID`). `current` is the
    hash taken when the run started, so editing a test meanwhile does not re-run every survivor.
    """
    with sqlite3.connect(cache) as db:
        rows = db.execute(
            "SELECT id FROM Mutant WHERE status IN ('bad_survived', 'untested') AND "
            "(tested_against_hash IS NULL OR tested_against_hash != ?)",
            (current,),
        ).fetchall()
    return [str(row[0]) for row in rows]


def _run(name: str, target: Target, survivors_only: bool) -> float:
    source = ROOT / target.source
    if Path(f"{source}.bak").exists():
        sys.exit(f"mutation: {source}.bak exists: an interrupted run left it; restore {source} from it first")
    STATE.mkdir(exist_ok=True)
    cache = STATE / f"{name}.sqlite"
    CACHE.unlink(missing_ok=True)
    if survivors_only and cache.exists():
        shutil.copy(cache, CACHE)
        os.chdir(ROOT)
        _keep_kills(CACHE)
    common = ["--paths-to-mutate", target.source, "--runner", _runner(target), "--tests-dir", "tests/"]
    from mutmut.cache import hash_of_tests

    tests_hash = hash_of_tests(["tests/"])  # what this run's mutmut judges against
    start = time.monotonic()
    try:
        done = _mutmut("run", *common, "--simple-output", "--no-progress")
        (STATE / f"{name}.log").write_text(done.stdout + done.stderr)  # mutmut's own account of the run
        if done.returncode & 1:
            sys.exit(f"mutation: mutmut failed on {target.source}:\n{done.stdout}\n{done.stderr}")
        for ident in _not_retested(CACHE, tests_hash):
            print(f"mutation: {name}: mutant {ident} was left out of the run; testing it alone", flush=True)
            _mutmut("run", *common, "--simple-output", "--no-progress", ident)
    finally:
        if CACHE.exists():
            shutil.move(CACHE, cache)
    return time.monotonic() - start


def _changed_lines(diff: str) -> tuple[str, str]:
    body = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    before = " / ".join(line[1:].strip() for line in body if line.startswith("-"))
    after = " / ".join(line[1:].strip() for line in body if line.startswith("+"))
    return before, after


def _enclosing_defs(source: Path) -> list[str]:
    """For each line (1-based index), the name of the innermost def it is in ("" at module level)."""
    names, stack = [""], [(-1, "")]
    for line in source.read_text().splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if stripped and not stripped.startswith((")", "]", "}")):  # not the end of a signature
            while indent <= stack[-1][0]:
                stack.pop()
            if stripped.startswith(("def ", "async def ")):
                stack.append((indent, stripped.split("def ", 1)[1].split("(", 1)[0]))
        names.append(stack[-1][1])
    return names


def _collect(name: str, target: Target) -> list[Mutant]:
    cache = STATE / f"{name}.sqlite"
    if not cache.exists():
        return []
    shutil.copy(cache, CACHE)
    try:
        xml = _mutmut("junitxml", "--untested-policy", "error").stdout
    finally:
        CACHE.unlink(missing_ok=True)
    mutants = []
    defs = _enclosing_defs(ROOT / target.source)
    # S314: the XML is mutmut's report of our own cache, written a moment ago, not foreign input.
    for case in ET.fromstring(xml).iter("testcase"):
        if case.get("file") != target.source:
            continue
        status, diff = "killed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                message = child.get("message", "")
                status = {"bad_survived": "survived", "bad_timeout": "timeout"}.get(message, "untested")
                diff = child.text or ""
        ident = (case.get("name") or "").removeprefix("Mutant #")
        before, after = _changed_lines(diff)
        line = int(case.get("line") or 0)
        function = defs[line] if 0 < line < len(defs) else ""
        mutants.append(Mutant(ident, line, status, before, after, diff, function))
    return mutants


def _equivalents() -> list[dict[str, str]]:
    with EQUIVALENT.open("rb") as f:
        entries: list[dict[str, str]] = tomllib.load(f).get("mutant", [])
    for entry in entries:
        missing = {"file", "before", "after", "reason"} - entry.keys()
        if missing or not entry["reason"].strip():
            sys.exit(f"mutation: {EQUIVALENT}: entry {entry} needs file, before, after and a reason")
    return entries


def _mark_equivalent(score: Score, target: Target, entries: list[dict[str, str]], used: set[int]) -> None:
    for mutant in score.mutants:
        if mutant.status not in ("survived", "untested"):
            continue
        for n, entry in enumerate(entries):
            if (
                entry["file"] in ("*", target.source)
                and (entry["before"], entry["after"]) == (mutant.before, mutant.after)
                and entry.get("function", mutant.function) == mutant.function
            ):
                score.equivalent.append(mutant)
                used.add(n)
                break


def _print(scores: list[Score], verbose: bool) -> None:
    print("\n| module | mutants | killed | timeout | survived | equivalent | score w/o equivalents | time |")
    print("|---|---|---|---|---|---|---|---|")
    for s in scores:
        seconds = "" if s.seconds is None else f"{s.seconds / 60:.1f} min"
        print(
            f"| `{TARGETS[s.module].source}` | {len(s.mutants)} | {s.count('killed')} | {s.count('timeout')} "
            f"| {len(s.survivors)} | {len(s.equivalent)} | {s.percent:.1f} % | {seconds} |"
        )
    if not verbose:
        return
    for s in scores:
        for m in s.survivors:
            where = f"{TARGETS[s.module].source}:{m.line} ({m.function or 'module level'})"
            print(f"\n# {where} mutant {m.ident} {m.status}")
            print(f"  before: {m.before}\n  after:  {m.after}")


def main() -> None:
    if CACHE.exists():
        # Another run in this tree is using it (mutmut 2.x keeps it in the current directory);
        # --report-only and a new run would both replace it under that run's feet.
        sys.exit(
            f"mutation: {CACHE} exists: another `make mutation` is running here (or was killed: delete it)"
        )
    try:
        TARGETS.update(load_targets(TARGETS_FILE))
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        sys.exit(f"mutation: {exc}")
    parser = argparse.ArgumentParser(prog="python -m bench.mutation", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"default all: {', '.join(TARGETS)}")
    parser.add_argument("--survivors-only", action="store_true", help="re-test only last run's survivors")
    parser.add_argument("--report-only", action="store_true", help="print the recorded results, run nothing")
    parser.add_argument("--min-score", type=float, default=90.0, help="fail below this score (default 90)")
    parser.add_argument("--quiet", action="store_true", help="do not list the survivors")
    args = parser.parse_args()
    unknown = set(args.modules) - TARGETS.keys()
    if unknown:
        parser.error(f"unknown module {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    entries = _equivalents()
    used: set[int] = set()
    scores = []
    for name in args.modules or list(TARGETS):
        target = TARGETS[name]
        seconds = None
        if not args.report_only:
            print(f"mutation: {name}: mutating {target.source}, tests: {' '.join(target.tests)}", flush=True)
            seconds = _run(name, target, args.survivors_only)
        score = Score(name, _collect(name, target), seconds=seconds)
        _mark_equivalent(score, target, entries, used)
        scores.append(score)
        _print([score], verbose=False)
    _print(scores, verbose=not args.quiet)
    checked = {TARGETS[s.module].source for s in scores}
    stale = [e for n, e in enumerate(entries) if n not in used and e["file"] in checked]
    if set(TARGETS) <= {s.module for s in scores}:
        stale += [e for n, e in enumerate(entries) if n not in used and e["file"] == "*"]
    for entry in stale:
        print(f"mutation: stale entry in {EQUIVALENT.name} (matches no survivor): {entry}")
    low = [s.module for s in scores if s.percent < args.min_score or not s.mutants]
    if low or stale:
        sys.exit(f"mutation: below {args.min_score:.0f} % (or not run): {', '.join(low) or 'none'}")


if __name__ == "__main__":
    main()
