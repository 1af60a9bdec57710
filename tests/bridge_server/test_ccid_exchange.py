"""CCID driver exchange logic at its edges: T=1 TPDU errors and IFSD, T=0 procedure bytes, limits.

Same scripted device as test_ccid_driver.py; a `T1Card` plays the token behind a TPDU reader.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs
from test_ccid_driver import (
    ETOKEN_5100_ATR,
    FUSION,
    INFO,
    SHORT,
    T0_ATR,
    T0_TPDU,
    TPDU_5100,
    YUBIKEY5,
    YUBIKEY_ATR,
    ChainingCard,
    FakeDevice,
    _driver,
    _EndlessTimeExtension,
    card_handler,
)

from bridge_server.errors import CardError, DeviceError, DeviceTimeoutError
from bridge_server.usb.ccid_driver import CcidDriver
from protocol import ccid
from protocol.ccid import CcidClassDescriptor, CcidMessage, CommandStatus, IccStatus, MessageType
from protocol.t1 import ApduComplete, SendBlock, T1Card


def t1_token(
    app: Callable[[bytes], bytes] = lambda apdu: apdu + b"\x90\x00",
) -> Callable[[CcidMessage], bytes]:
    """A T=1 card behind a TPDU reader: each XfrBlock carries one block, each answer one block."""
    card = T1Card()

    def xfr(msg: CcidMessage) -> bytes:
        step = card.receive(msg.data)
        if isinstance(step, SendBlock):
            return step.block
        if isinstance(step, ApduComplete):
            return card.respond(app(step.apdu))
        return b""

    return xfr


def xfr_blocks(dev: object) -> list[bytes]:
    return [m.data for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_XfrBlock]  # type: ignore[attr-defined]


# ---- T=1 over a TPDU reader ----


async def test_power_on_of_a_t1_tpdu_token_negotiates_the_readers_ifsd() -> None:
    driver, dev = await _driver(TPDU_5100, card_handler(ETOKEN_5100_ATR, t1_token()))
    await driver.power_on()
    assert driver.protocol == 1
    assert xfr_blocks(dev) == [bytes.fromhex("00 C1 01 FC 3C")]  # S(IFS request 252): the reader's max_ifsd
    assert await driver.transmit(b"\x00\xca\x01\x02\x00") == b"\x00\xca\x01\x02\x00\x90\x00"


async def test_an_ifsd_above_what_t1_can_carry_is_negotiated_as_254() -> None:
    desc = replace(TPDU_5100, max_ifsd=3062)
    driver, dev = await _driver(desc, card_handler(ETOKEN_5100_ATR, t1_token()))
    await driver.power_on()
    assert xfr_blocks(dev)[0][3] == 254


async def test_a_reader_with_an_ifsd_of_1_negotiates_it() -> None:
    desc = replace(TPDU_5100, max_ifsd=1)
    driver, dev = await _driver(desc, card_handler(ETOKEN_5100_ATR, t1_token()))
    await driver.power_on()
    assert xfr_blocks(dev) == [bytes.fromhex("00 C1 01 01 C1")]


async def test_a_reader_without_an_ifsd_skips_the_negotiation() -> None:
    desc = replace(TPDU_5100, max_ifsd=0)
    driver, dev = await _driver(desc, card_handler(ETOKEN_5100_ATR, t1_token()))
    await driver.power_on()
    assert xfr_blocks(dev) == []


async def test_a_token_that_never_accepts_the_ifsd_fails_power_on_and_says_which() -> None:
    driver, _ = await _driver(TPDU_5100, card_handler(ETOKEN_5100_ATR, lambda msg: b"\x00\x80\x00\x80"))
    with pytest.raises(
        CardError, match=r"^T=1 IFSD negotiation \(IFSD 252\) failed: card did not accept ifsd 252"
    ):
        await driver.power_on()


def _failing_xfr(
    error: int, *, icc: IccStatus = IccStatus.PRESENT_ACTIVE, times: int = 1
) -> Callable[[CcidMessage], list[bytes]]:
    base = card_handler(ETOKEN_5100_ATR, t1_token())
    left = {"n": 0}

    def handler(msg: CcidMessage) -> list[bytes]:
        if (
            msg.msg_type is MessageType.PC_to_RDR_XfrBlock
            and msg.data[:3] != bytes.fromhex("00 C1 01")
            and left["n"]
        ):
            left["n"] -= 1
            return [ccid.data_block(msg.seq, icc=icc, cmd=CommandStatus.FAILED, error=error).encode()]
        return base(msg)

    handler.arm = lambda: left.update(n=times)  # type: ignore[attr-defined]
    return handler


@pytest.mark.parametrize("error", [0xFD, 0xFE], ids=["XFR_PARITY_ERROR", "ICC_MUTE"])
async def test_a_parity_error_or_mute_card_is_retried_with_an_r_block(error: int) -> None:
    handler = _failing_xfr(error)
    driver, dev = await _driver(TPDU_5100, handler)
    await driver.power_on()
    handler.arm()  # type: ignore[attr-defined]
    dev.sent.clear()
    assert await driver.transmit(b"\x00\xca\x01\x02\x00") == b"\x00\xca\x01\x02\x00\x90\x00"
    blocks = xfr_blocks(dev)
    assert blocks[1] == bytes.fromhex("00 81 00 81")  # R(0) with the EDC error bit: send it again


async def test_a_slot_error_that_is_not_a_transmission_error_fails_the_apdu() -> None:
    handler = _failing_xfr(0xFB)  # HW_ERROR
    driver, _ = await _driver(TPDU_5100, handler)
    await driver.power_on()
    handler.arm()  # type: ignore[attr-defined]
    with pytest.raises(CardError, match="HW_ERROR"):
        await driver.transmit(b"\x00\xca\x01\x02\x00")


async def test_a_mute_answer_from_an_empty_slot_fails_the_apdu() -> None:
    handler = _failing_xfr(0xFE, icc=IccStatus.ABSENT)
    driver, _ = await _driver(TPDU_5100, handler)
    await driver.power_on()
    handler.arm()  # type: ignore[attr-defined]
    with pytest.raises(CardError):
        await driver.transmit(b"\x00\xca\x01\x02\x00")


async def test_a_wtx_request_is_answered_with_the_multiplier_as_bbwi() -> None:
    card = T1Card()
    state = {"asked": False}

    def xfr(msg: CcidMessage) -> bytes:
        step = card.receive(msg.data)
        if isinstance(step, ApduComplete) and not state["asked"]:
            state["asked"] = True
            state["pending"] = step.apdu  # type: ignore[assignment]
            return card.request_wtx(3)
        if isinstance(step, ApduComplete):
            return card.respond(step.apdu + b"\x90\x00")
        if isinstance(step, SendBlock):
            return step.block
        return card.respond(state["pending"] + b"\x90\x00")  # type: ignore[operator]

    driver, dev = await _driver(TPDU_5100, card_handler(ETOKEN_5100_ATR, xfr))
    await driver.power_on()
    dev.sent.clear()
    assert await driver.transmit(b"\x00\xca\x01\x02\x00") == b"\x00\xca\x01\x02\x00\x90\x00"
    xfrs = [m for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_XfrBlock]
    assert [m.b7 for m in xfrs] == [0, 3]  # bBWI: the S(WTX response) carries the card's multiplier
    assert [m.level_parameter for m in xfrs] == [0, 0]  # one whole T=1 block per XfrBlock


# ---- T=0 ----


def _t0(answer: Callable[[bytes], bytes]) -> Callable[[CcidMessage], list[bytes]]:
    return card_handler(T0_ATR, lambda msg: answer(msg.data))


async def test_t0_a_case_3_command_goes_whole_and_6cxx_to_it_is_returned_as_is() -> None:
    driver, dev = await _driver(T0_TPDU, _t0(lambda apdu: b"\x6c\x04"))
    await driver.power_on()
    case3 = b"\x00\xda\x3f\xff\x02\xaa\xbb"
    assert await driver.transmit(case3) == b"\x6c\x04"
    assert xfr_blocks(dev) == [case3]


async def test_t0_get_response_keeps_the_channel_and_drops_the_chaining_bit() -> None:
    def card(apdu: bytes) -> bytes:
        return b"\x01\x02\x90\x00" if apdu[1] == 0xC0 else b"\x61\x02"

    driver, dev = await _driver(T0_TPDU, _t0(card))
    await driver.power_on()
    assert await driver.transmit(b"\x13\xcb\x3f\xff\x00") == b"\x01\x02\x90\x00"
    assert xfr_blocks(dev)[-1] == b"\x03\xc0\x00\x00\x02"


async def test_t0_a_card_that_always_has_more_is_stopped() -> None:
    driver, _ = await _driver(T0_TPDU, _t0(lambda apdu: b"\x61\x01" if apdu[1] != 0xC0 else b"\x00\x61\x01"))
    await driver.power_on()
    with pytest.raises(
        CardError,
        match=r"^apdu exchange failed and the card was reset: card kept answering 61xx for 256 rounds$",
    ):
        await driver.transmit(b"\x00\xcb\x3f\xff\x00")


async def test_t0_an_answer_without_a_status_word_is_returned_as_is() -> None:
    driver, _ = await _driver(T0_TPDU, _t0(lambda apdu: b"\x61"))
    await driver.power_on()
    assert await driver.transmit(b"\x00\xcb\x3f\xff\x00") == b"\x61"


async def test_t0_refuses_a_command_longer_than_the_reader_takes_in_one_block() -> None:
    driver, dev = await _driver(T0_TPDU, _t0(lambda apdu: b"\x90\x00"))
    await driver.power_on()
    limit = T0_TPDU.max_apdu_data
    assert await driver.transmit(bytes(limit)) == b"\x90\x00"
    sent = len(dev.sent)
    refusal = rf"^apdu of {limit + 1} bytes exceeds the reader's {limit}-byte limit at tpdu level "
    with pytest.raises(CardError, match=refusal + r"\(no chaining there\)$"):
        await driver.transmit(bytes(limit + 1))
    assert len(dev.sent) == sent


# ---- parameters, power ----


@pytest.mark.parametrize(("error", "kept"), [(0x00, True), (0x7F, True), (0x80, False), (0xFE, False)])
async def test_set_parameters_refused_as_not_changeable_is_kept_other_refusals_fail(
    error: int, kept: bool
) -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_SetParameters:
            return [ccid.parameters(msg.seq, 1, msg.data, cmd=CommandStatus.FAILED, error=error).encode()]
        return base(msg)

    driver, _ = await _driver(replace(YUBIKEY5, features=0x00040008), handler)
    if kept:
        with capture_logs() as logs:
            assert await driver.power_on() == YUBIKEY_ATR
        assert [e["event"] for e in logs if e["event"].startswith("ccid.")] == ["ccid.parameters_kept"]
    else:
        with pytest.raises(CardError, match=r"^SetParameters failed"):
            await driver.power_on()


async def test_accepted_parameters_are_not_reported_as_kept() -> None:
    driver, _ = await _driver(replace(YUBIKEY5, features=0x00040008), card_handler(YUBIKEY_ATR))
    with capture_logs() as logs:
        await driver.power_on()
    assert [e["event"] for e in logs if e["event"].startswith("ccid.")] == []


async def test_a_failed_power_off_is_reported() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_IccPowerOff:
            return [
                ccid.slot_status(
                    msg.seq, icc=IccStatus.PRESENT_ACTIVE, cmd=CommandStatus.FAILED, error=0xFB
                ).encode()
            ]
        return base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    with pytest.raises(CardError, match=r"^IccPowerOff failed: HW_ERROR"):
        await driver.power_off()
    assert driver.atr is None  # whatever the reader says, the card is no longer ours to use


async def test_the_last_power_on_failure_is_reported_after_every_voltage() -> None:
    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_IccPowerOn:
            return [
                ccid.data_block(
                    msg.seq, icc=IccStatus.PRESENT_INACTIVE, cmd=CommandStatus.FAILED, error=0xFE
                ).encode()
            ]
        return card_handler(YUBIKEY_ATR)(msg)

    desc = replace(YUBIKEY5, features=0x00040040, voltage_support=0x07)
    driver, dev = await _driver(desc, handler)
    with pytest.raises(CardError, match=r"^IccPowerOn failed: ICC_MUTE"):
        await driver.power_on()
    assert [m.b7 for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_IccPowerOn] == [1, 2, 3]


async def test_an_empty_slot_is_not_tried_at_the_other_voltages() -> None:
    def handler(msg: CcidMessage) -> list[bytes]:
        return [ccid.data_block(msg.seq, icc=IccStatus.ABSENT, cmd=CommandStatus.FAILED, error=0xFE).encode()]

    desc = replace(YUBIKEY5, features=0x00040040, voltage_support=0x07)
    driver, dev = await _driver(desc, handler)
    with pytest.raises(CardError, match=r"^IccPowerOn failed"):
        await driver.power_on()
    assert dev.types() == [MessageType.PC_to_RDR_IccPowerOn]


async def test_power_on_is_logged_with_the_protocol_and_atr() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR))
    with capture_logs() as logs:
        await driver.power_on()
    (on,) = [e for e in logs if e["event"] == "card.powered_on"]
    assert (on["protocol"], on["atr"], on["log_level"]) == (1, YUBIKEY_ATR.hex(), "info")


async def test_a_malformed_atr_is_shown_in_the_error() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(b"\x00\x01"))
    with pytest.raises(CardError, match=r"^card answered power-on with a malformed atr 00 01: "):
        await driver.power_on()


# ---- what the driver says ----


async def test_before_power_on_there_is_no_atr_no_protocol_and_no_exchange() -> None:
    driver, dev = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR))
    assert (driver.atr, driver.protocol) == (None, None)
    with pytest.raises(CardError, match=r"^the card is not powered on; power it on first$"):
        await driver.transmit(b"\x00\xa4\x04\x00")
    assert dev.sent == []


def test_a_character_level_reader_is_refused_by_name() -> None:
    dev = FakeDevice(CcidClassDescriptor(features=0), card_handler(YUBIKEY_ATR))
    with pytest.raises(
        DeviceError, match=rf"^{re.escape(INFO.describe())}: character-level ccid readers are not supported$"
    ):
        CcidDriver(dev)  # type: ignore[arg-type]


async def test_the_default_frame_timeout_is_10_s(autojump_clock: trio.testing.MockClock) -> None:
    dev = FakeDevice(YUBIKEY5, lambda msg: [])
    driver = CcidDriver(dev)  # type: ignore[arg-type]
    start = trio.current_time()
    with pytest.raises(DeviceTimeoutError, match=r"within 10 s$"):
        await driver.slot_present()
    assert trio.current_time() - start == pytest.approx(10)


async def test_the_default_cap_on_one_exchange_is_60_s(autojump_clock: trio.testing.MockClock) -> None:
    dev = _EndlessTimeExtension(YUBIKEY5, card_handler(YUBIKEY_ATR))
    driver = CcidDriver(dev)  # type: ignore[arg-type]
    start = trio.current_time()
    final = f"{INFO.describe()}: no final answer to PC_to_RDR_GetSlotStatus (bSeq 0) within 60 s"
    with pytest.raises(DeviceTimeoutError, match=f"^{re.escape(final)}$"):
        await driver.slot_present()
    assert trio.current_time() - start == pytest.approx(60)


async def test_a_failed_apdu_says_the_card_was_reset_and_logs_why() -> None:
    handler = _failing_xfr(0xFB)
    driver, _ = await _driver(TPDU_5100, handler)
    await driver.power_on()
    handler.arm()  # type: ignore[attr-defined]
    with capture_logs() as logs, pytest.raises(CardError) as err:
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    assert str(err.value).startswith("apdu exchange failed and the card was reset: XfrBlock failed: HW_ERROR")
    assert [(e["event"], e["log_level"]) for e in logs if e["event"] in ("apdu.failed", "card.reset")] == [
        ("apdu.failed", "warning"),
        ("card.reset", "info"),
    ]


async def test_the_reset_after_an_interrupted_exchange_is_logged() -> None:
    mute = {"on": False}
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if mute["on"]:
            mute["on"] = False
            return []
        return base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    mute["on"] = True
    with trio.move_on_after(0.01):
        await driver.transmit(b"\x00\x01")
    with capture_logs() as logs:
        await driver.transmit(b"\x00\x02")
    assert ("card.reset", "warning", "previous exchange interrupted") in [
        (e["event"], e["log_level"], e.get("reason")) for e in logs
    ]


async def test_each_answer_is_logged_by_its_status_word_and_length() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(YUBIKEY_ATR, lambda m: b"\x01\x02\x03\x61\x10"))
    await driver.power_on()
    with capture_logs() as logs:
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    (received,) = [e for e in logs if e["event"] == "apdu.received"]
    assert (received["sw"], received["length"], received["log_level"]) == ("6110", 5, "debug")


async def test_t0_a_long_answer_is_collected_over_several_get_responses() -> None:
    data = bytes(range(256)) * 2 + b"\x07" * 88
    left = {"rest": data}

    def card(apdu: bytes) -> bytes:
        if apdu[1] != 0xC0:
            return b"\x61\x00"
        piece, left["rest"] = left["rest"][: apdu[4] or 256], left["rest"][apdu[4] or 256 :]
        more = len(left["rest"])
        return piece + (bytes([0x61, min(more, 256) & 0xFF]) if more else b"\x90\x00")

    driver, _ = await _driver(T0_TPDU, _t0(card))
    await driver.power_on()
    assert await driver.transmit(b"\x00\xcb\x3f\xff\x00") == data + b"\x90\x00"


async def test_extended_level_asks_for_the_rest_of_an_answer_with_empty_blocks() -> None:
    answer = bytes(600) + b"\x90\x00"
    card = ChainingCard(275, answer)
    asks: list[bytes] = []

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock and msg.level_parameter == 0x10:
            asks.append(msg.data)
        return card(msg)

    driver, _ = await _driver(FUSION, handler)
    await driver.power_on()
    assert await driver.transmit(b"\x00\xcb\x3f\xff\x00") == answer
    assert asks == [b"", b""]


async def test_a_short_apdu_block_asks_for_no_extra_wait_and_no_chaining() -> None:
    driver, dev = await _driver(SHORT, card_handler(YUBIKEY_ATR))
    await driver.power_on()
    await driver.transmit(b"\x00\xca\x01\x02\x00")
    (xfr,) = [m for m in dev.sent if m.msg_type is MessageType.PC_to_RDR_XfrBlock]
    assert (xfr.b7, xfr.level_parameter) == (0, 0)  # bBWI 0, wLevelParameter 0


async def test_a_slot_error_at_apdu_level_names_the_command() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            return [ccid.data_block(msg.seq, cmd=CommandStatus.FAILED, error=0xFB).encode()]
        return base(msg)

    driver, _ = await _driver(SHORT, handler)
    await driver.power_on()
    with pytest.raises(CardError) as err:
        await driver.transmit(b"\x00\xca")
    assert str(err.value).startswith("apdu exchange failed and the card was reset: XfrBlock failed: HW_ERROR")


async def test_a_silent_card_fails_the_apdu_after_the_frame_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = card_handler(YUBIKEY_ATR)
    driver, _ = await _driver(
        YUBIKEY5,
        lambda m: [] if m.msg_type is MessageType.PC_to_RDR_XfrBlock else base(m),
        frame_timeout_s=10,
    )
    await driver.power_on()
    start = trio.current_time()
    with pytest.raises(
        DeviceTimeoutError, match=rf"^{re.escape(INFO.describe())}: no ccid frame for bSeq 1 within 10 s$"
    ):
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    assert trio.current_time() - start == pytest.approx(10)


async def test_nine_foreign_frames_are_still_dropped() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            return [ccid.data_block((msg.seq + 7) & 0xFF, b"\x90\x00").encode()] * 9 + base(msg)
        return base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    assert await driver.transmit(b"\x01\x02") == b"\x01\x02\x90\x00"


def _te_then_silent(error: int) -> Callable[[CcidMessage], list[bytes]]:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            return [ccid.data_block(msg.seq, cmd=CommandStatus.TIME_EXTENSION, error=error).encode()]
        return base(msg)

    return handler


@pytest.mark.parametrize(("multiplier", "wait"), [(3, 30.0), (1, 10.0), (0, 10.0)])
async def test_a_time_extension_multiplies_the_wait_for_the_next_frame(
    autojump_clock: trio.testing.MockClock, multiplier: int, wait: float
) -> None:
    driver, _ = await _driver(YUBIKEY5, _te_then_silent(multiplier), frame_timeout_s=10, max_wait_s=100)
    await driver.power_on()
    start = trio.current_time()
    with capture_logs() as logs, pytest.raises(DeviceTimeoutError, match=rf"within {wait:g} s$"):
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    assert trio.current_time() - start == pytest.approx(wait)
    assert [(e["event"], e["multiplier"]) for e in logs if e["event"] == "ccid.time_extension"] == [
        ("ccid.time_extension", multiplier)
    ]


async def test_after_a_reset_the_next_apdu_goes_straight_to_the_card() -> None:
    handler = _failing_xfr(0xFB)
    driver, dev = await _driver(TPDU_5100, handler)
    await driver.power_on()
    handler.arm()  # type: ignore[attr-defined]
    with capture_logs() as logs, pytest.raises(CardError):
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    assert ("card.reset", "failed exchange") in [(e["event"], e.get("reason")) for e in logs]
    dev.sent.clear()
    assert await driver.transmit(b"\x00\xca\x01\x02\x00") == b"\x00\xca\x01\x02\x00\x90\x00"
    assert MessageType.PC_to_RDR_IccPowerOff not in dev.types()


async def test_a_reset_that_fails_is_logged_and_the_apdu_still_fails() -> None:
    state = {"broken": False}
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if state["broken"] and msg.msg_type is not MessageType.PC_to_RDR_IccPowerOff:
            return [
                ccid.data_block(msg.seq, icc=IccStatus.ABSENT, cmd=CommandStatus.FAILED, error=0xFE).encode()
            ]
        return base(msg)

    driver, dev = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    state["broken"] = True
    with capture_logs() as logs, pytest.raises(CardError):
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    assert [e["log_level"] for e in logs if e["event"] == "card.reset_failed"] == ["warning"]
    state["broken"] = False
    sent = len(dev.sent)
    with pytest.raises(CardError, match="not powered on"):  # no second reset behind the caller's back
        await driver.transmit(b"\x00\xca\x01\x02\x00")
    assert len(dev.sent) == sent


async def test_foreign_frames_are_dropped_quietly_and_ten_say_so() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            return [ccid.data_block((msg.seq + 7) & 0xFF, b"\x90\x00").encode()] * 10
        return base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    with capture_logs() as logs, pytest.raises(CardError) as err:
        await driver.transmit(b"\x01\x02")
    assert str(err.value) == (
        "apdu exchange failed and the card was reset: 10 ccid frames with a foreign bSeq (expected 1)"
    )
    assert [e["log_level"] for e in logs if e["event"] == "ccid.stale_dropped"] == ["debug"] * 10


async def test_an_answer_of_the_wrong_type_says_both_types() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            return [ccid.slot_status(msg.seq, icc=IccStatus.PRESENT_ACTIVE).encode()]
        return base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    with pytest.raises(CardError) as err:
        await driver.transmit(b"\x01\x02")
    assert str(err.value).endswith("ccid answer type RDR_to_PC_SlotStatus does not match RDR_to_PC_DataBlock")


async def test_a_garbled_answer_is_a_malformed_ccid_answer() -> None:
    base = card_handler(YUBIKEY_ATR)

    def handler(msg: CcidMessage) -> list[bytes]:
        return [b"\x80\x00"] if msg.msg_type is MessageType.PC_to_RDR_XfrBlock else base(msg)

    driver, _ = await _driver(YUBIKEY5, handler)
    await driver.power_on()
    with pytest.raises(CardError) as err:
        await driver.transmit(b"\x01\x02")
    assert str(err.value).startswith(
        f"apdu exchange failed and the card was reset: {INFO.describe()}: malformed ccid answer: "
    )
