"""`tokenbridge pin test` on the token task (bridge_server/tokens/pin_check.py), against a fake PIV card."""

from __future__ import annotations

from typing import Any

from bridge_server.guard.guardrails import Guardrails
from bridge_server.guard.pin_guard import PinGuard
from bridge_server.guard.server_pin import ServerPin
from bridge_server.guard.server_pin_config import ServerPinConfig
from bridge_server.tokens.pin_check import PIV_SELECT, answer_check


class PivPinCard:
    """Answers SELECT, the retry query and VERIFY (SP 800-73-4 Part 2 §3.2.1) like a PIV card."""

    def __init__(self, pin: bytes, retries: int = 3) -> None:
        self.pin, self.retries = pin, retries
        self.calls: list[Any] = []

    async def power_on(self) -> bytes:
        self.calls.append("power_on")
        return b"\x3b\x00"

    async def power_off(self) -> None:
        self.calls.append("power_off")

    async def slot_present(self) -> bool:
        return True

    async def transmit(self, apdu: bytes) -> bytes:
        self.calls.append(apdu)
        if apdu == PIV_SELECT:
            return b"\x90\x00"
        if len(apdu) == 4:
            return bytes((0x63, 0xC0 | self.retries))
        if apdu[5:] == self.pin.ljust(8, b"\xff"):
            self.retries = 3
            return b"\x90\x00"
        self.retries -= 1
        return bytes((0x63, 0xC0 | self.retries))


def rails(pin: bytes | None = b"918273") -> Guardrails:
    config = ServerPinConfig(
        credential="codesign-pin",
        identities=("build-vm-01",),
        pin=None if pin is None else ServerPin(bytearray(pin)),
        problem="missing on purpose",
    )
    return Guardrails("codesign", guard=PinGuard(min_retries_left=2), server_pin=config)


async def test_a_correct_stored_pin_is_reported_and_the_card_saw_it_after_the_retry_query() -> None:
    card, r = PivPinCard(b"918273"), rails()
    answer, failure = await answer_check(card, r, "local:0", "piv", None)
    assert failure is None
    assert (answer["ok"], answer["retries_before"], answer["sw"]) == (True, 3, "9000")
    transmitted = [c for c in card.calls if isinstance(c, bytes)]
    assert transmitted == [
        PIV_SELECT,
        bytes.fromhex("00200080"),
        bytes.fromhex("0020008008") + b"918273\xff\xff",
    ]
    assert card.calls[:2] == ["power_off", "power_on"] and card.calls[-1] == "power_off"


async def test_a_wrong_stored_pin_engages_the_guard_and_says_how_to_fix_it() -> None:
    card, r = PivPinCard(b"123456", retries=5), rails()
    answer, _ = await answer_check(card, r, "local:0", "piv", None)
    assert answer["ok"] is False and "pin set codesign" in answer["message"]
    assert r.server_pin.status(r.guard)["state"] == "rejected"  # type: ignore[index]
    again, _ = await answer_check(card, r, "local:0", "piv", None)
    assert again["refused"] is True and "engaged" in again["message"]
    assert card.retries == 4  # the second test never reached the card


async def test_the_retry_counter_at_the_guards_floor_stops_the_test_before_any_pin() -> None:
    card, r = PivPinCard(b"918273", retries=2), rails()
    answer, _ = await answer_check(card, r, "local:0", "piv", None)
    assert answer["refused"] is True and "not risking a retry" in answer["message"]
    assert not any(isinstance(c, bytes) and len(c) > 5 and c[1] == 0x20 for c in card.calls)
    assert card.retries == 2


async def test_nothing_touches_the_card_when_busy_missing_or_not_piv() -> None:
    card = PivPinCard(b"918273")
    for r, family, busy, words in (
        (rails(), "piv", "leased by build-vm-01", "leased by build-vm-01"),
        (rails(pin=None), "piv", None, "missing on purpose"),
        (rails(), "pkcs15", None, "PIV application only"),
        (Guardrails("codesign", guard=PinGuard()), "piv", None, "no server_pin section"),
    ):
        answer, _ = await answer_check(card, r, "local:0", family, busy)
        assert answer["refused"] is True and words in answer["message"]
    assert card.calls == []
