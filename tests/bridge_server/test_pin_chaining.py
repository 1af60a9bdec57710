"""Chained PIN commands (ISO 7816-4 §5.4.1 command chaining) are refused before the card, for everyone.

The attack (issue 13 item 1): the wrong PIN as `10 20 00 80 08 <PIN>` (CLA chaining bit), then
`00 20 00 80`. The card compares the PIN when the chain ends; the guard used to take the 9000
that answers the first chunk for a correct PIN and the data-less last chunk for a status query,
so retries drained with `pin.verified outcome=ok` in the audit and the guard never engaged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from rails_fakes import CANARY, STATUS_QUERY, PivDevice, apdu, lease, make_manager, make_rails
from server_fakes import Client

from bridge_server.guard.guardrails import Holder
from bridge_server.guard.pin_guard import PinGuard
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from protocol import wire
from protocol.apdu import PIN_INS

T = "codesign"
SW_CHAINING_NOT_SUPPORTED = 0x6884
CLIENT = Holder("vm1", ("vm1",), admin=False)
ADMIN = Holder("ops", ("ops",), admin=True)
# Every class byte with b5 set: first interindustry (10-1F, incl. secure messaging and logical
# channels 1-3), RFU 30-3F, further interindustry (50-5F, 70-7F with secure messaging), proprietary.
CHAINED_CLASSES = [cla for cla in range(256) if cla & 0x10]


def chained_verify(pin: str, cla: int = 0x10, ins: int = 0x20) -> bytes:
    return bytes((cla, ins, 0x00, 0x80, 0x08)) + pin.encode().ljust(8, b"\xff")


def test_the_guard_refuses_every_chained_pin_instruction_with_6884() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=3)
    for ins in sorted(PIN_INS):
        assert guard.check(T, ins, 0x80, True, chained=True) == SW_CHAINING_NOT_SUPPORTED
        assert guard.check(T, ins, 0x80, False, chained=True) == SW_CHAINING_NOT_SUPPORTED
        assert guard.check(T, ins, 0x80, True) is None
    assert guard.check(T, 0xDB, 0x80, True, chained=True) is None  # not the guard's business


def test_an_answer_to_a_chained_chunk_is_never_recorded_as_a_correct_pin() -> None:
    guard = PinGuard(min_retries_left=0, max_failures=1)
    events = guard.observe(T, 0x20, 0x80, True, 0x9000, holder="vm1", now=1.0, chained=True)
    assert [getattr(e, "outcome", None) for e in events if type(e).__name__ == "Attempt"] != ["ok"]
    assert guard.engaged(T)  # the verdict is unknown: counted as a failure, fail closed


@pytest.mark.parametrize("holder", [CLIENT, ADMIN], ids=["client", "admin"])
@pytest.mark.parametrize("cla", CHAINED_CLASSES, ids=lambda c: f"{c:02X}")
def test_guardrails_refuse_a_chained_pin_command_under_every_class_byte(
    tmp_path: Path, cla: int, holder: Holder
) -> None:
    rails = make_rails(tmp_path, min_retries_left=0, max_failures=3)
    for ins in sorted(PIN_INS):
        refused = rails.screen(chained_verify(CANARY, cla, ins), holder)
        assert refused is not None, f"{cla:02X} {ins:02X}"
        assert (refused.sw, refused.kind) == (SW_CHAINING_NOT_SUPPORTED, "pin_chaining")


def test_guardrails_let_an_unchained_verify_and_a_chained_non_pin_command_through(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    assert rails.screen(chained_verify(CANARY, cla=0x00), CLIENT) is None
    assert rails.screen(bytes.fromhex("10 87 07 9D 04 7C 02 82 00"), CLIENT) is None  # chained sign
    assert rails.screen(STATUS_QUERY, CLIENT) is None


def test_the_refusal_notice_says_what_and_what_to_do(tmp_path: Path) -> None:
    rails = make_rails(tmp_path)
    refused = rails.screen(chained_verify(CANARY), CLIENT)
    assert refused is not None
    notice = rails.notice(refused)
    assert "chain" in notice and "6884" in notice and "one APDU" in notice
    assert "pin-guard reset" not in notice  # nothing for an operator to clear


@pytest.mark.parametrize("admin", [False, True], ids=["client", "admin"])
async def test_the_chained_wrong_pin_attack_never_reaches_the_card_and_audits_no_false_ok(
    nursery: trio.Nursery, tmp_path: Path, admin: bool
) -> None:
    card = PivCard(pin="123456", pin_retries=3)
    rails = make_rails(tmp_path, min_retries_left=0, max_failures=3)
    manager = make_manager(Hub(), device := PivDevice(card), rails)
    await nursery.start(manager.run)
    client = Client(manager.hub, "ops" if admin else "vm1", admin=admin)
    epoch = await lease(manager, client)
    for _ in range(4):
        first, notes = await apdu(manager, client, epoch, chained_verify(CANARY))
        assert first == b"\x68\x84"
        assert [n.code for n in notes if isinstance(n, wire.ErrorMessage)] == ["command_refused"]
        assert (await apdu(manager, client, epoch, STATUS_QUERY))[0] == b"\x63\xc3"
    assert card.pin_retries_left == 3
    assert card.counters.pin_attempts == 0
    assert not any(c[0] & 0x10 for c in device.card.commands)  # no chained chunk reached the card
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert not [e for e in lines if e["event"] == "pin.verified" and e["outcome"] == "ok"]
    refusals = [e for e in lines if e["event"] == "command.refused"]
    assert [(e["reason"], e["sw"], e["ins"]) for e in refusals] == [("pin_chaining", "6884", "20")] * 4
    assert CANARY not in (tmp_path / "audit.jsonl").read_text()
