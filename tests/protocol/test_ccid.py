"""CCID rev 1.1 bulk and interrupt messages: spec vectors, builders, rejects, round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ccid import (
    HEADER_LEN,
    MAX_DATA_LENGTH,
    MAX_MESSAGE_LENGTH,
    CcidMessage,
    CommandStatus,
    HardwareError,
    IccStatus,
    MessageType,
    NotifySlotChange,
    SlotError,
    abort,
    data_block,
    decode_interrupt,
    decode_message,
    escape,
    escape_response,
    get_slot_status,
    icc_power_off,
    icc_power_on,
    parameters,
    response_type_for,
    set_parameters,
    slot_status,
    status_byte,
    xfr_block,
)
from protocol.errors import LocalProtocolError, MalformedCcidMessageError, RemoteProtocolError

ATR_5100 = bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4")
T1_PARAMS = bytes.fromhex("11 10 00 7D 00 FE 00")
T0_PARAMS = bytes.fromhex("11 00 00 0A 00")
SELECT_PIV_APDU = bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00")
SELECT_PIV_IBLOCK = bytes.fromhex("00 00 0F") + SELECT_PIV_APDU + bytes.fromhex("1D")

# Reference §1.13, "Worked CCID frames (slot 0)", byte for byte.
SPEC_FRAMES = [
    ("IccPowerOn auto", icc_power_on(0), "62 00 00 00 00 00 00 00 00 00"),
    ("DataBlock ATR", data_block(0, ATR_5100), "80 0E 00 00 00 00 00 00 00 00" + ATR_5100.hex()),
    ("IccPowerOff", icc_power_off(1), "63 00 00 00 00 00 01 00 00 00"),
    ("GetSlotStatus", get_slot_status(2), "65 00 00 00 00 00 02 00 00 00"),
    ("SlotStatus present", slot_status(2, icc=IccStatus.PRESENT_ACTIVE), "81 00 00 00 00 00 02 00 00 00"),
    ("SlotStatus inactive", slot_status(2, icc=IccStatus.PRESENT_INACTIVE), "81 00 00 00 00 00 02 01 00 00"),
    ("SlotStatus absent", slot_status(2, icc=IccStatus.ABSENT), "81 00 00 00 00 00 02 02 00 00"),
    (
        "SlotStatus absent failed",
        slot_status(2, icc=IccStatus.ABSENT, cmd=CommandStatus.FAILED, error=SlotError.ICC_MUTE),
        "81 00 00 00 00 00 02 42 FE 00",
    ),
    ("SetParameters T=1", set_parameters(3, 1, T1_PARAMS), "61 07 00 00 00 00 03 01 00 00" + T1_PARAMS.hex()),
    ("Parameters T=1", parameters(3, 1, T1_PARAMS), "82 07 00 00 00 00 03 00 00 01" + T1_PARAMS.hex()),
    ("SetParameters T=0", set_parameters(8, 0, T0_PARAMS), "61 05 00 00 00 00 08 00 00 00" + T0_PARAMS.hex()),
    (
        "XfrBlock S(IFS)",
        xfr_block(4, bytes.fromhex("00 C1 01 FE 3E")),
        "6F 05 00 00 00 00 04 00 00 00 00 C1 01 FE 3E",
    ),
    (
        "DataBlock S(IFS) reply",
        data_block(4, bytes.fromhex("00 E1 01 FE 1E")),
        "80 05 00 00 00 00 04 00 00 00 00 E1 01 FE 1E",
    ),
    (
        "XfrBlock I(0) SELECT",
        xfr_block(5, SELECT_PIV_IBLOCK),
        "6F 13 00 00 00 00 05 00 00 00" + SELECT_PIV_IBLOCK.hex(),
    ),
    (
        "XfrBlock APDU level",
        xfr_block(6, SELECT_PIV_APDU),
        "6F 0F 00 00 00 00 06 00 00 00" + SELECT_PIV_APDU.hex(),
    ),
    (
        "Time extension",
        data_block(5, cmd=CommandStatus.TIME_EXTENSION, error=1),
        "80 00 00 00 00 00 05 80 01 00",
    ),
    ("Escape 6A", escape(7, b"\x6a"), "6B 01 00 00 00 00 07 00 00 00 6A"),
    (
        "Escape not supported",
        escape_response(7, cmd=CommandStatus.FAILED, error=SlotError.CMD_NOT_SUPPORTED),
        "83 00 00 00 00 00 07 40 00 00",
    ),
]
SPEC_IDS = [name for name, _, _ in SPEC_FRAMES]


@pytest.mark.parametrize(("name", "message", "wire"), SPEC_FRAMES, ids=SPEC_IDS)
def test_builder_encodes_reference_frame(name: str, message: CcidMessage, wire: str):
    assert message.encode() == bytes.fromhex(wire)


@pytest.mark.parametrize(("name", "message", "wire"), SPEC_FRAMES, ids=SPEC_IDS)
def test_decoder_reads_reference_frame(name: str, message: CcidMessage, wire: str):
    assert decode_message(bytes.fromhex(wire)) == message


def test_reference_time_extension_frame_decodes_to_multiplier():
    msg = decode_message(bytes.fromhex("80 00 00 00 00 00 05 80 01 00"))
    assert msg.msg_type is MessageType.RDR_to_PC_DataBlock
    assert (msg.seq, msg.icc_status, msg.command_status, msg.error) == (
        5,
        IccStatus.PRESENT_ACTIVE,
        CommandStatus.TIME_EXTENSION,
        1,
    )


def test_reference_failed_slot_status_decodes_to_absent_and_mute():
    msg = decode_message(bytes.fromhex("81 00 00 00 00 00 02 42 FE 00"))
    assert msg.icc_status is IccStatus.ABSENT
    assert msg.command_status is CommandStatus.FAILED
    assert msg.error == SlotError.ICC_MUTE


def test_parameters_response_carries_protocol_in_byte_9():
    msg = decode_message(bytes.fromhex("82 07 00 00 00 00 03 00 00 01") + T1_PARAMS)
    assert (msg.b9, msg.data) == (1, T1_PARAMS)


def test_reference_notify_slot_change_frames():
    assert NotifySlotChange(present=(True,), changed=(True,)).encode() == bytes.fromhex("50 03")
    assert NotifySlotChange(present=(False,), changed=(True,)).encode() == bytes.fromhex("50 02")
    inserted = decode_interrupt(bytes.fromhex("50 03"))
    assert isinstance(inserted, NotifySlotChange)
    assert (inserted.present[0], inserted.changed[0]) == (True, True)
    removed = decode_interrupt(bytes.fromhex("50 02"))
    assert isinstance(removed, NotifySlotChange)
    assert (removed.present[0], removed.changed[0]) == (False, True)


# ---- builders ----


def test_icc_power_on_puts_power_select_in_byte_7():
    assert icc_power_on(9, power_select=1, slot=2).encode() == bytes.fromhex("62 00 00 00 00 02 09 01 00 00")


@pytest.mark.parametrize("bad", [-1, 4, 0xFF])
def test_icc_power_on_rejects_unknown_power_select(bad: int):
    with pytest.raises(LocalProtocolError, match=str(bad)):
        icc_power_on(0, power_select=bad)


def test_abort_builder():
    assert abort(0x11, slot=1).encode() == bytes.fromhex("72 00 00 00 00 01 11 00 00 00")


def test_xfr_block_puts_bwi_and_little_endian_level_parameter_in_header():
    msg = xfr_block(0xFE, b"\xaa\xbb", bwi=2, level_parameter=0x1234)
    assert msg.encode() == bytes.fromhex("6F 02 00 00 00 00 FE 02 34 12 AA BB")
    assert (msg.bwi, msg.level_parameter) == (2, 0x1234)


def test_xfr_block_extended_continue_request():
    # Reference §1.10.4: an empty XfrBlock with wLevelParameter 0x0010 asks for the next chunk.
    assert xfr_block(3, b"", level_parameter=0x10).encode() == bytes.fromhex("6F 00 00 00 00 00 03 00 10 00")


@pytest.mark.parametrize("bad", [-1, 0x10000])
def test_xfr_block_rejects_out_of_range_level_parameter(bad: int):
    with pytest.raises(LocalProtocolError, match=str(bad)):
        xfr_block(0, b"", level_parameter=bad)


@pytest.mark.parametrize(
    ("protocol", "params"), [(0, T1_PARAMS), (1, T0_PARAMS), (2, T1_PARAMS), (1, b""), (0, b"\x11" * 6)]
)
def test_set_parameters_rejects_wrong_protocol_or_structure_size(protocol: int, params: bytes):
    with pytest.raises(LocalProtocolError):
        set_parameters(0, protocol, params)


def test_data_block_chain_parameter_goes_in_byte_9():
    msg = data_block(1, b"\x90\x00", chain=0x03, slot=0)
    assert msg.encode() == bytes.fromhex("80 02 00 00 00 00 01 00 00 03 90 00")
    assert msg.chain_parameter == 3


def test_slot_status_clock_status_goes_in_byte_9():
    msg = slot_status(4, icc=IccStatus.PRESENT_INACTIVE, clock_status=2, slot=1)
    assert msg.encode() == bytes.fromhex("81 00 00 00 00 01 04 01 00 02")


def test_escape_response_carries_vendor_bytes():
    msg = escape_response(7, b"\x01\x02")
    assert msg.encode() == bytes.fromhex("83 02 00 00 00 00 07 00 00 00 01 02")


@pytest.mark.parametrize(
    ("command", "response"),
    [
        (MessageType.PC_to_RDR_IccPowerOn, MessageType.RDR_to_PC_DataBlock),
        (MessageType.PC_to_RDR_XfrBlock, MessageType.RDR_to_PC_DataBlock),
        (MessageType.PC_to_RDR_Secure, MessageType.RDR_to_PC_DataBlock),
        (MessageType.PC_to_RDR_IccPowerOff, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_GetSlotStatus, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_T0APDU, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_IccClock, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_Mechanical, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_Abort, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_SetParameters, MessageType.RDR_to_PC_Parameters),
        (MessageType.PC_to_RDR_GetParameters, MessageType.RDR_to_PC_Parameters),
        (MessageType.PC_to_RDR_ResetParameters, MessageType.RDR_to_PC_Parameters),
        (MessageType.PC_to_RDR_Escape, MessageType.RDR_to_PC_Escape),
        (MessageType.PC_to_RDR_SetDataRateAndClockFrequency, MessageType.RDR_to_PC_DataRateAndClockFrequency),
    ],
)
def test_response_type_for_every_command(command: MessageType, response: MessageType):
    assert response_type_for(command) is response


@pytest.mark.parametrize("not_a_command", [t for t in MessageType if t.name.startswith("RDR_to_PC")])
def test_response_type_for_refuses_responses(not_a_command: MessageType):
    with pytest.raises(LocalProtocolError, match="not a PC_to_RDR command"):
        response_type_for(not_a_command)


def test_message_type_values_match_the_reference_tables():
    assert {t.name: t.value for t in MessageType} == {
        "PC_to_RDR_SetParameters": 0x61,
        "PC_to_RDR_IccPowerOn": 0x62,
        "PC_to_RDR_IccPowerOff": 0x63,
        "PC_to_RDR_GetSlotStatus": 0x65,
        "PC_to_RDR_Secure": 0x69,
        "PC_to_RDR_T0APDU": 0x6A,
        "PC_to_RDR_Escape": 0x6B,
        "PC_to_RDR_GetParameters": 0x6C,
        "PC_to_RDR_ResetParameters": 0x6D,
        "PC_to_RDR_IccClock": 0x6E,
        "PC_to_RDR_XfrBlock": 0x6F,
        "PC_to_RDR_Mechanical": 0x71,
        "PC_to_RDR_Abort": 0x72,
        "PC_to_RDR_SetDataRateAndClockFrequency": 0x73,
        "RDR_to_PC_DataBlock": 0x80,
        "RDR_to_PC_SlotStatus": 0x81,
        "RDR_to_PC_Parameters": 0x82,
        "RDR_to_PC_Escape": 0x83,
        "RDR_to_PC_DataRateAndClockFrequency": 0x84,
        "RDR_to_PC_NotifySlotChange": 0x50,
        "RDR_to_PC_HardwareError": 0x51,
    }


def test_slot_error_values_match_the_reference_table():
    assert {e.name: e.value for e in SlotError} == {
        "CMD_ABORTED": 0xFF,
        "ICC_MUTE": 0xFE,
        "XFR_PARITY_ERROR": 0xFD,
        "XFR_OVERRUN": 0xFC,
        "HW_ERROR": 0xFB,
        "BAD_ATR_TS": 0xF8,
        "BAD_ATR_TCK": 0xF7,
        "ICC_PROTOCOL_NOT_SUPPORTED": 0xF6,
        "ICC_CLASS_NOT_SUPPORTED": 0xF5,
        "PROCEDURE_BYTE_CONFLICT": 0xF4,
        "DEACTIVATED_PROTOCOL": 0xF3,
        "BUSY_WITH_AUTO_SEQUENCE": 0xF2,
        "PIN_TIMEOUT": 0xF0,
        "PIN_CANCELLED": 0xEF,
        "CMD_SLOT_BUSY": 0xE0,
        "CMD_NOT_SUPPORTED": 0x00,
    }


# ---- message construction guards (our own bugs) ----


@pytest.mark.parametrize("field", ["seq", "slot", "b7", "b8", "b9"])
@pytest.mark.parametrize("value", [-1, 256])
def test_message_rejects_header_byte_out_of_range(field: str, value: int):
    kwargs = {"seq": 0, field: value}
    with pytest.raises(LocalProtocolError, match=str(value)):
        CcidMessage(MessageType.PC_to_RDR_XfrBlock, **kwargs)


def test_message_rejects_data_over_libccid_maximum():
    with pytest.raises(LocalProtocolError, match=str(MAX_DATA_LENGTH + 1)):
        CcidMessage(MessageType.RDR_to_PC_DataBlock, 0, data=bytes(MAX_DATA_LENGTH + 1))


@pytest.mark.parametrize(
    "kind", [MessageType.RDR_to_PC_NotifySlotChange, MessageType.RDR_to_PC_HardwareError]
)
def test_message_refuses_interrupt_only_types(kind: MessageType):
    with pytest.raises(LocalProtocolError, match="not a bulk"):
        CcidMessage(kind, 0)


# ---- decoder rejects (peer's fault) ----


def test_malformed_ccid_error_is_a_remote_protocol_error():
    assert issubclass(MalformedCcidMessageError, RemoteProtocolError)


@pytest.mark.parametrize("size", range(HEADER_LEN))
def test_decoder_rejects_buffer_shorter_than_header(size: int):
    with pytest.raises(MalformedCcidMessageError, match="shorter than the header"):
        decode_message(bytes.fromhex("80 00 00 00 00 00 00 00 00 00")[:size])


BULK_TYPE_VALUES = {t.value for t in MessageType} - {0x50, 0x51}


@pytest.mark.parametrize("type_byte", [b for b in range(256) if b not in BULK_TYPE_VALUES])
def test_decoder_rejects_unknown_or_interrupt_message_type(type_byte: int):
    with pytest.raises(MalformedCcidMessageError, match=f"0x{type_byte:02x}"):
        decode_message(bytes([type_byte]) + bytes(9))


def test_decoder_rejects_oversized_length_before_buffering():
    # Only the header plus 3 bytes arrive; if the decoder looked at the payload first it
    # would report a length mismatch instead of the limit.
    header = bytes.fromhex("80 06 01 00 00 00 01 00 00 00")  # dwLength = 262 > 271 - 10
    with pytest.raises(MalformedCcidMessageError, match="dwLength 262 exceeds the maximum of 261"):
        decode_message(header + b"\x01\x02\x03", max_message_length=271)


def test_decoder_rejects_huge_length_with_default_limit_from_header_alone():
    header = bytes.fromhex("6F FF FF FF FF 00 00 00 00 00")
    with pytest.raises(MalformedCcidMessageError, match=f"exceeds the maximum of {MAX_DATA_LENGTH}"):
        decode_message(header)


def test_decoder_accepts_length_exactly_at_the_limit():
    msg = decode_message(bytes.fromhex("80 3D 00 00 00 00 01 00 00 00") + bytes(61), max_message_length=71)
    assert len(msg.data) == 61


def test_decoder_accepts_libccid_maximum_message():
    raw = bytes([0x80]) + MAX_DATA_LENGTH.to_bytes(4, "little") + bytes(5) + bytes(MAX_DATA_LENGTH)
    assert len(decode_message(raw).data) == MAX_DATA_LENGTH
    assert len(raw) == MAX_MESSAGE_LENGTH


def test_decoder_caps_a_larger_caller_limit_at_libccid_maximum():
    raw = bytes([0x80]) + (MAX_DATA_LENGTH + 1).to_bytes(4, "little") + bytes(5)
    with pytest.raises(MalformedCcidMessageError, match="exceeds"):
        decode_message(raw, max_message_length=10 * MAX_MESSAGE_LENGTH)


def test_decoder_refuses_a_limit_below_the_header_size():
    with pytest.raises(LocalProtocolError, match="9"):
        decode_message(bytes(10), max_message_length=9)


@pytest.mark.parametrize("extra", [-2, -1, 1, 2])
def test_decoder_rejects_length_mismatch(extra: int):
    wire = bytes.fromhex("6F 05 00 00 00 00 04 00 00 00 00 C1 01 FE 3E")
    buf = wire[:extra] if extra < 0 else wire + bytes(extra)
    with pytest.raises(MalformedCcidMessageError, match="dwLength 5 does not match"):
        decode_message(buf)


def test_decoder_accepts_bytearray_and_returns_immutable_data():
    msg = decode_message(bytearray.fromhex("80 02 00 00 00 00 01 00 00 00 90 00"))
    assert type(msg.data) is bytes
    assert msg.data == b"\x90\x00"


# ---- bStatus ----

# Reference §1.4: bmICCStatus in bits 0-1, bmCommandStatus in bits 6-7.
STATUS_TABLE = {
    (IccStatus.PRESENT_ACTIVE, CommandStatus.OK): 0x00,
    (IccStatus.PRESENT_INACTIVE, CommandStatus.OK): 0x01,
    (IccStatus.ABSENT, CommandStatus.OK): 0x02,
    (IccStatus.PRESENT_ACTIVE, CommandStatus.FAILED): 0x40,
    (IccStatus.PRESENT_INACTIVE, CommandStatus.FAILED): 0x41,
    (IccStatus.ABSENT, CommandStatus.FAILED): 0x42,
    (IccStatus.PRESENT_ACTIVE, CommandStatus.TIME_EXTENSION): 0x80,
    (IccStatus.PRESENT_INACTIVE, CommandStatus.TIME_EXTENSION): 0x81,
    (IccStatus.ABSENT, CommandStatus.TIME_EXTENSION): 0x82,
}


@pytest.mark.parametrize(("icc", "cmd"), list(STATUS_TABLE))
def test_status_byte_matches_reference_table(icc: IccStatus, cmd: CommandStatus):
    assert status_byte(icc, cmd) == STATUS_TABLE[(icc, cmd)]


def test_status_byte_defaults_to_ok():
    assert status_byte(IccStatus.ABSENT) == 0x02


@pytest.mark.parametrize("value", range(256))
def test_every_bstatus_byte_decodes_or_is_refused_as_rfu(value: int):
    msg = decode_message(bytes([0x81, 0, 0, 0, 0, 0, 0, value, 0, 0]))
    rfu_bits_ignored = value & 0xC3  # bits 2-5 are RFU and must not change the meaning
    icc_bits, cmd_bits = value & 0x03, value >> 6
    if icc_bits == 3:
        with pytest.raises(MalformedCcidMessageError, match=f"0x{value:02x}"):
            _ = msg.icc_status
    else:
        assert status_byte(msg.icc_status, CommandStatus.OK) == icc_bits
    if cmd_bits == 3:
        with pytest.raises(MalformedCcidMessageError, match=f"0x{value:02x}"):
            _ = msg.command_status
    else:
        assert status_byte(IccStatus.PRESENT_ACTIVE, msg.command_status) == cmd_bits << 6
    if icc_bits != 3 and cmd_bits != 3:
        assert STATUS_TABLE[(msg.icc_status, msg.command_status)] == rfu_bits_ignored


# ---- interrupt-IN ----


def test_hardware_error_wire_form():
    assert HardwareError(slot=0, seq=7, code=1).encode() == bytes.fromhex("51 00 07 01")
    assert decode_interrupt(bytes.fromhex("51 01 07 01")) == HardwareError(slot=1, seq=7, code=1)


def test_notify_slot_change_packs_two_bits_per_slot_slot_zero_lowest():
    msg = NotifySlotChange(
        present=(True, False, True, False, True), changed=(False, True, True, False, False)
    )
    # slot0 01, slot1 10, slot2 11, slot3 00 -> 0b00_11_10_01 = 0x39; slot4 01 -> second byte 0x01
    assert msg.encode() == bytes.fromhex("50 39 01")


def test_notify_slot_change_pads_to_whole_bytes():
    msg = NotifySlotChange(present=(True,), changed=(True,))
    assert msg.present == (True, False, False, False)
    assert msg.changed == (True, False, False, False)


@pytest.mark.parametrize(
    ("present", "changed"), [((), ()), ((True,), (True, False)), ((False,) * 257, (False,) * 257)]
)
def test_notify_slot_change_rejects_bad_slot_tuples(present: tuple[bool, ...], changed: tuple[bool, ...]):
    with pytest.raises(LocalProtocolError):
        NotifySlotChange(present=present, changed=changed)


@pytest.mark.parametrize("bad", [-1, 256])
def test_hardware_error_rejects_out_of_range_fields(bad: int):
    with pytest.raises(LocalProtocolError, match=str(bad)):
        HardwareError(slot=0, seq=bad, code=1)


@pytest.mark.parametrize(
    "wire",
    ["", "50", "51", "51 00 00", "51 00 00 01 00", "80 03", "00", "50" + "00" * 65],
    ids=["empty", "notify-no-bits", "hwerr-1", "hwerr-3", "hwerr-5", "bulk-type", "zero", "notify-too-long"],
)
def test_decode_interrupt_rejects_malformed(wire: str):
    with pytest.raises(MalformedCcidMessageError):
        decode_interrupt(bytes.fromhex(wire))


def test_decode_interrupt_accepts_the_largest_notify():
    msg = decode_interrupt(bytes([0x50]) + b"\xff" * 64)
    assert isinstance(msg, NotifySlotChange)
    assert len(msg.present) == 256
    assert all(msg.present)
    assert all(msg.changed)


# ---- Hypothesis round trips ----

bulk_types = st.sampled_from(sorted(t for t in MessageType if t.value in BULK_TYPE_VALUES))
u8 = st.integers(0, 255)
messages = st.builds(
    CcidMessage,
    msg_type=bulk_types,
    seq=u8,
    slot=u8,
    b7=u8,
    b8=u8,
    b9=u8,
    data=st.binary(max_size=600),
)


@settings(max_examples=300)
@given(messages)
def test_message_round_trips(msg: CcidMessage):
    wire = msg.encode()
    assert len(wire) == HEADER_LEN + len(msg.data)
    assert decode_message(wire) == msg


@settings(max_examples=200)
@given(st.binary(max_size=40))
def test_decoder_never_fails_other_than_malformed(buf: bytes):
    try:
        msg = decode_message(buf)
    except MalformedCcidMessageError:
        return
    assert msg.encode() == buf


@settings(max_examples=200)
@given(
    seq=u8,
    data=st.binary(max_size=300),
    icc=st.sampled_from(IccStatus),
    cmd=st.sampled_from(CommandStatus),
    error=u8,
    chain=u8,
)
def test_data_block_properties_round_trip(
    seq: int, data: bytes, icc: IccStatus, cmd: CommandStatus, error: int, chain: int
):
    msg = decode_message(data_block(seq, data, icc=icc, cmd=cmd, error=error, chain=chain).encode())
    assert (msg.seq, msg.data, msg.icc_status, msg.command_status, msg.error, msg.chain_parameter) == (
        seq,
        data,
        icc,
        cmd,
        error,
        chain,
    )


@settings(max_examples=200)
@given(seq=u8, bwi=u8, level=st.integers(0, 0xFFFF), data=st.binary(max_size=64))
def test_xfr_block_properties_round_trip(seq: int, bwi: int, level: int, data: bytes):
    msg = decode_message(xfr_block(seq, data, bwi=bwi, level_parameter=level).encode())
    assert (msg.bwi, msg.level_parameter, msg.data) == (bwi, level, data)


@st.composite
def notify_changes(draw: st.DrawFn) -> NotifySlotChange:
    n = draw(st.integers(1, 256))
    present = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    changed = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return NotifySlotChange(present=tuple(present), changed=tuple(changed))


@settings(max_examples=200)
@given(notify_changes())
def test_notify_slot_change_round_trips(msg: NotifySlotChange):
    assert decode_interrupt(msg.encode()) == msg


@settings(max_examples=200)
@given(st.builds(HardwareError, slot=u8, seq=u8, code=u8))
def test_hardware_error_round_trips(msg: HardwareError):
    assert decode_interrupt(msg.encode()) == msg


@settings(max_examples=200)
@given(st.binary(min_size=2, max_size=65).map(lambda b: b"\x50" + b[1:]))
def test_any_notify_bytes_round_trip(wire: bytes):
    assert decode_interrupt(wire).encode() == wire


# ---- purity ----


def test_module_imports_nothing_impure():
    code = (
        "import sys, protocol.ccid; "
        "bad = {'socket','ssl','threading','logging','trio','usb','random','asyncio','structlog'}; "
        "print(sorted(bad & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
