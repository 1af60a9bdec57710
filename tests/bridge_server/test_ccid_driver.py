"""CCID driver against a scripted in-memory device (no threads, so autojump_clock works).

The end-to-end runs through pyusb and the simulator are in test_ccid_driver_simulator.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import structlog
import trio
import trio.testing

from bridge_server.errors import CardError, DeviceError, DeviceTimeoutError
from bridge_server.usb.ccid_driver import (
    CcidDriver,
    choose_protocol,
    effective_features,
    extended_chunks,
    power_select_sequence,
    slot_error_name,
    t0_parameters,
    t1_parameters,
)
from bridge_server.usb.transport import DeviceInfo
from protocol import ccid
from protocol.atr import Atr
from protocol.ccid import (
    CcidClassDescriptor,
    CcidMessage,
    CommandStatus,
    Feature,
    IccStatus,
    MessageType,
    NotifySlotChange,
)

# Reference §1.12 / §1.13 vectors.
ETOKEN_5100_ATR = bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4")
YUBIKEY_ATR = bytes.fromhex("3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40")
T0_ATR = bytes.fromhex("3B 02 14 50")  # T=0 only (no TD1), two historical bytes

TPDU_5100 = CcidClassDescriptor(features=0x0001023C, max_ifsd=252, max_ccid_message_length=271)
YUBIKEY5 = CcidClassDescriptor(features=0x000400FE, max_ifsd=3062, max_ccid_message_length=3072, protocols=2)
FUSION = CcidClassDescriptor(features=0x00040472, max_ccid_message_length=275)
SHORT = CcidClassDescriptor(features=0x00020008, max_ccid_message_length=271)
T0_TPDU = CcidClassDescriptor(features=0x00010048, protocols=1, max_ccid_message_length=271)
INFO = DeviceInfo(0x1050, 0x0407, "YK1", 0x0503, 1, 2, "YubiKey")

Handler = Callable[[CcidMessage], list[bytes]]


def _with_tck(body: bytes) -> bytes:
    tck = 0
    for b in body[1:]:
        tck ^= b
    return body + bytes([tck])


# ---- pure decisions ----


def test_set_parameters_from_etoken_atr_match_libccid() -> None:
    # Reference §1.12: libccid sends 11 10 00 7D 00 FE 00 for this ATR on the eToken reader.
    assert t1_parameters(Atr.parse(ETOKEN_5100_ATR)) == bytes.fromhex("11 10 00 7D 00 FE 00")


def test_set_parameters_from_yubikey_atr_carry_its_bwi_cwi_and_ifsc() -> None:
    assert t1_parameters(Atr.parse(YUBIKEY_ATR)) == bytes.fromhex("11 10 00 15 00 FE 00")


def test_set_parameters_mark_crc_when_tc3_asks_for_it() -> None:
    # TS 3B, T0 80 (TD1), TD1 81 (TD2, T=1), TD2 71 (TA3 TB3 TC3, T=1): IFSC 0x20, BWI/CWI 0x45, CRC.
    atr = Atr.parse(_with_tck(bytes.fromhex("3B 80 81 71 20 45 01")))
    assert t1_parameters(atr) == bytes.fromhex("11 11 00 45 00 20 00")


def test_t0_parameters_default_to_libccid_values() -> None:
    assert t0_parameters(Atr.parse(T0_ATR)) == bytes.fromhex("11 00 00 0A 00")


def test_power_select_is_automatic_when_the_reader_selects_voltage() -> None:
    assert power_select_sequence(TPDU_5100, TPDU_5100.features) == (0,)


def test_power_select_falls_back_5v_3v_18v_over_the_supported_voltages() -> None:
    desc = CcidClassDescriptor(features=0x00010000, voltage_support=0x07)
    assert power_select_sequence(desc, desc.features) == (1, 2, 3)
    desc3 = replace(desc, voltage_support=0x02)
    assert power_select_sequence(desc3, desc3.features) == (2,)


def test_old_etoken_firmware_is_treated_as_auto_ifsd() -> None:
    for bcd, quirk in ((0x0012, True), (0x0013, True), (0x0100, False)):
        info = DeviceInfo(0x0529, 0x0620, "S", bcd, None, None, "eToken")
        assert bool(effective_features(TPDU_5100, info) & Feature.AUTO_IFSD) is quirk


def test_extended_chunks_follow_the_fusion_message_size() -> None:
    chunks = extended_chunks(bytes(600), 275)
    assert [(len(d), lvl) for d, lvl in chunks] == [(265, 1), (265, 3), (70, 2)]
    assert extended_chunks(bytes(265), 275) == [(bytes(265), 0)]


def test_slot_error_names_spec_codes_and_field_offsets() -> None:
    assert slot_error_name(0xFE) == "ICC_MUTE"
    assert slot_error_name(0x05) == "bad field at offset 5"
    assert slot_error_name(0xA2) == "vendor error 0xa2"


def test_choose_protocol_refuses_a_card_the_reader_cannot_speak() -> None:
    with pytest.raises(CardError, match=r"offers protocols \[0\]"):
        choose_protocol(Atr.parse(T0_ATR), YUBIKEY5)


# ---- a scripted device ----


class FakeDevice:
    """Stands in for AsyncUsbDevice: `handler` maps each command to the frames it answers with."""

    def __init__(
        self, descriptor: CcidClassDescriptor, handler: Handler, *, has_interrupt: bool = True
    ) -> None:
        self.descriptor, self.info, self.has_interrupt = descriptor, INFO, has_interrupt
        self.handler = handler
        self.sent: list[CcidMessage] = []
        self._tx, self._rx = trio.open_memory_channel[bytes](1000)
        self.irq_tx, self._irq_rx = trio.open_memory_channel[bytes](10)

    async def write(self, data: bytes) -> None:
        msg = ccid.decode_message(data)
        self.sent.append(msg)
        for frame in self.handler(msg):
            self._tx.send_nowait(frame)

    async def read(self) -> bytes:
        return await self._rx.receive()

    async def transceive(self, data: bytes) -> bytes:  # AsyncUsbDevice: write, then read
        await self.write(data)
        return await self.read()

    async def read_interrupt(self) -> bytes:
        return await self._irq_rx.receive()

    def types(self) -> list[MessageType]:
        return [m.msg_type for m in self.sent]


def card_handler(atr: bytes, card: Callable[[CcidMessage], bytes] | None = None) -> Handler:
    """A healthy reader: answers every command; XfrBlock goes to `card` (default: echo + 9000)."""

    def handle(msg: CcidMessage) -> list[bytes]:
        seq, t = msg.seq, msg.msg_type
        if t is MessageType.PC_to_RDR_IccPowerOn:
            return [ccid.data_block(seq, atr).encode()]
        if t is MessageType.PC_to_RDR_IccPowerOff:
            return [ccid.slot_status(seq, icc=IccStatus.PRESENT_INACTIVE).encode()]
        if t is MessageType.PC_to_RDR_GetSlotStatus:
            return [ccid.slot_status(seq, icc=IccStatus.PRESENT_ACTIVE).encode()]
        if t is MessageType.PC_to_RDR_SetParameters:
            return [ccid.parameters(seq, msg.b7, msg.data).encode()]
        if t is MessageType.PC_to_RDR_XfrBlock:
            out = card(msg) if card else msg.data + b"\x90\x00"
            return [ccid.data_block(seq, out).encode()]
        raise AssertionError(f"unexpected {t!r}")

    return handle


async def _driver(desc: CcidClassDescriptor, handler: Handler, **kw: float) -> tuple[CcidDriver, FakeDevice]:
    dev = FakeDevice(desc, handler)
    driver = CcidDriver(dev, **kw)  # type: ignore[arg-type]
    return driver, dev


# ---- power-up ----


async def test_power_on_returns_atr_and_skips_set_parameters_when_reader_negotiates() -> None:
    driver, dev = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR))
    assert await driver.power_on() == YUBIKEY_ATR
    assert dev.types() == [MessageType.PC_to_RDR_IccPowerOn]  # 0x40 AUTO_PPS_PROP: no SetParameters
    assert dev.sent[0].b7 == 0  # AUTO_VOLTAGE: bPowerSelect automatic


async def test_power_on_sends_set_parameters_from_the_atr_without_auto_pps() -> None:
    desc = replace(YUBIKEY5, features=0x00040008)
    driver, dev = await _driver(desc, card_handler(YUBIKEY_ATR))
    await driver.power_on()
    setp = dev.sent[1]
    assert setp.msg_type is MessageType.PC_to_RDR_SetParameters
    assert setp.b7 == 1 and setp.data == bytes.fromhex("11 10 00 15 00 FE 00")


async def test_power_on_tolerates_unchangeable_parameters() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_SetParameters:  # bError 7 = "parameter not changeable"
            return [ccid.parameters(msg.seq, 1, msg.data, cmd=CommandStatus.FAILED, error=7).encode()]
        return base(msg)

    driver, _ = await _driver(replace(YUBIKEY5, features=0x00040008), handler)
    assert await driver.power_on() == YUBIKEY_ATR


async def test_power_on_falls_back_to_the_next_voltage() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_IccPowerOn and msg.b7 == 1:  # mute at 5 V
            return [
                ccid.data_block(
                    msg.seq, icc=IccStatus.PRESENT_INACTIVE, cmd=CommandStatus.FAILED, error=0xFE
                ).encode()
            ]
        return base(msg)

    desc = CcidClassDescriptor(features=0x00040040, voltage_support=0x07, protocols=2)
    driver, dev = await _driver(desc, handler)
    assert await driver.power_on() == YUBIKEY_ATR
    power_ons = [m.b7 for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_IccPowerOn]
    assert power_ons == [1, 2]
    assert MessageType.PC_to_RDR_IccPowerOff in dev.types()


async def test_power_on_without_a_card_says_so() -> None:
    def handler(msg: CcidMessage) -> list[bytes]:
        return [ccid.data_block(msg.seq, icc=IccStatus.ABSENT, cmd=CommandStatus.FAILED, error=0xFE).encode()]

    driver, _ = await _driver(YUBIKEY5, handler)
    with pytest.raises(CardError, match="no card in the slot") as info:
        await driver.power_on()
    assert info.value.slot_error == 0xFE


async def test_power_on_with_a_malformed_atr_is_a_card_error() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(b"\x00\x01"))
    with pytest.raises(CardError, match="malformed atr 00 01"):
        await driver.power_on()


def test_character_level_readers_are_refused() -> None:
    with pytest.raises(DeviceError, match="character-level"):
        CcidDriver(FakeDevice(CcidClassDescriptor(features=0), card_handler(YUBIKEY_ATR)))  # type: ignore[arg-type]


# ---- sequence numbers, stale frames, time extension ----


async def test_bseq_counts_per_command_and_wraps_at_256() -> None:
    driver, dev = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR))
    for _ in range(300):
        assert await driver.slot_present()
    assert [m.seq for m in dev.sent] == [i & 0xFF for i in range(300)]


async def test_frames_with_a_foreign_bseq_are_dropped() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        stale = ccid.data_block((msg.seq - 1) & 0xFF, b"\x6a\x82").encode()
        return [stale, stale, *base(msg)]

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    assert await driver.transmit(b"\x00\xa4\x04\x00") == b"\x00\xa4\x04\x00\x90\x00"


async def test_ten_foreign_frames_fail_the_apdu_and_cold_reset_the_card() -> None:
    base = card_handler(YUBIKEY_ATR)
    flood = {"on": False}

    def handler(msg: CcidMessage) -> list[bytes]:
        if flood["on"] and msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            flood["on"] = False
            return [ccid.data_block((msg.seq + 7) & 0xFF, b"\x90\x00").encode()] * 10
        return base(msg)

    driver, dev = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    flood["on"] = True
    with pytest.raises(CardError, match="foreign bSeq"):
        await driver.transmit(b"\x00\xb0\x00\x00")
    assert dev.types()[-2:] == [MessageType.PC_to_RDR_IccPowerOff, MessageType.PC_to_RDR_IccPowerOn]
    assert await driver.transmit(b"\x01\x02") == b"\x01\x02\x90\x00"  # the card works again


async def test_time_extension_frames_are_waited_through() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        te = ccid.data_block(msg.seq, cmd=CommandStatus.TIME_EXTENSION, error=1).encode()
        assert te[7] == 0x80  # reference §1.13: 80 00 00 00 00 00 05 80 01 00
        return [te, te, te, *base(msg)]

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    assert await driver.transmit(b"\x00\x87") == b"\x00\x87\x90\x00"


class _EndlessTimeExtension(FakeDevice):
    async def read(self) -> bytes:
        await trio.sleep(1)
        seq = self.sent[-1].seq
        return ccid.slot_status(
            seq, icc=IccStatus.PRESENT_ACTIVE, cmd=CommandStatus.TIME_EXTENSION, error=2
        ).encode()


async def test_endless_time_extension_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    dev = _EndlessTimeExtension(YUBIKEY5, card_handler(YUBIKEY_ATR))
    driver = CcidDriver(dev, frame_timeout_s=5, max_wait_s=30)  # type: ignore[arg-type]
    start = trio.current_time()
    with pytest.raises(DeviceTimeoutError, match="within 30 s"):
        await driver.slot_present()
    assert trio.current_time() - start == pytest.approx(30)


async def test_silent_device_times_out_after_the_frame_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver, _ = await _driver(YUBIKEY5, lambda msg: [], frame_timeout_s=3, max_wait_s=60)
    start = trio.current_time()
    with pytest.raises(DeviceTimeoutError, match="no ccid frame for bSeq 0 within 3 s"):
        await driver.slot_present()
    assert trio.current_time() - start == pytest.approx(3)


async def test_answer_of_the_wrong_type_is_a_card_error() -> None:
    def handler(msg: CcidMessage) -> list[bytes]:
        return [ccid.data_block(msg.seq).encode()]  # DataBlock to GetSlotStatus

    driver, _ = await _driver(YUBIKEY5, handler)
    with pytest.raises(CardError, match="RDR_to_PC_DataBlock does not match RDR_to_PC_SlotStatus"):
        await driver.slot_present()


async def test_malformed_response_fails_the_apdu_and_the_next_apdu_works() -> None:
    base = card_handler(YUBIKEY_ATR)
    armed = {"on": False}

    def handler(msg: CcidMessage) -> list[bytes]:
        frames = base(msg)
        if armed["on"] and msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            armed["on"] = False
            return [frames[0][:-1]]  # dwLength now lies
        return frames

    driver, dev = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    armed["on"] = True
    with pytest.raises(CardError, match="card was reset"):
        await driver.transmit(b"\x00\xca")
    assert dev.types()[-2:] == [MessageType.PC_to_RDR_IccPowerOff, MessageType.PC_to_RDR_IccPowerOn]
    assert await driver.transmit(b"\x00\xcb") == b"\x00\xcb\x90\x00"


async def test_slot_error_on_xfr_block_names_the_error() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            return [ccid.data_block(msg.seq, cmd=CommandStatus.FAILED, error=0xFB).encode()]
        return base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    with pytest.raises(CardError, match="HW_ERROR") as info:
        await driver.transmit(b"\x00\xca")
    assert info.value.slot_error == 0xFB


async def test_transmit_before_power_on_is_refused() -> None:
    driver, dev = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR))
    with pytest.raises(CardError, match="not powered"):
        await driver.transmit(b"\x00\xa4")
    assert dev.sent == []


async def test_a_cancelled_exchange_cold_resets_before_the_next_apdu() -> None:
    base = card_handler(YUBIKEY_ATR)
    mute = {"on": False}

    def handler(msg: CcidMessage) -> list[bytes]:
        if mute["on"]:
            mute["on"] = False
            return []
        return base(msg)

    driver, dev = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    mute["on"] = True
    with trio.move_on_after(0.01):
        await driver.transmit(b"\x00\x01")
    dev.sent.clear()
    assert await driver.transmit(b"\x00\x02") == b"\x00\x02\x90\x00"
    assert dev.types() == [
        MessageType.PC_to_RDR_IccPowerOff,
        MessageType.PC_to_RDR_IccPowerOn,
        MessageType.PC_to_RDR_XfrBlock,
    ]


# ---- exchange levels ----


class ChainingCard:
    """An extended-APDU reader with tiny messages: reassembles chained commands, chains answers."""

    def __init__(self, max_message_length: int, answer: bytes) -> None:
        self.chunk = max_message_length - 10
        self.answer = answer
        self.command = bytearray()
        self.pending = b""
        self.levels: list[int] = []

    def __call__(self, msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is not MessageType.PC_to_RDR_XfrBlock:
            return card_handler(YUBIKEY_ATR)(msg)
        level = msg.level_parameter
        self.levels.append(level)
        if level == 0x10:
            return [self._next(msg.seq)]
        self.command += msg.data
        if level in (0x01, 0x03):
            return [ccid.data_block(msg.seq).encode()]
        self.pending = self.answer
        return [self._next(msg.seq, first=True)]

    def _next(self, seq: int, *, first: bool = False) -> bytes:
        piece, self.pending = self.pending[: self.chunk], self.pending[self.chunk :]
        chain = (0x01 if self.pending else 0x00) if first else (0x03 if self.pending else 0x02)
        return ccid.data_block(seq, piece, chain=chain).encode()


async def test_extended_level_chains_long_commands_and_responses() -> None:
    answer = bytes(range(256)) * 3 + b"\x90\x00"
    card = ChainingCard(275, answer)
    driver, _ = await _driver(FUSION, card)
    await driver.power_on()
    apdu = b"\x00\xdb\x3f\xff\x00\x02\x58" + bytes(600)
    assert await driver.transmit(apdu) == answer
    assert bytes(card.command) == apdu
    assert card.levels == [0x01, 0x03, 0x02, 0x10, 0x10]


async def test_short_apdu_level_refuses_an_apdu_longer_than_the_reader_takes() -> None:
    driver, dev = await _driver(SHORT, card_handler(YUBIKEY_ATR))
    await driver.power_on()
    sent = len(dev.sent)
    with pytest.raises(CardError, match="exceeds the reader's 261-byte limit"):
        await driver.transmit(bytes(262))
    assert len(dev.sent) == sent  # refused locally, card untouched


def _t0_card(msg: CcidMessage) -> bytes:
    apdu = msg.data
    if apdu[1] == 0xC0:  # GET RESPONSE: serve 300 bytes in 256 + 44
        return (bytes(256) + b"\x61\x2c") if apdu[4] == 0 else (b"\x01" * apdu[4] + b"\x90\x00")
    if apdu[1] in (0xB0, 0x20):  # READ BINARY (or a 5-byte VERIFY) with a wrong Le: 6C 04
        return b"\x6c\x04" if apdu[4] != 4 else b"ABCD\x90\x00"
    return b"\x61\x00"


async def test_t0_tpdu_collects_61xx_with_get_response() -> None:
    driver, dev = await _driver(T0_TPDU, card_handler(T0_ATR, _t0_card))
    await driver.power_on()
    assert driver.protocol == 0
    rapdu = await driver.transmit(b"\x00\xcb\x3f\xff\x03\x5c\x01\x7e\x00")
    assert rapdu == bytes(256) + b"\x01" * 44 + b"\x90\x00"
    xfrs = [m.data for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_XfrBlock]
    assert xfrs[0] == b"\x00\xcb\x3f\xff\x03\x5c\x01\x7e"  # case 4 goes without Le over T=0
    assert xfrs[1:] == [b"\x00\xc0\x00\x00\x00", b"\x00\xc0\x00\x00\x2c"]


async def test_t0_tpdu_resends_with_the_le_the_card_asked_for() -> None:
    driver, _ = await _driver(T0_TPDU, card_handler(T0_ATR, _t0_card))
    await driver.power_on()
    assert await driver.transmit(b"\x00\xb0\x00\x00\x10") == b"ABCD\x90\x00"


async def test_t0_tpdu_never_resends_a_pin_command_on_6cxx() -> None:
    # Promise P2: the bridge never sends a PIN-class command twice; the card's 6Cxx goes back
    # to the client, which decides itself whether to send the command again.
    driver, dev = await _driver(T0_TPDU, card_handler(T0_ATR, _t0_card))
    await driver.power_on()
    assert await driver.transmit(b"\x00\x20\x00\x80\x10") == b"\x6c\x04"
    xfrs = [m.data for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_XfrBlock]
    assert xfrs == [b"\x00\x20\x00\x80\x10"]


# ---- presence and interrupts ----


async def test_slot_present_reads_the_icc_status_even_from_a_failed_answer() -> None:
    def handler(msg: CcidMessage) -> list[bytes]:
        return [bytes.fromhex("81 00 00 00 00 00") + bytes([msg.seq]) + bytes.fromhex("42 FE 00")]

    driver, _ = await _driver(YUBIKEY5, handler)
    assert await driver.slot_present() is False


async def test_watch_interrupts_forwards_notifications_and_drops_garbage() -> None:
    dev = FakeDevice(YUBIKEY5, card_handler(YUBIKEY_ATR))
    driver = CcidDriver(dev)  # type: ignore[arg-type]
    send, recv = trio.open_memory_channel[object](5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.watch_interrupts, send)
        dev.irq_tx.send_nowait(b"\x99")
        dev.irq_tx.send_nowait(b"\x50\x02")
        assert await recv.receive() == NotifySlotChange(present=(False,), changed=(True,))
        nursery.cancel_scope.cancel()


async def test_watch_interrupts_returns_and_closes_the_channel_without_an_interrupt_pipe() -> None:
    dev = FakeDevice(YUBIKEY5, card_handler(YUBIKEY_ATR), has_interrupt=False)
    send, recv = trio.open_memory_channel[object](1)
    await CcidDriver(dev).watch_interrupts(send)  # type: ignore[arg-type]
    with pytest.raises(trio.EndOfChannel):
        await recv.receive()


async def test_pin_never_reaches_the_log() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR, lambda m: b"\x90\x00"))
    await driver.power_on()
    verify = bytes.fromhex("00 20 00 80 08") + b"987654\xff\xff"
    with structlog.testing.capture_logs() as logs:
        assert await driver.transmit(verify) == b"\x90\x00"
    assert any(e["event"] == "apdu.sent" for e in logs)
    text = repr(logs)
    assert "987654" not in text and "393837" not in text.replace(" ", "").lower()
