"""The card read timeout derived from the ATR as libccid derives it (issue 15 item 2).

libccid 1.5.2 (ifdhandler.c T1_card_timeout) waits 260 EGT + BWT + 260 CWT + 1 s per frame,
with the clock of dwDefaultClock and F/D from TA1. The expected values below were measured:
pcscd's log ("IFDHSetProtocolParameters() Timeout: N ms") with libccid driving each simulated
profile through the umockdev rig (tests/usb_rig/test_libccid_reference.py).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_ccid_driver import FakeDevice, card_handler

from bridge_server.simulator.profiles import PROFILES
from bridge_server.usb.ccid_driver import CcidDriver
from bridge_server.usb.ccid_policy import card_read_timeout_ms
from protocol.atr import Atr
from protocol.ccid import CcidMessage, MessageType

LIBCCID_MEASURED_MS = {"safenet-5110": 28980, "yubikey5": 1510, "etoken-fusion": 24317, "epass2003": 128281}


@pytest.mark.parametrize(("profile", "expected"), LIBCCID_MEASURED_MS.items())
def test_t1_read_timeout_matches_libccid_measured_per_profile(profile: str, expected: int) -> None:
    p = PROFILES[profile]
    assert card_read_timeout_ms(Atr.parse(p.atr), 1, p.descriptor) == expected


class _SlowCard(FakeDevice):
    """Answers an XfrBlock only after `delay_s`, sending nothing meanwhile (no time extension)."""

    delay_s = 60.0

    async def read(self) -> bytes:
        if self.sent[-1].msg_type is MessageType.PC_to_RDR_XfrBlock:
            await trio.sleep(self.delay_s)
        return await super().read()


async def test_a_card_with_a_long_bwt_is_waited_for_as_libccid_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # ePass2003: BWI 9 at 3.58 MHz, BWT about 51 s; libccid waits 128 s. A 60 s computation
    # (an on-card key generation) must not be cut off at a fixed 10 s and the card cold-reset.
    p = PROFILES["epass2003"]

    def card(msg: CcidMessage) -> bytes:
        return b"\x90\x00"

    dev = _SlowCard(p.descriptor, card_handler(p.atr, card))
    driver = CcidDriver(dev)  # type: ignore[arg-type]
    await driver.power_on()
    start = trio.current_time()
    assert await driver.transmit(bytes.fromhex("00470080 03 AC0180".replace(" ", ""))) == b"\x90\x00"
    assert trio.current_time() - start == pytest.approx(60)
