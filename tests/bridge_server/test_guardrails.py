"""Guardrails: what reaches the card, what the client is told, what the audit and the counters say.

Sync calls on one `Guardrails` (the token task's view); the end-to-end paths through the token
task are in test_pin_guard.py, test_pin_chaining.py and test_command_policy.py.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from rails_fakes import CANARY, STATUS_QUERY, make_rails, verify_apdu
from structlog.testing import capture_logs

from bridge_server.config import parse_server_config
from bridge_server.guard import pin_guard
from bridge_server.guard.guardrails import (
    Guardrails,
    Holder,
    Screened,
    guard_state_path,
    open_guard,
    reset_guard,
)
from bridge_server.guard.pin_guard import PinGuard, PinGuardStore
from protocol.errors import ConfigError

T = "codesign"
CLIENT = Holder("vm1", ("vm1", "vm1.ci.example"), admin=False, epoch=1000)
ADMIN = Holder("ops", ("ops",), admin=True)
PUT_DATA = bytes.fromhex("00DB3FFF03 5C0141")
SIGN = bytes.fromhex("00870700 04 7C028100")  # GENERAL AUTHENTICATE with the 9C key
PSO_SIGN = bytes.fromhex("002A9E9A 03 010203")
PSO_DECIPHER = bytes.fromhex("002A8086 03 010203")
INTERNAL_AUTH = bytes.fromhex("00880000 03 010203")


def engaged_rails(tmp_path: Path) -> Guardrails:
    rails = make_rails(tmp_path, min_retries_left=2, max_failures=1)
    rails.observe(verify_apdu(CANARY), b"\x63\xc2", CLIENT)
    assert rails.guard.engaged(T)
    return rails


def audit_lines(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]


def ours(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    """The guardrails' own log lines (the audit log adds its own, e.g. about its key)."""
    return [e for e in logs if not str(e["event"]).startswith("audit.")]


# -- screen: policy, then the PIN guard ----------------------------------------------------


def test_a_refused_instruction_names_the_command_and_the_holder(tmp_path: Path) -> None:
    refused = make_rails(tmp_path).screen(PUT_DATA, CLIENT)
    assert refused == Screened(0x6985, "policy", 0xDB, "PUT DATA is not allowed for 'vm1'")


def test_a_command_too_short_for_a_header_is_refused_by_the_policy(tmp_path: Path) -> None:
    refused = make_rails(tmp_path).screen(b"\x00\x20\x00", CLIENT)
    assert refused == Screened(
        0x6985, "policy", 0, "a command shorter than its 4-byte header is not allowed for 'vm1'"
    )


