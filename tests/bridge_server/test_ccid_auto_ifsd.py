"""A TPDU reader with AUTO_IFSD (issue 15 defect 4): the reader negotiated IFSD with the card.

CCID 1.1 §5.1 dwFeatures 0x400: the reader sends S(IFS request) itself as the first T=1
exchange, so the card sends blocks of up to dwMaxIFSD (at most 254) from the start. libccid
then takes min(dwMaxIFSD, 254) as its own IFSD without negotiating; a host that kept the
default 32 answers every longer block with an R-block and the link dies.
"""

from __future__ import annotations

import dataclasses

from test_ccid_driver_simulator import SELECT_PIV, exchange, read_cert

from bridge_server.simulator.backend import SimulatorBackend
from bridge_server.simulator.profiles import SAFENET_5110
from bridge_server.simulator.usb_token import SimulatedToken
from bridge_server.usb.ccid_driver import CcidDriver
from bridge_server.usb.transport import AsyncUsbDevice, DeviceMatch
from protocol.ccid import Feature


def auto_ifsd_profile():  # type: ignore[no-untyped-def]
    desc = SAFENET_5110.descriptor
    desc = dataclasses.replace(desc, features=desc.features | Feature.AUTO_IFSD)
    return dataclasses.replace(SAFENET_5110, name="5110-auto-ifsd", descriptor=desc)


async def test_tpdu_reader_with_auto_ifsd_reads_long_blocks_without_negotiating() -> None:
    token = SimulatedToken(auto_ifsd_profile())
    backend = SimulatorBackend([token])
    dev = await AsyncUsbDevice.open(DeviceMatch(serial=token.serial), backend=backend, poll_ms=50)
    try:
        driver = CcidDriver(dev)
        await driver.power_on()
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"
        cert = await read_cert(driver)  # ~1 KiB: blocks of 252 bytes from the card
        assert cert.subject
    finally:
        await dev.aclose()
