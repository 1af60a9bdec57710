"""With the PIN guard engaged, a PIN-class command whose Lc does not parse never reaches the card.

Issue 18 item 2 (promise P2): a malformed length must not be a way around the guard, whatever
the card would make of it (a lenient card may read the PIN out of a body our parser rejects).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from rails_fakes import (
    CANARY,
    PivDevice,
    PivDriver,
    apdu,
    lease,
    make_manager,
    make_rails,
    settle,
    verify_apdu,
)
from server_fakes import Client

from bridge_server.errors import CardError
from bridge_server.guard.guardrails import Holder
from bridge_server.guard.pin_guard import REFUSAL_SW
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from protocol import ccid
from protocol.apdu import CommandApdu
from protocol.errors import MalformedApduError

PIN = b"918273\xff\xff"
MALFORMED = {
    "short lc longer than the data": bytes.fromhex("0020008010") + PIN,
    "short lc shorter than the data": bytes.fromhex("0020008004") + PIN,
    "short lc with two trailing bytes": bytes.fromhex("0020008008") + PIN + b"\x00\x00",
    "extended lc longer than the data": bytes.fromhex("00200080000010") + PIN,
    "extended lc shorter than the data": bytes.fromhex("00200080000004") + PIN,
    "extended lc zero with data": bytes.fromhex("00200080000000") + PIN,
    "extended marker without lc": bytes.fromhex("002000800008"),
    "extended marker and half an lc": bytes.fromhex("002000800000"),
    "change reference data, bad lc": bytes.fromhex("0024008020") + PIN + PIN,
    "reset retry counter, bad extended lc": bytes.fromhex("002C0080000020") + PIN,
    "odd verify 21, bad lc": bytes.fromhex("0021008009") + PIN,
}


def _holder() -> Holder:
    return Holder("vm1", ("vm1",), admin=False)


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_pin_command_is_refused_by_the_engaged_guard(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(MalformedApduError):
        CommandApdu.parse(raw)  # the case really is malformed
    rails = make_rails(tmp_path, allow_management=("vm1",))  # the guard, not the policy, must refuse
    rails.guard.observe("codesign", 0x20, 0x80, True, 0x63C1, holder="vm1", now=0.0)
    assert rails.guard.engaged("codesign")
    refused = rails.screen(raw, _holder())
    assert refused is not None
    assert refused.sw == REFUSAL_SW


async def test_malformed_verify_never_reaches_the_card_through_the_token_task(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    card = PivCard(pin="123456", pin_retries=3)
    device, hub = PivDevice(card), Hub()
    rails = make_rails(tmp_path, min_retries_left=2, max_failures=1, allow_management=("vm1",))
    manager = make_manager(hub, device, rails)
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    epoch = await lease(manager, client)
    assert (await apdu(manager, client, epoch, verify_apdu(CANARY)))[0] == b"\x63\xc2"  # engages
    sent, attempts = len(device.card.commands), card.counters.pin_attempts
    for raw in MALFORMED.values():
        assert (await apdu(manager, client, epoch, raw))[0] == REFUSAL_SW.to_bytes(2, "big")
    assert device.card.commands[sent:] == []  # not one of them reached the card
    assert card.counters.pin_attempts == attempts
    assert card.pin_retries_left == 2


class LosingDriver(PivDriver):
    """The card runs every command, but the answer to the next VERIFY is lost (a T=1 resynch)."""

    lose_next_verify = True

    async def transmit(self, apdu: bytes) -> bytes:
        rapdu = await super().transmit(apdu)
        if apdu[1] == 0x20 and len(apdu) > 5 and self.lose_next_verify:
            self.lose_next_verify = False
            raise CardError("pin-class command (ins 20) not sent again after a t=1 resynch")
        return rapdu


async def test_a_verify_with_a_lost_answer_counts_as_a_failure(nursery: trio.Nursery, tmp_path: Path) -> None:
    # min_retries_left 0: only the guard's own failure count can engage it.
    card = PivCard(pin="123456", pin_retries=3)
    device, hub = PivDevice(card), Hub()
    device.card = LosingDriver(card)  # type: ignore[assignment]
    rails = make_rails(tmp_path, min_retries_left=0, max_failures=1)
    manager = make_manager(hub, device, rails)
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    epoch = await lease(manager, client)
    await manager.submit_frame(client.sub, epoch, ccid.xfr_block(1, verify_apdu(CANARY)).encode())
    await settle()
    client.drain()
    assert card.pin_retries_left == 2  # the card counted it; its answer never came back
    epoch = await lease(manager, client)
    assert (await apdu(manager, client, epoch, verify_apdu(CANARY)))[0] == REFUSAL_SW.to_bytes(2, "big")
    assert card.pin_retries_left == 2
