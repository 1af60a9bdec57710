"""`make fuzz` (bench/fuzz.py) searches: new random inputs per round, and a failure it finds is kept in
the example database and replayed first by the next round, whatever that round's seed."""

from __future__ import annotations

from pathlib import Path

from bench.fuzz import ROOT, pytest_command, run_round

# A target with a bug a derandomised 300-example run is unlikely to hit by luck but a search
# finds at once (Hypothesis tries boundary values): it fails for any x > 1000. It loads the
# suite's conftest itself, because a file outside tests/ does not pick it up.
PLANTED = f"""
import os, runpy
runpy.run_path({str(ROOT / "tests" / "conftest.py")!r})
from hypothesis import given, settings, strategies as st

@settings(max_examples=int(os.environ["TOKENBRIDGE_FUZZ_EXAMPLES"]))
@given(st.integers())
def test_planted(x):
    assert x <= 1000
"""


def test_a_found_failure_is_kept_and_replayed(tmp_path: Path) -> None:
    target = tmp_path / "test_planted.py"
    target.write_text(PLANTED)
    db = tmp_path / "db"
    first = run_round(1, 200, 120, str(target), db=db)
    assert first.outcome == "failed", first.tail
    assert "x=1001" in first.tail  # shrunk to the boundary
    assert any(p.is_file() for p in db.rglob("*")), "the failing example was not kept"
    second = run_round(2, 1, 120, str(target), db=db)  # one new example: the replay fails it
    assert second.outcome == "failed"
    assert "x=1001" in second.tail
    without_db = run_round(3, 1, 120, str(target), db=tmp_path / "empty")
    assert without_db.outcome == "passed", "one example alone should not find the bug"


def test_rounds_are_not_seeded_so_each_draws_new_inputs() -> None:
    # A forced --hypothesis-seed would repeat inputs and switch the example database off.
    command = pytest_command("tests/fuzz")
    assert not any(part.startswith("--hypothesis-seed") for part in command)
    assert "timeout=0" in command
