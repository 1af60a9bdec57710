"""The driver's recovery escalation (issue 15 item 6), with a fake device and the autojump clock:
cold reset first; Abort and USB reset only with a `rescue`, only when the cold reset failed."""

from __future__ import annotations

import pytest
import trio.testing
from structlog.testing import capture_logs
from test_ccid_driver import YUBIKEY5, YUBIKEY_ATR, FakeDevice, card_handler

from bridge_server.errors import DeviceStallError, DeviceTimeoutError
from bridge_server.usb.ccid_driver import CcidDriver
from protocol import ccid
from protocol.ccid import CcidMessage, CommandStatus, IccStatus, MessageType, SlotError


class _Rescue:
    def __init__(self, *, abort_stalls: bool, hung: dict[str, bool]) -> None:
        self.calls: list[str] = []
        self.abort_stalls, self.hung = abort_stalls, hung

    async def abort_request(self, seq: int) -> None:
        self.calls.append(f"abort_request {seq}")
        if self.abort_stalls:
            raise DeviceStallError("abort request: endpoint stalled")
        self.hung["on"] = False

    async def usb_reset(self) -> None:
        self.calls.append("usb_reset")
        self.hung["on"] = False


def _hung_reader(hung: dict[str, bool]):  # type: ignore[no-untyped-def]
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock and msg.data[:2] == b"\x00\x87":
            hung["on"] = True
            return []  # the signature never ends
        if hung["on"] and msg.msg_type is not MessageType.PC_to_RDR_Abort:
            busy = ccid.slot_status(msg.seq, icc=IccStatus.PRESENT_ACTIVE, cmd=CommandStatus.FAILED)
            busy = ccid.CcidMessage(
                ccid.response_type_for(msg.msg_type), msg.seq, 0, busy.b7, SlotError.CMD_SLOT_BUSY
            )
            return [busy.encode()]
        if msg.msg_type is MessageType.PC_to_RDR_Abort:
            return [ccid.slot_status(msg.seq, icc=IccStatus.PRESENT_ACTIVE).encode()]
        return base(msg)

    return handler


@pytest.mark.parametrize(("abort_stalls", "step"), [(False, "abort"), (True, "usb_reset")])
async def test_a_hung_slot_escalates_from_cold_reset_to_abort_to_usb_reset(
    autojump_clock: trio.testing.MockClock, abort_stalls: bool, step: str
) -> None:
    hung = {"on": False}
    rescue = _Rescue(abort_stalls=abort_stalls, hung=hung)
    dev = FakeDevice(YUBIKEY5, _hung_reader(hung))
    driver = CcidDriver(dev, max_wait_s=5, rescue=rescue)  # type: ignore[arg-type]
    await driver.power_on()
    with capture_logs() as logs, pytest.raises(DeviceTimeoutError):
        await driver.transmit(bytes.fromhex("0087119D04 7C028100 00"))
    steps = [e["step"] for e in logs if e["event"] == "card.recovery_step_failed"]
    assert steps == (["cold_reset"] if step == "abort" else ["cold_reset", "abort"])
    assert [e.get("step") for e in logs if e["event"] == "card.reset"] == [step]
    assert rescue.calls[0].startswith("abort_request")
    if step == "abort":
        aborts = [m for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_Abort]
        assert rescue.calls == [f"abort_request {aborts[0].seq}"]  # same bSeq, CCID 1.1 §5.3.1
    assert await driver.transmit(b"\x00\xa4\x04\x00") == b"\x00\xa4\x04\x00\x90\x00"


async def test_without_a_rescue_a_hung_slot_ends_in_reset_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hung = {"on": False}
    driver = CcidDriver(FakeDevice(YUBIKEY5, _hung_reader(hung)), max_wait_s=5)  # type: ignore[arg-type]
    await driver.power_on()
    with capture_logs() as logs, pytest.raises(DeviceTimeoutError):
        await driver.transmit(bytes.fromhex("0087119D04 7C028100 00"))
    assert [e["event"] for e in logs if e["event"].startswith("card.re")] == [
        "card.recovery_step_failed",
        "card.reset_failed",
    ]
