"""CCID driver bounds an operator or a client relies on: the largest answer, the waits a card asks
for, and what the log says when the token misbehaves.

The driver is being reworked (libusb transport), so these tests go through the public
`CcidDriver` API only, with the scripted device of test_ccid_driver.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from test_ccid_driver import (
    ETOKEN_5100_ATR,
    FUSION,
    INFO,
    TPDU_5100,
    YUBIKEY5,
    YUBIKEY_ATR,
    ChainingCard,
    FakeDevice,
    _driver,
    card_handler,
)

from bridge_server.errors import CardError, DeviceTimeoutError
from bridge_server.usb.ccid_driver import CcidDriver
from protocol import ccid
from protocol.ccid import CcidMessage, MessageType, NotifySlotChange
from protocol.t1 import ApduComplete, SendBlock, T1Card

LARGEST_RAPDU = 65536 + 2  # ISO 7816-4 §5.1: Ne at most 65536, plus SW1 SW2


# ---- the largest answer ----


async def test_a_chained_answer_of_exactly_the_largest_response_apdu_is_returned_whole() -> None:
    answer = bytes(range(256)) * 256 + b"\x90\x00"
    assert len(answer) == LARGEST_RAPDU
    driver, _ = await _driver(FUSION, ChainingCard(275, answer))
    await driver.power_on()
    assert await driver.transmit(b"\x00\xb0\x00\x00\x00\x00\x00") == answer


async def test_a_chained_answer_one_byte_longer_is_refused_and_says_the_bound() -> None:
    driver, _ = await _driver(FUSION, ChainingCard(275, bytes(LARGEST_RAPDU + 1)))
    await driver.power_on()
    with pytest.raises(CardError, match=r"chained response exceeds 65538 bytes"):
        await driver.transmit(b"\x00\xb0\x00\x00\x00\x00\x00")


# ---- waits the card asks for ----


class _SlowAfterWtx(FakeDevice):
    """A T=1 token that asks for WTX 3, then takes `delay` seconds to answer the next block."""

    def __init__(self, delay: float) -> None:
        self.card, self.delay, self.asked = T1Card(), delay, False
        super().__init__(TPDU_5100, card_handler(ETOKEN_5100_ATR, self._xfr))

    def _xfr(self, msg: CcidMessage) -> bytes:
        step = self.card.receive(msg.data)
        if isinstance(step, SendBlock):
            return step.block
        if isinstance(step, ApduComplete) and not self.asked:
            self.asked, self.pending = True, step.apdu
            return self.card.request_wtx(3)
        return self.card.respond(self.pending + b"\x90\x00")

    async def read(self) -> bytes:
        if self.sent[-1].msg_type is MessageType.PC_to_RDR_XfrBlock and self.sent[-1].b7 == 3:
            await trio.sleep(self.delay)  # the S(WTX response) went with bBWI 3
        return await super().read()


@pytest.mark.parametrize(("delay", "answered"), [(14.0, True), (16.0, False)])
async def test_after_a_wtx_request_the_driver_waits_that_many_frame_timeouts(
    autojump_clock: trio.testing.MockClock, delay: float, answered: bool
) -> None:
    dev = _SlowAfterWtx(delay)
    driver = CcidDriver(dev, frame_timeout_s=5, max_wait_s=60)  # type: ignore[arg-type]
    await driver.power_on()
    if answered:  # 14 s < 3 x 5 s
        assert await driver.transmit(b"\x00\xca\x01\x02\x00") == b"\x00\xca\x01\x02\x00\x90\x00"
        return
    with pytest.raises(DeviceTimeoutError, match="within 15 s"):
        await driver.transmit(b"\x00\xca\x01\x02\x00")


class _EndlessChain(FakeDevice):
    """An extended-APDU reader whose card keeps saying "more" with empty blocks, one a second."""

    def __init__(self) -> None:
        base = card_handler(YUBIKEY_ATR)

        def handler(msg: CcidMessage) -> list[bytes]:
            if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
                return [ccid.data_block(msg.seq, b"", chain=0x03).encode()]
            return base(msg)

        super().__init__(FUSION, handler)

    async def read(self) -> bytes:
        if self.sent[-1].msg_type is MessageType.PC_to_RDR_XfrBlock:
            await trio.sleep(1)
        return await super().read()


async def test_an_apdu_kept_alive_by_endless_chatter_fails_at_the_cap_and_says_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = CcidDriver(_EndlessChain(), frame_timeout_s=5, max_wait_s=30)  # type: ignore[arg-type]
    await driver.power_on()
    start = trio.current_time()
    with pytest.raises(DeviceTimeoutError) as info:
        await driver.transmit(b"\x00\xb0\x00\x00\x00\x00\x00")
    assert str(info.value) == f"{INFO.describe()}: apdu exchange not finished within 30 s"
    assert trio.current_time() - start == pytest.approx(30, abs=1)


# ---- what the log says ----


async def test_a_malformed_interrupt_is_dropped_with_a_warning_and_the_next_one_arrives() -> None:
    dev = FakeDevice(YUBIKEY5, card_handler(YUBIKEY_ATR))
    send, recv = trio.open_memory_channel[NotifySlotChange](5)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(CcidDriver(dev).watch_interrupts, send)  # type: ignore[arg-type]
            dev.irq_tx.send_nowait(b"\x50")  # NotifySlotChange without its slot bits
            dev.irq_tx.send_nowait(b"\x50\x03")
            assert await recv.receive() == NotifySlotChange(present=(True,), changed=(True,))
            nursery.cancel_scope.cancel()
    (dropped,) = [e for e in logs if e["event"] == "ccid.interrupt_dropped"]
    assert dropped["log_level"] == "warning"
    assert dropped["reason"]
