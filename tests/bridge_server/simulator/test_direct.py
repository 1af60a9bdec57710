from __future__ import annotations

import trio
import trio.testing

from bridge_server.simulator.direct import DirectCard, serve_connection
from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.profiles import PROFILES
from protocol.vpcd import Closed, Response, VpcdControl, VpcdReaderSide

ATR = PROFILES["safenet-5110"].atr


async def exchange(stream: trio.abc.Stream, reader: VpcdReaderSide, out: bytes) -> bytes:
    await stream.send_all(out)
    while True:
        event = reader.next_event()
        if isinstance(event, Response):
            return event.data
        assert not isinstance(event, Closed)
        reader.receive_data(await stream.receive_some(65536))


async def test_direct_card_answers_atr_and_apdus_and_ignores_power_events() -> None:
    card = PivCard()
    ours, theirs = trio.testing.memory_stream_pair()
    reader = VpcdReaderSide()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, ours, DirectCard(card, ATR))
        await theirs.send_all(reader.send_control(VpcdControl.POWER_ON))
        assert await exchange(theirs, reader, reader.send_control(VpcdControl.GET_ATR)) == ATR
        verify = bytes.fromhex("00 20 00 80 08") + b"123456\xff\xff"
        assert await exchange(theirs, reader, reader.send_apdu(verify)) == b"\x90\x00"
        # Power off clears the security status; no reply is sent for it.
        await theirs.send_all(reader.send_control(VpcdControl.POWER_OFF))
        empty_verify = bytes.fromhex("00 20 00 80")
        assert await exchange(theirs, reader, reader.send_apdu(empty_verify)) == b"\x63\xc3"
        await theirs.aclose()
    assert card.counters.resets == 1
    assert card.counters.apdus == 2


async def test_via_usb_card_goes_through_the_usb_host_stack_and_power_cycles_for_real() -> None:
    from bridge_server.simulator.backend import SimulatorBackend
    from bridge_server.simulator.direct import UsbDirectCard
    from bridge_server.simulator.usb_token import SimulatedToken
    from bridge_server.usb.ccid_driver import CcidDriver
    from bridge_server.usb.transport import AsyncUsbDevice, DeviceMatch

    profile = PROFILES["safenet-5110"]  # TPDU T=1: every APDU crosses CCID and T=1
    card = PivCard()
    token = SimulatedToken(profile, card=card)
    device = await AsyncUsbDevice.open(
        DeviceMatch(vid=profile.vid, pid=profile.pid), backend=SimulatorBackend([token])
    )
    driver = CcidDriver(device)
    usb_card = UsbDirectCard(driver, card, await driver.power_on())
    ours, theirs = trio.testing.memory_stream_pair()
    reader = VpcdReaderSide()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, ours, usb_card)
        assert await exchange(theirs, reader, reader.send_control(VpcdControl.GET_ATR)) == profile.atr
        verify = bytes.fromhex("00 20 00 80 08") + b"123456\xff\xff"
        assert await exchange(theirs, reader, reader.send_apdu(verify)) == b"\x90\x00"
        await theirs.send_all(reader.send_control(VpcdControl.RESET))  # a cold reset clears the PIN
        empty_verify = bytes.fromhex("00 20 00 80")
        assert await exchange(theirs, reader, reader.send_apdu(empty_verify)) == b"\x63\xc3"
        await theirs.aclose()
    await usb_card.removed()
    await device.aclose()
    assert token.evidence.apdu_count == 2  # both APDUs reached the card through the USB device
    assert token.evidence.power_ons >= 2  # the initial power-on and the reset's
