"""PIN guard: pure policy, persistence, operator reset, and the token task refusing before the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from rails_fakes import CANARY, STATUS_QUERY, PivDevice, apdu, lease, make_manager, make_rails, verify_apdu
from server_fakes import Client

from bridge_server.config import parse_server_config
from bridge_server.guard.audit import verify_file
from bridge_server.guard.guardrails import open_guard, reset_guard
from bridge_server.guard.pin_guard import REFUSAL_SW, PinGuard, PinGuardStore
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from protocol import wire
from protocol.errors import ConfigError

T = "codesign"


def observe(
    guard: PinGuard, sw: int, *, ins: int = 0x20, data: bool = True, now: float = 1.0
) -> list[object]:
    return list(guard.observe(T, ins, 0x80, data, sw, holder="vm1", now=now))


def test_wrong_pin_that_leaves_the_floor_engages_and_refuses_the_next_attempt() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=5)
    assert guard.check(T, 0x20, 0x80, True) is None
    events = observe(guard, 0x63C2)
    assert [type(e).__name__ for e in events] == ["Attempt", "Engaged"]
    assert guard.status(T)["reason"] == "80: retries_low"
    assert guard.check(T, 0x20, 0x80, True) == 0x6983
    assert guard.check(T, 0x24, 0x80, True) == 0x6983  # CHANGE REFERENCE DATA presents the PIN too


def test_retries_above_the_floor_do_not_engage_until_max_failures() -> None:
    guard = PinGuard(min_retries_left=1, max_failures=2)
    observe(guard, 0x63C4)
    assert not guard.engaged(T)
    observe(guard, 0x63C3)
    assert guard.engaged(T)
    assert guard.status(T)["reason"] == "80: max_failures"


def test_consecutive_failures_engage_when_the_card_hides_its_counter() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=2)
    observe(guard, 0x6982)  # some cards answer a wrong PIN with a bare 6982
    assert not guard.engaged(T)
    observe(guard, 0x6300)
    assert guard.engaged(T)


def test_a_correct_pin_resets_the_consecutive_failures() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=2)
    observe(guard, 0x63C5)
    observe(guard, 0x9000)
    observe(guard, 0x63C5)
    assert not guard.engaged(T)
    assert guard.status(T)["failures"] == 1


def test_the_empty_verify_status_query_passes_while_engaged_and_can_engage_the_guard() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=3)
    assert observe(guard, 0x63C3, data=False) == []  # a query is not an attempt
    assert not guard.engaged(T)
    events = observe(guard, 0x63C2, data=False)  # someone spent a retry elsewhere: guard before any PIN
    assert [type(e).__name__ for e in events] == ["Engaged"]
    assert guard.check(T, 0x20, 0x80, False) is None
    assert guard.check(T, 0x20, 0x80, True) == REFUSAL_SW


def test_6983_marks_the_token_locked() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=10)
    observe(guard, 0x6983)
    status = guard.status(T)
    assert (status["engaged"], status["locked"], status["reason"]) == (True, True, "80: locked")


def test_format_errors_do_not_count_as_spent_retries() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=1)
    observe(guard, 0x6700)
    observe(guard, 0x6A88)
    assert not guard.engaged(T)


def test_an_engaged_reference_engages_the_whole_card() -> None:
    guard = PinGuard(min_retries_left=1, max_failures=5)
    observe(guard, 0x63C1, ins=0x2C)  # RESET RETRY COUNTER: the PUK's counter is low
    assert guard.check(T, 0x2C, 0x80, True) == REFUSAL_SW
    assert guard.check(T, 0x20, 0x80, True) == REFUSAL_SW  # the card's other references too
    assert guard.check(T, 0x20, 0x81, True) == REFUSAL_SW
    assert guard.check(T, 0x20, 0x81, False) is None  # status queries still pass
    assert guard.status(T)["reason"] == "80/reset: retries_low"


def test_failures_add_up_per_card_across_references() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=2)
    # OpenPGP: VERIFY 81 and 82 both present PW1 and spend its one counter.
    guard.observe(T, 0x20, 0x81, True, 0x63C2, holder="vm1", now=1.0)
    assert guard.check(T, 0x20, 0x82, True) is None
    events = guard.observe(T, 0x20, 0x82, True, 0x63C1, holder="vm1", now=2.0)
    assert [(type(e).__name__, getattr(e, "failures", None)) for e in events] == [
        ("Attempt", 2),
        ("Engaged", 2),
    ]
    assert guard.check(T, 0x20, 0x81, True) == REFUSAL_SW
    assert guard.status(T)["failures"] == 2
    # Engaged once: a later status query of another reference is no second engagement.
    assert guard.observe(T, 0x20, 0x83, False, 0x63C3, holder="vm1", now=3.0) == []
    assert guard.status(T)["reason"] == "82: max_failures"


def test_a_correct_pin_does_not_forgive_failures_of_another_reference() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=2)
    observe(guard, 0x63C2, ins=0x2C)  # a wrong PUK: its own counter, which the PIN does not restore
    observe(guard, 0x9000)  # the correct PIN
    assert guard.status(T)["failures"] == 1
    observe(guard, 0x63C1, ins=0x2C)
    assert guard.engaged(T)


def test_a_state_file_written_per_reference_loads_and_is_judged_per_card() -> None:
    def saved(refs: dict[str, dict[str, object]]) -> str:
        return json.dumps({"version": 1, "tokens": {T: refs}})

    guard = PinGuard(min_retries_left=0, max_failures=2)
    guard.load_json(saved({"81": {"failures": 2, "engaged": True, "reason": "max_failures"}}))
    assert guard.check(T, 0x20, 0x80, True) == REFUSAL_SW
    # Failures that engaged nothing per reference reach max_failures per card: refused.
    guard.load_json(saved({"81": {"failures": 1}, "82": {"failures": 1}}))
    assert guard.engaged(T)
    assert guard.check(T, 0x20, 0x82, True) == REFUSAL_SW
    assert guard.status(T)["engaged"] is True
    assert json.loads(guard.to_json())["tokens"][T]["81"]["failures"] == 1  # the same format


# A card with OpenPGP-like references: VERIFY 81 and 82 share PW1, 83 is PW3, and RESET RETRY
# COUNTER (2C, P2 81) spends the reset code's counter and, when right, restores PW1's.
_COUNTER = {(0x20, 0x81): "pw1", (0x20, 0x82): "pw1", (0x20, 0x83): "pw3", (0x2C, 0x81): "rc"}
_attempts = st.lists(st.tuples(st.sampled_from(sorted(_COUNTER)), st.booleans()), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_attempts, st.integers(min_value=1, max_value=4))
def test_no_card_counter_spends_more_than_max_failures_before_the_guard_engages(
    attempts: list[tuple[tuple[int, int], bool]], max_failures: int
) -> None:
    guard = PinGuard(min_retries_left=0, max_failures=max_failures)
    left = dict.fromkeys(_COUNTER.values(), 8)
    for now, ((ins, p2), right) in enumerate(attempts):
        if guard.check(T, ins, p2, True) is not None:
            continue
        counter = _COUNTER[ins, p2]
        if right:
            left[counter] = 8
            if counter == "rc":
                left["pw1"] = 8
            sw = 0x9000
        else:
            left[counter] -= 1
            sw = 0x63C0 | left[counter]
        guard.observe(T, ins, p2, True, sw, holder="vm1", now=float(now))
        assert min(left.values()) >= 8 - max_failures


def test_after_a_reset_the_acknowledged_counter_passes_and_the_next_failure_engages_again() -> None:
    guard = PinGuard(min_retries_left=2, max_failures=1)
    observe(guard, 0x63C2)
    guard.reset(T)
    assert observe(guard, 0x63C2, data=False) == []  # the status query at the floor: accepted
    assert guard.check(T, 0x20, 0x80, True) is None
    observe(guard, 0x63C1)
    assert guard.check(T, 0x20, 0x80, True) == REFUSAL_SW


def test_state_survives_a_reload_and_is_replaced_atomically(tmp_path: Path) -> None:
    store = PinGuardStore(tmp_path / "guard" / "pin-guard.json")
    guard = PinGuard(min_retries_left=2, max_failures=1)
    observe(guard, 0x63C2, now=123.0)
    store.save(guard)
    assert not list((tmp_path / "guard").glob("*.tmp"))
    loaded = PinGuard()
    store.load(loaded)
    assert loaded.check(T, 0x20, 0x80, True) == REFUSAL_SW
    assert loaded.status(T)["since"] == 123.0


def _config(tmp_path: Path, extra: str = "") -> object:
    doc = {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [{"name": T, "match": {"simulate": "safenet-5110"}, "allow": ["vm1"]}],
        "audit": {"path": "audit.jsonl"},
    }
    return parse_server_config(doc, tmp_path / "server.yaml")


def test_the_state_file_defaults_next_to_the_audit_log_and_a_corrupt_one_refuses_to_start(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    _guard, store = open_guard(config)  # type: ignore[arg-type]
    assert store.path == tmp_path / "pin-guard.json"
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"pin_guard\.state"):
        open_guard(config)  # type: ignore[arg-type]


def test_operator_reset_clears_persists_audits_and_says_what_to_check(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    rails.guard.observe(T, 0x20, 0x80, True, 0x63C2, holder="build-vm-07", now=5.0)
    rails.save()
    answer = reset_guard(rails, "ops-laptop")
    assert answer["was_engaged"] is True
    assert any("build-vm-07" in item for item in answer["check_first"])
    assert any("CI secret" in item for item in answer["check_first"])
    saved = json.loads((tmp_path / "pin-guard.json").read_text())
    assert saved["tokens"][T]["80"]["engaged"] is False
    assert saved["tokens"][T]["80"]["acknowledged_retries"] == 2
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "pin_guard.cleared"
    assert lines[-1]["actor"] == "ops-laptop"


async def test_five_wrong_pins_spend_one_retry_and_the_correct_pin_waits_for_the_operator(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    card = PivCard(pin="123456", pin_retries=3)
    device, hub = PivDevice(card), Hub()
    rails = make_rails(tmp_path, min_retries_left=2, max_failures=1)
    manager = make_manager(hub, device, rails)
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    epoch = await lease(manager, client)
    answers = []
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            answers.append((await apdu(manager, client, epoch, verify_apdu(CANARY)))[0])
        refused, notes = await apdu(manager, client, epoch, verify_apdu("123456"))
    assert answers == [b"\x63\xc2"] + [b"\x69\x83"] * 4
    assert card.pin_retries_left == 2  # never below the floor
    assert card.counters.pin_attempts == 1  # only the first wrong PIN reached the card
    assert refused == b"\x69\x83"
    assert [n.code for n in notes if isinstance(n, wire.ErrorMessage)] == ["pin_guard"]
    assert (await apdu(manager, client, epoch, STATUS_QUERY))[0] == b"\x63\xc2"  # the query still passes
    assert CANARY not in repr(logs) and CANARY.encode().hex() not in repr(logs).lower()

    reset_guard(rails, "ops")
    assert (await apdu(manager, client, epoch, verify_apdu("123456")))[0] == b"\x90\x00"
    assert card.pin_retries_left == 3
    audit = (tmp_path / "audit.jsonl").read_text()
    assert CANARY not in audit
    events = [json.loads(line)["event"] for line in audit.splitlines()]
    assert events.count("command.refused") == 5
    assert events.count("pin_guard.engaged") == 1
    assert verify_file(tmp_path / "audit.jsonl").ok
