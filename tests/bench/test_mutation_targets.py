"""`make mutation`'s two reviewed lists: the modules it mutates and the mutants judged equivalent.

Both are read by `python -m bench.mutation` only when someone runs the (long) mutation run; these
checks keep them usable in every ordinary test run: adding a module stays one line, a typo in a
path is found at once, and no equivalence is accepted without a reason.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench.mutation.__main__ import EQUIVALENT, TARGETS_FILE, load_targets

# Issue 20: the modules whose mistakes cost a user a locked token, a leaked PIN or a wrong answer.
SAFETY_CRITICAL = {
    "pin_guard": "bridge_server/guard/pin_guard.py",
    "guardrails": "bridge_server/guard/guardrails.py",
    "command_policy": "bridge_server/guard/command_policy.py",
    "leases": "bridge_server/tokens/leases.py",
    "t1": "protocol/t1.py",
    "t1_blocks": "protocol/_t1_blocks.py",
    "ccid_driver": "bridge_server/usb/ccid_driver.py",
    "wire": "protocol/wire.py",
}


def test_every_safety_critical_module_is_mutated_with_existing_unit_tests() -> None:
    targets = load_targets(TARGETS_FILE)
    assert {name: targets[name].source for name in SAFETY_CRITICAL} == SAFETY_CRITICAL
    for target in targets.values():
        # each mutant runs these once: the slow suites have no place here
        assert not any(t.startswith(("tests/e2e/", "tests/fuzz/", "tests/load/")) for t in target.tests)


def test_each_module_is_one_line_of_targets_toml() -> None:
    lines = [line for line in TARGETS_FILE.read_text().splitlines() if line and not line.startswith("#")]
    assert [line.split(" = {", 1)[0] for line in lines] == list(load_targets(TARGETS_FILE))
    assert all(line.endswith("] }") for line in lines)


def test_a_target_with_a_missing_test_file_is_refused_naming_module_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "targets.toml"
    bad.write_text(
        'pin_check = { source = "protocol/wire.py", tests = ["tests/protocol/test_nothing.py"] }\n'
    )
    with pytest.raises(
        ValueError, match=r"targets.toml: pin_check: 'tests/protocol/test_nothing.py' is not a file"
    ):
        load_targets(bad)
    bad.write_text('pin_check = { source = "protocol/wire.py" }\n')
    with pytest.raises(ValueError, match="pin_check: expected"):
        load_targets(bad)


def test_every_equivalent_mutant_names_a_mutated_module_and_gives_a_reason() -> None:
    sources = {t.source for t in load_targets(TARGETS_FILE).values()}
    with EQUIVALENT.open("rb") as f:
        entries = tomllib.load(f)["mutant"]
    for entry in entries:
        assert set(entry) <= {"file", "before", "after", "function", "reason"}, entry
        assert entry["file"] == "*" or entry["file"] in sources, entry
        assert entry["before"] != entry["after"], entry
        assert len(entry["reason"].split()) >= 3, entry
