"""PIN guard: what each status word means, what the operator and the audit are told, the saved state.

The behaviours here were found unguarded by mutation testing (docs/testing.md): each test fails
if the guard forgets one status word, one instruction or one field.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bridge_server.config import parse_server_config
from bridge_server.guard.guardrails import open_guard
from bridge_server.guard.pin_guard import REFUSAL_SW, Attempt, Engaged, PinGuard, PinGuardStore, checklist
from protocol.errors import ConfigError

T = "codesign"


def observe(guard: PinGuard, sw: int, *, ins: int = 0x20, p2: int = 0x80, data: bool = True, now: float = 1.0,
            holder: str = "vm1") -> list[Attempt | Engaged]:  # fmt: skip
    return guard.observe(T, ins, p2, data, sw, holder=holder, now=now)


def outcomes(events: list[Attempt | Engaged]) -> list[str]:
    return [e.outcome for e in events if isinstance(e, Attempt)]


# ISO 7816-4 §5.6 / SP 800-73-4: the card rejected the command before comparing any PIN.
_NOT_COMPARED = {
    0x6700: "wrong length",
    0x6A80: "incorrect data field",
    0x6A81: "function not supported",
    0x6A86: "incorrect P1/P2",
    0x6A88: "reference data not found",
    0x6B00: "wrong P1/P2",
    0x6D00: "INS not supported",
    0x6E00: "CLA not supported",
    0x6881: "logical channel not supported",
}


@pytest.mark.parametrize("sw", sorted(_NOT_COMPARED), ids=[f"{sw:04X}" for sw in sorted(_NOT_COMPARED)])
def test_an_answer_that_compared_no_pin_spends_no_retry_and_is_audited_as_not_checked(sw: int) -> None:
    guard = PinGuard(min_retries_left=0, max_failures=1)
    events = observe(guard, sw)
    assert outcomes(events) == ["not_checked"]
    assert not guard.engaged(T)
    assert guard.status(T)["failures"] == 0
    assert guard.check(T, 0x20, 0x80, True) is None


def test_an_unknown_answer_to_a_pin_counts_as_a_failure() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=1)
    events = observe(guard, 0x6F00)  # no precise diagnosis: the safe side is a spent retry
    assert outcomes(events) == ["failed"]
    assert guard.check(T, 0x20, 0x80, True) == REFUSAL_SW


@pytest.mark.parametrize("sw", [0x9000, 0x6100, 0x6110, 0x61FF])
def test_a_correct_pin_answered_with_more_data_available_is_a_success(sw: int) -> None:
    guard = PinGuard(min_retries_left=0, max_failures=2)
    observe(guard, 0x63C4)
    events = observe(guard, sw)
    assert outcomes(events) == ["ok"]
    assert guard.status(T)["failures"] == 0
    observe(guard, 0x63C4)
    assert not guard.engaged(T)  # one failure after the success, not two


def test_the_audit_says_wrong_pin_and_blocked_by_the_cards_answer() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=5)
    assert outcomes(observe(guard, 0x63C3)) == ["wrong_pin"]
    assert outcomes(observe(guard, 0x63C0)) == ["wrong_pin"]
    assert outcomes(observe(guard, 0x6983)) == ["blocked"]


def test_after_a_reset_and_a_correct_pin_a_wrong_pin_at_the_floor_engages_again() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=3)
    observe(guard, 0x63C2)
    assert guard.engaged(T)
    guard.reset(T)  # the operator acknowledges the card at 2 retries left
    observe(guard, 0x9000)  # the fixed PIN works: the card's counter is full again
    events = observe(guard, 0x63C2)  # a wrong PIN brings it back to the floor
    assert [type(e).__name__ for e in events] == ["Attempt", "Engaged"]
    assert guard.check(T, 0x20, 0x80, True) == REFUSAL_SW


def test_a_correct_pin_forgets_the_counter_the_card_reported_before() -> None:
    guard = PinGuard(min_retries_left=1, max_failures=5)
    observe(guard, 0x63C3)
    assert guard.status(T)["retries_left"] == 3
    observe(guard, 0x9000)
    assert guard.status(T)["retries_left"] is None  # unknown until the card reports it again


@pytest.mark.parametrize("ins", [0x21, 0x2D], ids=["VERIFY-odd", "RESET-RETRY-COUNTER-odd"])
def test_the_odd_pin_instructions_are_guarded_like_the_even_ones(ins: int) -> None:
    # ISO 7816-4 §7.5: INS 21 and 2D are the BER-TLV variants of VERIFY and RESET RETRY COUNTER.
    guard = PinGuard(min_retries_left=0, max_failures=1)
    assert outcomes(observe(guard, 0x63C4, ins=ins)) == ["wrong_pin"]
    assert guard.check(T, ins, 0x80, True) == REFUSAL_SW


def test_the_odd_verify_status_query_passes_while_engaged() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=1)
    observe(guard, 0x63C2)
    assert guard.check(T, 0x21, 0x80, False) is None
    assert observe(guard, 0x63C2, ins=0x21, data=False) == []


def test_a_wrong_odd_reset_code_is_counted_against_the_reset_code_not_the_pin() -> None:
    guard = PinGuard(min_retries_left=1, max_failures=5)
    observe(guard, 0x63C1, ins=0x2D)
    assert guard.status(T)["reason"] == "80/reset: retries_low"


def test_status_reports_the_counter_who_failed_last_and_the_thresholds() -> None:
    guard = PinGuard(min_retries_left=1, max_failures=4)
    observe(guard, 0x63C5, p2=0x80, holder="build-vm-03", now=10.0)
    observe(guard, 0x63C3, p2=0x81, holder="build-vm-07", now=20.0)
    status = guard.status(T)
    assert status["retries_left"] == 3  # the lowest counter the card reported
    assert status["last_failure_by"] == "build-vm-07"
    assert (status["min_retries_left"], status["max_failures"]) == (1, 4)
    assert (status["engaged"], status["locked"]) == (False, False)
    assert (status["reason"], status["since"]) == ("", None)
    assert status["failures"] == 2


def test_status_of_a_card_engaged_by_its_failures_says_so_and_since_when() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=2)
    observe(guard, 0x63C8, now=3.0)
    observe(guard, 0x63C7, now=4.0)
    status = guard.status(T)
    assert (status["engaged"], status["reason"], status["since"]) == (True, "80: max_failures", 4.0)


def test_status_of_an_unknown_token_is_all_clear() -> None:
    status = PinGuard().status("other")
    assert status["engaged"] is False
    assert (status["failures"], status["retries_left"], status["last_failure_by"]) == (0, None, "")


def test_the_guards_defaults_are_the_documented_config_defaults(tmp_path: Path) -> None:
    # A guard built without a config (tests, tools) must protect like a default server does.
    doc = {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [{"name": T, "match": {"simulate": "safenet-5110"}, "allow": ["vm1"]}],
    }
    config = parse_server_config(doc, tmp_path / "server.yaml")
    default = PinGuard()
    assert (default.min_retries_left, default.max_failures) == (
        config.pin_guard.min_retries_left,
        config.pin_guard.max_failures,
    )
    # docs/guardrails.md: engage at 2 retries left, and after the first failure.
    assert (default.min_retries_left, default.max_failures) == (2, 1)


def test_a_state_file_from_another_version_is_refused_not_misread() -> None:
    guard = PinGuard()
    saved = json.loads(_engaged_guard().to_json())
    saved["version"] = saved["version"] + 1
    with pytest.raises(ValueError, match="version"):
        guard.load_json(json.dumps(saved))
    with pytest.raises(ValueError, match="version"):
        guard.load_json(json.dumps({"tokens": {}}))


@pytest.mark.parametrize(
    "text",
    ["[]", '"engaged"', '{"version": 1, "tokens": []}', '{"version": 1, "tokens": {"codesign": [1]}}',
     '{"version": 1, "tokens": {"codesign": {"80": 3}}}'],
    ids=["list", "string", "tokens-list", "refs-list", "ref-number"],
)  # fmt: skip
def test_a_state_file_of_the_wrong_shape_refuses_to_start_clearly(tmp_path: Path, text: str) -> None:
    doc = {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [{"name": T, "match": {"simulate": "safenet-5110"}, "allow": ["vm1"]}],
        "audit": {"path": "audit.jsonl"},
    }
    config = parse_server_config(doc, tmp_path / "server.yaml")
    (tmp_path / "pin-guard.json").write_text(text)
    with pytest.raises(ConfigError, match=r"pin_guard\.state.*move it aside"):
        open_guard(config)


def test_a_state_of_the_wrong_shape_says_which_part_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^the pin guard state is a JSON list, not an object$"):
        PinGuard().load_json("[]")
    with pytest.raises(ValueError, match=r"^the pin guard state's tokens are not objects of objects$"):
        PinGuard().load_json('{"version": 1, "tokens": {"codesign": []}}')


def _engaged_guard() -> PinGuard:
    guard = PinGuard(min_retries_left=2, max_failures=3)
    observe(guard, 0x63C2, holder="build-vm-07", now=7.0)
    return guard


def test_a_saved_state_round_trips_every_field() -> None:
    guard = _engaged_guard()
    loaded = PinGuard(min_retries_left=2, max_failures=3)
    loaded.load_json(guard.to_json())
    assert loaded.tokens == guard.tokens
    assert loaded.status(T) == guard.status(T)


def test_the_state_file_is_not_readable_by_other_users(tmp_path: Path) -> None:
    store = PinGuardStore(tmp_path / "state" / "pin-guard.json")
    store.save(_engaged_guard())
    assert store.path is not None
    mode = stat.S_IMODE(store.path.stat().st_mode)
    assert mode & 0o007 == 0, f"{mode:04o}"
    assert store.status() == {"path": str(store.path), "problem": ""}


def test_a_memory_only_store_saves_and_loads_nothing() -> None:
    store = PinGuardStore(None)
    guard = _engaged_guard()
    store.save(guard)
    store.load(guard)
    assert guard.engaged(T)
    assert store.status() == {"path": None, "problem": ""}


def test_the_operator_checklist_names_the_holder_the_counter_and_a_locked_card() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=5)
    observe(guard, 0x63C1, holder="build-vm-07")
    observe(guard, 0x6983, holder="build-vm-07")
    items = checklist(T, guard.reset(T))
    assert items[0].startswith(
        "reference 80: 2 consecutive failure(s) (last failure by 'build-vm-07', SW 6983); "
        "the card reported 1 retries left"
    )
    assert "LOCKED" in items[1]
    assert checklist(T, {})[0].endswith("nothing was cleared")


def test_a_chain_link_that_reached_the_card_is_no_verdict_and_counts_as_a_failure() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=1)
    events = guard.observe(T, 0x20, 0x80, True, 0x9000, holder="vm1", now=1.0, chained=True)
    assert outcomes(events) == ["failed"]
    assert guard.engaged(T)


def test_the_state_file_records_each_reference_with_plain_json_values() -> None:
    guard = PinGuard(min_retries_left=1, max_failures=5)
    observe(guard, 0x63C3, holder="build-vm-07", now=42.0)
    observe(guard, 0x63C9, p2=0x81, data=False)  # a status query: a counter, no failure
    saved = json.loads(guard.to_json())
    assert saved["version"] == 1
    assert saved["tokens"][T] == {
        "80": {
            "failures": 1, "retries_left": 3, "engaged": False, "locked": False, "reason": "",
            "engaged_at": None, "last_failure_by": "build-vm-07", "last_failure_at": 42.0,
            "last_failure_sw": "63C3", "acknowledged_retries": None,
        },
        "81": {
            "failures": 0, "retries_left": 9, "engaged": False, "locked": False, "reason": "",
            "engaged_at": None, "last_failure_by": "", "last_failure_at": None,
            "last_failure_sw": "", "acknowledged_retries": None,
        },
    }  # fmt: skip


def test_the_version_a_foreign_state_file_has_is_named_in_the_error() -> None:
    saved = json.loads(_engaged_guard().to_json())
    saved["version"] = 7
    with pytest.raises(ValueError, match=r"^unsupported pin guard state version 7$"):
        PinGuard().load_json(json.dumps(saved))


def test_the_last_failure_is_found_whatever_the_clock_says() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=5)
    observe(guard, 0x63C5, holder="build-vm-07", now=0.5)
    observe(guard, 0x63C9, p2=0x81, data=False)  # a reference with no failure at all
    assert guard.status(T)["last_failure_by"] == "build-vm-07"


def test_status_says_the_card_reached_max_failures_when_no_reference_engaged() -> None:
    # A state saved per reference (or a lowered max_failures): the card's sum engages it.
    guard = PinGuard(min_retries_left=0, max_failures=2)
    guard.load_json(json.dumps({"version": 1, "tokens": {T: {"81": {"failures": 1}, "82": {"failures": 1}}}}))
    assert guard.status(T)["reason"] == "card: max_failures"
    guard.load_json(json.dumps({"version": 1, "tokens": {T: {"81": {"failures": 1}}}}))
    assert guard.status(T)["reason"] == ""


def test_status_lists_every_engaged_reference_and_the_earliest_time() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=5)
    observe(guard, 0x63C2, p2=0x81, now=20.0)
    observe(guard, 0x6983, p2=0x80, now=30.0)
    status = guard.status(T)
    assert status["reason"] == "80: locked, 81: retries_low"
    assert (status["since"], status["locked"]) == (20.0, True)


def test_the_store_creates_missing_folders_and_says_why_a_save_failed_until_one_succeeds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "var" / "lib" / "tokenbridge" / "pin-guard.json"
    store = PinGuardStore(path)
    guard = _engaged_guard()
    store.save(guard)
    assert path.exists()
    blocked = PinGuardStore(tmp_path / "a-file" / "pin-guard.json")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OSError, match="File exists"):
        blocked.save(guard)
    assert blocked.problem == f"cannot save the PIN guard state to {blocked.path}: File exists"
    assert blocked.status()["problem"] == blocked.problem
    (tmp_path / "a-file").unlink()
    blocked.save(guard)
    assert blocked.status()["problem"] == ""


def test_the_operators_checklist_says_what_to_fix_stop_and_check_in_that_order() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=5)
    observe(guard, 0x6983, holder="build-vm-07")
    items = checklist(T, guard.reset(T))
    assert items[0] == (
        "reference 80: 1 consecutive failure(s) (last failure by 'build-vm-07', SW 6983); "
        "the card reported unknown retries left"
    )
    assert items[1] == (
        "reference 80 is LOCKED on the card (6983): clearing the guard does not unlock it; "
        "unblock it with the PUK/administrator PIN, or re-initialise the token and re-issue the certificate"
    )
    fix, stop, check = items[2:]
    assert fix.startswith("fix the PIN stored in the CI secret") and fix.endswith("before re-running jobs")
    assert stop.startswith("stop retried/queued jobs first") and stop.endswith("remaining retries")
    assert check.startswith("after one successful signing") and check.endswith("0 failures for this token")


def test_the_checklist_of_a_reference_without_failures_names_nobody() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=5)
    observe(guard, 0x63C2, data=False)  # engaged by a status query: nobody failed
    items = checklist(T, guard.reset(T))
    assert items[0] == "reference 80: 0 consecutive failure(s); the card reported 2 retries left"
    assert checklist(T, {}) == [
        f"the PIN guard of {T!r} was not engaged and had no failures recorded; nothing was cleared"
    ]