def test_commands_the_guardrails_do_not_watch_pass_and_teach_nothing(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    select = bytes.fromhex("00A4040009A00000030800001000")
    assert rails.screen(select, CLIENT) is None
    assert rails.observe(select, b"\x90\x00", CLIENT) == []
    assert rails.screen(b"\x00", CLIENT) == Screened(
        0x6985, "policy", 0, "a command shorter than its 4-byte header is not allowed for 'vm1'"
    )
    assert rails.observe(b"\x00", b"\x90\x00", CLIENT) == []
    assert rails.private_key_ops == 0


def test_a_malformed_chained_pin_command_is_refused_as_chained(tmp_path: Path) -> None:
    refused = make_rails(tmp_path).screen(bytes.fromhex("1020008008 3132"), CLIENT)
    assert refused == Screened(0x6884, "pin_chaining", 0x20, "a chained PIN command is refused")


def test_a_malformed_pin_command_that_fails_is_counted_for_its_reference(tmp_path: Path) -> None:
    rails = make_rails(tmp_path, min_retries_left=2, max_failures=5)
    events = rails.observe(bytes.fromhex("0020008108 3132"), b"\x63\xc2", CLIENT)
    assert [type(e).__name__ for e in events] == ["Attempt", "Engaged"]
    assert rails.guard.status(T)["reason"] == "81: retries_low"


def test_any_of_a_holders_names_on_allow_management_lets_it_manage(tmp_path: Path) -> None:
    rails = make_rails(tmp_path, allow_management=("vm1.ci.example",))
    assert rails.screen(PUT_DATA, CLIENT) is None


def test_an_admin_passes_the_policy_but_not_an_engaged_pin_guard(tmp_path: Path) -> None:
    rails = engaged_rails(tmp_path)
    assert rails.screen(PUT_DATA, ADMIN) is None
    refused = rails.screen(verify_apdu(CANARY), ADMIN)
    assert refused == Screened(0x6983, "pin_guard", 0x20, "the PIN guard is engaged")
    assert rails.screen(STATUS_QUERY, ADMIN) is None


@pytest.mark.parametrize(
    "raw",
    [bytes.fromhex("0020008008 3132"), bytes.fromhex("0020008000 31")],
    ids=["Lc-longer-than-data", "extended-header-cut"],
)
def test_a_malformed_pin_command_is_judged_as_carrying_a_pin(tmp_path: Path, raw: bytes) -> None:
    refused = engaged_rails(tmp_path).screen(raw, CLIENT)
    assert refused is not None and refused.kind == "pin_guard"


def test_a_pin_command_reaches_the_card_only_after_the_guards_state_was_saved(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    assert rails.screen(verify_apdu(CANARY), CLIENT) is None
    assert json.loads((tmp_path / "pin-guard.json").read_text())["version"] == 1
    rails.store.problem = "cannot save the PIN guard state to /x: No space left on device"
    (tmp_path / "pin-guard.json").unlink()
    (tmp_path / "pin-guard.json").mkdir()  # the next save fails
    refused = rails.screen(verify_apdu(CANARY), CLIENT)
    assert refused is not None
    assert (refused.sw, refused.kind, refused.ins) == (0x6983, "pin_guard_unsaved", 0x20)
    assert refused.detail.startswith(f"cannot save the PIN guard state to {tmp_path / 'pin-guard.json'}")
    assert rails.screen(STATUS_QUERY, CLIENT) is None  # a status query carries no PIN: no save needed


def test_a_memory_only_guard_never_refuses_for_an_unsaved_state(tmp_path: Path) -> None:
    rails = Guardrails(T, guard=PinGuard(), store=PinGuardStore(None))
    assert rails.screen(verify_apdu(CANARY), CLIENT) is None


# -- observe: the guard learns, the state is saved when it changed -----------------------


class CountingStore(PinGuardStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saves = 0

    def save(self, guard: PinGuard) -> None:
        self.saves += 1
        super().save(guard)


def test_the_state_is_saved_when_the_card_changed_it_and_only_then(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "pin-guard.json")
    rails = Guardrails(T, guard=PinGuard(min_retries_left=0, max_failures=5), store=store)
    assert rails.observe(SIGN, b"\x90\x00", CLIENT) == []
    rails.observe(STATUS_QUERY, b"\x63\xc3", CLIENT)  # a new counter: saved
    assert store.saves == 1
    rails.observe(STATUS_QUERY, b"\x63\xc3", CLIENT)  # the same counter: nothing to save
    assert store.saves == 1
    events = rails.observe(verify_apdu(CANARY), b"\x63\xc2", CLIENT)
    assert [type(e).__name__ for e in events] == ["Attempt"]
    assert store.saves == 2
    saved = json.loads((tmp_path / "pin-guard.json").read_text())
    assert saved["tokens"][T]["80"]["last_failure_by"] == "vm1"


def test_an_answer_without_a_status_word_teaches_the_guard_nothing(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    assert rails.observe(verify_apdu(CANARY), b"\x63", CLIENT) == []
    assert rails.guard.status(T)["failures"] == 0


@pytest.mark.parametrize(
    ("command", "rapdu", "counted"),
    [
        (SIGN, b"\x7c\x02\x82\x00\x90\x00", 1),
        (bytes([0x00, 0x86]) + SIGN[2:], b"\x90\x00", 1),  # GENERAL AUTHENTICATE, odd INS
        (SIGN, b"\x61\x10", 1),
        (SIGN, b"\x69\x82", 0),
        (bytes([0x10]) + SIGN[1:], b"\x90\x00", 0),  # a chain link: the operation is not done yet
        (PSO_SIGN, b"\x90\x00", 1),
        (PSO_DECIPHER, b"\x90\x00", 1),
        (bytes.fromhex("002A8080 03 010203"), b"\x90\x00", 0),  # PSO ENCIPHER: no private key
        (INTERNAL_AUTH, b"\x90\x00", 1),
        (bytes.fromhex("00CB3FFF 03 5C0141"), b"\x90\x00", 0),  # GET DATA
        (SIGN, b"\x90", 0),
    ],
    ids=["sign", "sign-86", "sign-61xx", "sign-refused", "sign-chain-link", "pso-sign", "pso-decipher",
         "pso-encipher", "internal-auth", "get-data", "no-sw"],
)  # fmt: skip
def test_private_key_operations_are_counted_when_the_card_did_them(
    tmp_path: Path, command: bytes, rapdu: bytes, counted: int
) -> None:
    rails = make_rails(tmp_path)
    rails.observe(command, rapdu, CLIENT)
    assert rails.private_key_ops == counted


def test_every_private_key_operation_of_a_lease_is_counted(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    for _ in range(3):
        rails.observe(SIGN, b"\x90\x00", CLIENT)
    assert rails.private_key_ops == 3


# -- what the client is told -------------------------------------------------------------


def test_the_pin_guard_notice_says_the_card_cannot_lock_and_how_to_clear_it(tmp_path: Path) -> None:
    rails = engaged_rails(tmp_path)
    refused = rails.screen(verify_apdu(CANARY), CLIENT)
    assert refused is not None
    assert rails.notice(refused) == (
        "PIN commands for token 'codesign' are refused by the server's PIN guard "
        "(answered 6983: authentication method blocked) so the card cannot lock; "
        "fix the PIN in the CI secret, then an operator runs `tokenbridge pin-guard reset codesign`"
    )


def test_the_unsaved_state_notice_points_at_the_servers_disk(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    notice = rails.notice(Screened(0x6983, "pin_guard_unsaved", 0x20, "disk full"))
    assert notice.startswith("PIN commands for token 'codesign' are refused (answered 6983: ")
    assert notice.endswith(
        "because the server cannot save the PIN guard's state; "
        "an operator frees space on the server's state disk (see `tokenbridge status`)"
    )


def test_the_chaining_notice_says_how_to_send_the_command_instead(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    notice = rails.notice(Screened(0x6884, "pin_chaining", 0x20, "a chained PIN command is refused"))
    assert notice.startswith(
        "a chained PIN command (ISO 7816-4 command chaining, CLA bit 0x10) on token 'codesign'"
    )
    assert notice.endswith("as one APDU (extended length if it does not fit)")


def test_the_policy_notice_says_who_may_allow_the_command(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    refused = rails.screen(PUT_DATA, CLIENT)
    assert refused is not None
    assert rails.notice(refused) == (
        "PUT DATA is not allowed for 'vm1' on token 'codesign' (answered 6985: conditions of use not "
        "satisfied); list the identity in `admins` or the token's policy.allow_management to permit it, "
        "or add the instruction to the token's policy.allow_ins (docs/guardrails.md)"
    )


# -- the audit ---------------------------------------------------------------------------


async def test_pin_attempts_and_engagements_are_audited_by_status_word_only(tmp_path: Path) -> None:
    rails = make_rails(tmp_path, min_retries_left=2, max_failures=3)
    events = rails.observe(verify_apdu(CANARY), b"\x63\xc2", CLIENT)
    with capture_logs() as logs:
        await rails.record_guard_events(events, CLIENT)
    verified, engaged = audit_lines(tmp_path)
    fields = ("event", "token", "client_id", "lease_epoch", "ins", "reference", "sw")
    assert {k: verified[k] for k in fields} == {
        "event": "pin.verified", "token": T, "client_id": "vm1", "lease_epoch": 1000, "ins": "20",
        "reference": "80", "sw": "63C2",
    }  # fmt: skip
    assert (verified["outcome"], verified["retries_left"], verified["failures"]) == ("wrong_pin", 2, 1)
    fields = ("event", "client_id", "reference", "reason", "retries_left", "failures")
    assert {k: engaged[k] for k in fields} == {
        "event": "pin_guard.engaged", "client_id": "vm1", "reference": "80", "reason": "retries_low",
        "retries_left": 2, "failures": 1,
    }  # fmt: skip
    logs = ours(logs)
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("pin.verified", "info"),
        ("pin_guard.engaged", "warning"),
    ]
    assert (logs[0]["sw"], logs[0]["outcome"], logs[0]["client_id"]) == ("63C2", "wrong_pin", "vm1")
    assert (logs[1]["reason"], logs[1]["retries_left"], logs[1]["failures"]) == ("retries_low", 2, 1)
    assert CANARY not in (tmp_path / "audit.jsonl").read_text()


async def test_a_refusal_outside_a_lease_is_audited_with_epoch_zero(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    nobody = Holder("vm2", ("vm2",), admin=False)
    refused = rails.screen(PUT_DATA, nobody)
    assert refused is not None
    await rails.record_refusal(refused, nobody)
    (line,) = audit_lines(tmp_path)
    assert (line["client_id"], line["lease_epoch"]) == ("vm2", 0)


async def test_a_refusal_is_audited_and_logged_with_its_reason(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    refused = rails.screen(PUT_DATA, CLIENT)
    assert refused is not None
    with capture_logs() as logs:
        await rails.record_refusal(refused, CLIENT)
    (line,) = audit_lines(tmp_path)
    assert {k: line[k] for k in ("event", "client_id", "lease_epoch", "ins", "sw", "reason", "detail")} == {
        "event": "command.refused", "client_id": "vm1", "lease_epoch": 1000, "ins": "DB", "sw": "6985",
        "reason": "policy", "detail": "PUT DATA is not allowed for 'vm1'",
    }  # fmt: skip
    assert [(e["event"], e["log_level"], e["ins"], e["sw"], e["reason"]) for e in ours(logs)] == [
        ("command.refused", "warning", "DB", "6985", "policy")
    ]


def test_a_save_that_fails_is_logged_once_and_its_recovery_once(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    (tmp_path / "pin-guard.json").mkdir()  # the rename onto it fails
    with capture_logs() as first:
        rails.save()
    assert [e["event"] for e in ours(first)] == ["pin_guard.save_failed"]  # at the first failure
    with capture_logs() as logs:
        rails.save()
        (tmp_path / "pin-guard.json").rmdir()
        rails.save()
        rails.save()
    logs = ours(logs)
    assert [(e["event"], e["log_level"]) for e in logs] == [("pin_guard.saved", "warning")]
    assert first[0]["path"] == str(tmp_path / "pin-guard.json")
    assert logs[0]["reason"] == "writable again"


# -- server-wide: where the state lives, start, operator reset ---------------------------


def _config(tmp_path: Path, **sections: object) -> object:
    doc = {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [{"name": T, "match": {"simulate": "safenet-5110"}, "allow": ["vm1"]}],
        **sections,
    }
    return parse_server_config(doc, tmp_path / "server.yaml")


def test_the_state_file_is_the_configured_one_else_next_to_the_audit_log_else_none(tmp_path: Path) -> None:
    both = _config(tmp_path, audit={"path": "audit.jsonl"}, pin_guard={"state": "state/guard.json"})
    assert guard_state_path(both) == tmp_path / "state" / "guard.json"  # type: ignore[arg-type]
    audit_only = _config(tmp_path, audit={"path": "logs/audit.jsonl"})
    assert guard_state_path(audit_only) == tmp_path / "logs" / "pin-guard.json"  # type: ignore[arg-type]
    assert guard_state_path(_config(tmp_path)) is None  # type: ignore[arg-type]


def test_a_guard_without_a_state_file_warns_that_it_is_not_persisted(tmp_path: Path) -> None:
    with capture_logs() as logs:
        guard, store = open_guard(_config(tmp_path))  # type: ignore[arg-type]
    assert store.path is None
    assert [(e["event"], e["log_level"], e["reason"]) for e in logs] == [
        ("pin_guard.not_persisted", "warning", "neither pin_guard.state nor audit.path is configured")
    ]
    assert (guard.min_retries_left, guard.max_failures) == (2, 1)


def test_the_guard_starts_with_the_configured_thresholds_and_warns_of_an_engaged_token(
    tmp_path: Path,
) -> None:
    config = _config(
        tmp_path, audit={"path": "audit.jsonl"}, pin_guard={"min_retries_left": 1, "max_failures": 4}
    )
    engaged = PinGuard(min_retries_left=1, max_failures=4)
    engaged.observe(T, 0x20, 0x80, True, 0x63C1, holder="vm1", now=1.0)
    (tmp_path / "pin-guard.json").write_text(engaged.to_json())
    with capture_logs() as logs:
        guard, store = open_guard(config)  # type: ignore[arg-type]
    assert (guard.min_retries_left, guard.max_failures) == (1, 4)
    assert guard.engaged(T)
    assert [(e["event"], e["log_level"], e.get("tokens")) for e in logs] == [
        ("pin_guard.engaged_at_start", "warning", [T])
    ]
    assert store.path == tmp_path / "pin-guard.json"


def test_an_unreadable_state_file_refuses_to_start_and_says_how_to_fix_it(tmp_path: Path) -> None:
    config = _config(tmp_path, audit={"path": "audit.jsonl"})
    (tmp_path / "pin-guard.json").write_text("[]")
    with pytest.raises(ConfigError) as err:
        open_guard(config)  # type: ignore[arg-type]
    assert str(err.value) == (
        f"{tmp_path / 'server.yaml'}: pin_guard.state: cannot read the PIN guard state "
        f"{tmp_path / 'pin-guard.json'}: the pin guard state is a JSON list, not an object; "
        "fix it, or move it aside (that clears the guard)"
    )


def test_a_state_file_that_cannot_be_written_at_start_refuses_pin_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(path: Path, data: bytes, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pin_guard, "write_whole", full_disk)
    with capture_logs() as logs:
        _guard, store = open_guard(_config(tmp_path, audit={"path": "audit.jsonl"}))  # type: ignore[arg-type]
    problem = f"cannot save the PIN guard state to {tmp_path / 'pin-guard.json'}: No space left on device"
    assert store.problem == problem
    assert [(e["event"], e["log_level"], e["reason"]) for e in ours(logs)] == [
        ("pin_guard.save_failed", "error", problem)
    ]


def test_an_operator_reset_answers_what_was_cleared(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    rails.guard.observe(T, 0x20, 0x80, True, 0x6983, holder="vm1", now=5.0)
    with capture_logs() as logs:
        answer = reset_guard(rails, "ops-laptop")
    assert {k: answer[k] for k in ("token", "cleared", "was_engaged", "locked", "message")} == {
        "token": T,
        "cleared": True,
        "was_engaged": True,
        "locked": True,
        "message": "PIN guard of 'codesign' cleared by ops-laptop",
    }
    (line,) = audit_lines(tmp_path)
    assert line["was"] == {
        "80": {"failures": 1, "retries_left": None, "engaged": True, "locked": True, "reason": "locked"}
    }
    assert [(e["event"], e["actor"], e["was_engaged"]) for e in ours(logs)] == [
        ("pin_guard.cleared", "ops-laptop", True)
    ]


def test_resetting_a_guard_that_knew_nothing_clears_nothing(tmp_path: Path) -> None:
    answer = reset_guard(make_rails(tmp_path), "ops-laptop")
    assert (answer["cleared"], answer["was_engaged"], answer["locked"]) == (False, False, False)
