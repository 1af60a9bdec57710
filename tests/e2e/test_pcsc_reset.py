"""PC/SC semantics through the whole bridge: a reset logs the card out (issue 15 defect 8).

libpcsclite (ctypes) -> pcscd -> vpcd -> tokenbridge-client -> TLS -> tokenbridge-server ->
simulated token. SCardReconnect(SCARD_RESET_CARD) reaches the client as vpcd's RESET; libccid
answers IFD_RESET on a local reader with IccPowerOff then IccPowerOn, so the card's PIN-verified
state must be gone afterwards, as applications that reset to log out rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import VpcdSlot
from inproc import SELECT_PIV, VERIFY_123456
from pcsc_ctypes import SCARD_LEAVE_CARD, SCARD_RESET_CARD, Card
from procstack import VERIFY_STATUS_QUERY

from bridge_admin.local_stack import BridgeStack

pytestmark = pytest.mark.e2e


@pytest.fixture
def card(tmp_path: Path, vpcd_slot: VpcdSlot) -> Iterator[Card]:
    stack = BridgeStack(tmp_path / "stack", profiles=["safenet-5110"])
    try:
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        stack.start_server()
        client = stack.start_client("build-vm-01", [vpcd_slot.index])
        stack.wait_card(vpcd_slot.index, client)
        handle = Card(vpcd_slot.reader)
        try:
            yield handle
        finally:
            handle.close()
    finally:
        stack.stop()


def login(card: Card) -> None:
    assert card.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
    assert card.transmit(VERIFY_123456) == b"\x90\x00"
    assert card.transmit(VERIFY_STATUS_QUERY) == b"\x90\x00"  # verified


def test_scard_reconnect_with_reset_logs_the_card_out_and_leave_card_does_not(card: Card) -> None:
    login(card)
    card.reconnect(SCARD_LEAVE_CARD)
    assert card.transmit(VERIFY_STATUS_QUERY) == b"\x90\x00"  # no reset: still verified

    card.reconnect(SCARD_RESET_CARD)
    assert card.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
    status = card.transmit(VERIFY_STATUS_QUERY)
    assert status[0] == 0x63 and status[1] & 0xF0 == 0xC0, status.hex()  # 63Cx: not verified

    login(card)  # and the card works normally after the reset
