"""A command answered CMD_SLOT_BUSY is asked again (issue 15 item 6); the rig test is
tests/usb_rig/test_libusb_link.py::test_card_that_outlives_its_read_timeout_is_recovered_through_slot_busy."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_ccid_driver import YUBIKEY5, YUBIKEY_ATR, FakeDevice, card_handler

from bridge_server.errors import DeviceTimeoutError
from bridge_server.usb.ccid_driver import CcidDriver
from protocol import ccid
from protocol.ccid import CcidMessage, CommandStatus, IccStatus, MessageType, SlotError


def busy(msg: CcidMessage) -> list[bytes]:
    failed = ccid.CcidMessage(
        ccid.response_type_for(msg.msg_type),
        msg.seq,
        0,
        ccid.status_byte(IccStatus.PRESENT_ACTIVE, CommandStatus.FAILED),
        SlotError.CMD_SLOT_BUSY,
    )
    return [failed.encode()]


async def test_busy_slot_is_asked_again_until_it_answers(autojump_clock: trio.testing.MockClock) -> None:
    healthy = card_handler(YUBIKEY_ATR)
    answers = {"busy": 3}

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_IccPowerOff and answers["busy"]:
            answers["busy"] -= 1
            return busy(msg)
        return healthy(msg)

    dev = FakeDevice(YUBIKEY5, handler)
    driver = CcidDriver(dev)  # type: ignore[arg-type]
    await driver.power_off()
    offs = [m for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_IccPowerOff]
    assert len(offs) == 4 and len({m.seq for m in offs}) == 4  # a new bSeq each time


async def test_a_slot_busy_forever_is_cut_by_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    dev = FakeDevice(YUBIKEY5, busy)
    driver = CcidDriver(dev, max_wait_s=5)  # type: ignore[arg-type]
    with pytest.raises(DeviceTimeoutError, match="within 10 s"):  # cap: never below one frame wait
        await driver.power_off()
