"""USB CCID rev 1.1 bulk and interrupt messages (pure codec, no I/O).

Theory of operation: every bulk message is a 10-byte header (type, dwLength LE, bSlot, bSeq,
three message-specific bytes) followed by exactly dwLength bytes of abData (CCID 1.1 §6.1,
§6.2). `CcidMessage` keeps the three specific bytes raw (`b7`, `b8`, `b9`); the builders and
properties give them their per-message meaning, so one dataclass and one decoder cover both
directions. Decoding takes one *whole* USB transfer (CCID delivers each message as one
transfer, reference §1.3) and refuses an oversized dwLength from the header alone.

The class functional descriptor lives in `protocol._ccid_descriptor` and is re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

# Re-exported: the descriptor is part of this module's public API (docs/internals.md).
from protocol._ccid_descriptor import CcidClassDescriptor as CcidClassDescriptor
from protocol._ccid_descriptor import ExchangeLevel as ExchangeLevel
from protocol._ccid_descriptor import Feature as Feature
from protocol.errors import LocalProtocolError, MalformedCcidMessageError

HEADER_LEN: Final = 10
MAX_DATA_LENGTH: Final = 65546  # libccid's largest abData (reference §1.3)
MAX_MESSAGE_LENGTH: Final = HEADER_LEN + MAX_DATA_LENGTH
# bMaxSlotIndex is a byte, so at most 256 slots; NotifySlotChange packs 4 slots per byte.
MAX_INTERRUPT_SLOTS: Final = 256
_SLOTS_PER_BYTE: Final = 4


class MessageType(IntEnum):
    """bMessageType values, spec names verbatim (CCID 1.1 §6.1, §6.2, §6.3)."""

    PC_to_RDR_SetParameters = 0x61
    PC_to_RDR_IccPowerOn = 0x62
    PC_to_RDR_IccPowerOff = 0x63
    PC_to_RDR_GetSlotStatus = 0x65
    PC_to_RDR_Secure = 0x69
    PC_to_RDR_T0APDU = 0x6A
    PC_to_RDR_Escape = 0x6B
    PC_to_RDR_GetParameters = 0x6C
    PC_to_RDR_ResetParameters = 0x6D
    PC_to_RDR_IccClock = 0x6E
    PC_to_RDR_XfrBlock = 0x6F
    PC_to_RDR_Mechanical = 0x71
    PC_to_RDR_Abort = 0x72
    PC_to_RDR_SetDataRateAndClockFrequency = 0x73
    RDR_to_PC_DataBlock = 0x80
    RDR_to_PC_SlotStatus = 0x81
    RDR_to_PC_Parameters = 0x82
    RDR_to_PC_Escape = 0x83
    RDR_to_PC_DataRateAndClockFrequency = 0x84
    RDR_to_PC_NotifySlotChange = 0x50  # interrupt-IN only
    RDR_to_PC_HardwareError = 0x51  # interrupt-IN only


class IccStatus(IntEnum):
    """bmICCStatus, bits 0-1 of bStatus (CCID 1.1 §6.2.6); value 3 is RFU."""

    PRESENT_ACTIVE = 0
    PRESENT_INACTIVE = 1
    ABSENT = 2


class CommandStatus(IntEnum):
    """bmCommandStatus, bits 6-7 of bStatus (CCID 1.1 §6.2.6); value 3 is RFU."""

    OK = 0
    FAILED = 1
    TIME_EXTENSION = 2


class SlotError(IntEnum):
    """bError when bmCommandStatus = FAILED (CCID 1.1 table 6.2-2); 0x01-0x7F = bad field index."""

    CMD_ABORTED = 0xFF
    ICC_MUTE = 0xFE
    XFR_PARITY_ERROR = 0xFD
    XFR_OVERRUN = 0xFC
    HW_ERROR = 0xFB
    BAD_ATR_TS = 0xF8
    BAD_ATR_TCK = 0xF7
    ICC_PROTOCOL_NOT_SUPPORTED = 0xF6
    ICC_CLASS_NOT_SUPPORTED = 0xF5
    PROCEDURE_BYTE_CONFLICT = 0xF4
    DEACTIVATED_PROTOCOL = 0xF3
    BUSY_WITH_AUTO_SEQUENCE = 0xF2
    PIN_TIMEOUT = 0xF0
    PIN_CANCELLED = 0xEF
    CMD_SLOT_BUSY = 0xE0
    CMD_NOT_SUPPORTED = 0x00


_MT = MessageType
_INTERRUPT_TYPES: Final = frozenset({_MT.RDR_to_PC_NotifySlotChange, _MT.RDR_to_PC_HardwareError})
_BULK_TYPES: Final = frozenset(_MT) - _INTERRUPT_TYPES
# CCID 1.1 §6.1: which RDR_to_PC message answers each PC_to_RDR command.
_RESPONSE_FOR: Final[dict[MessageType, MessageType]] = {
    _MT.PC_to_RDR_IccPowerOn: _MT.RDR_to_PC_DataBlock,
    _MT.PC_to_RDR_XfrBlock: _MT.RDR_to_PC_DataBlock,
    _MT.PC_to_RDR_Secure: _MT.RDR_to_PC_DataBlock,
    _MT.PC_to_RDR_IccPowerOff: _MT.RDR_to_PC_SlotStatus,
    _MT.PC_to_RDR_GetSlotStatus: _MT.RDR_to_PC_SlotStatus,
    _MT.PC_to_RDR_T0APDU: _MT.RDR_to_PC_SlotStatus,
    _MT.PC_to_RDR_IccClock: _MT.RDR_to_PC_SlotStatus,
    _MT.PC_to_RDR_Mechanical: _MT.RDR_to_PC_SlotStatus,
    _MT.PC_to_RDR_Abort: _MT.RDR_to_PC_SlotStatus,
    _MT.PC_to_RDR_SetParameters: _MT.RDR_to_PC_Parameters,
    _MT.PC_to_RDR_GetParameters: _MT.RDR_to_PC_Parameters,
    _MT.PC_to_RDR_ResetParameters: _MT.RDR_to_PC_Parameters,
    _MT.PC_to_RDR_Escape: _MT.RDR_to_PC_Escape,
    _MT.PC_to_RDR_SetDataRateAndClockFrequency: _MT.RDR_to_PC_DataRateAndClockFrequency,
}
# Reference §1.9: protocol data structure sizes for SetParameters (T=0: 5 bytes, T=1: 7 bytes).
_PARAMS_LEN: Final = {0: 5, 1: 7}


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"ccid {name} must be 0..255, got {value}")


@dataclass(frozen=True, slots=True)
class CcidMessage:
    """One bulk CCID message; b7..b9 are the raw message-specific header bytes."""

    msg_type: MessageType
    seq: int  # bSeq 0..255, echoed by the response (CCID 1.1 §6.1)
    slot: int = 0
    b7: int = 0  # command: message specific / response: bStatus
    b8: int = 0  # command: message specific / response: bError
    b9: int = 0  # bChainParameter / bClockStatus / bProtocolNum / RFU
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.msg_type not in _BULK_TYPES:
            raise LocalProtocolError(f"{self.msg_type!r} is not a bulk ccid message type")
        for name in ("seq", "slot", "b7", "b8", "b9"):
            _check_byte(name, getattr(self, name))
        if len(self.data) > MAX_DATA_LENGTH:
            raise LocalProtocolError(f"ccid abData of {len(self.data)} bytes exceeds {MAX_DATA_LENGTH}")

    def encode(self) -> bytes:
        header = bytes([self.msg_type]) + len(self.data).to_bytes(4, "little")
        return header + bytes([self.slot, self.seq, self.b7, self.b8, self.b9]) + self.data

    @property
    def icc_status(self) -> IccStatus:
        """bmICCStatus of a response; raises MalformedCcidMessageError on the RFU value 3."""
        value = self.b7 & 0x03
        if value == 3:
            raise MalformedCcidMessageError(f"ccid bStatus 0x{self.b7:02x} has RFU bmICCStatus 3")
        return IccStatus(value)

    @property
    def command_status(self) -> CommandStatus:
        """bmCommandStatus of a response; raises MalformedCcidMessageError on the RFU value 3."""
        value = self.b7 >> 6
        if value == 3:
            raise MalformedCcidMessageError(f"ccid bStatus 0x{self.b7:02x} has RFU bmCommandStatus 3")
        return CommandStatus(value)

    @property
    def error(self) -> int:
        """bError: a SlotError, a bad-field index, or the time-extension multiplier."""
        return self.b8

    @property
    def chain_parameter(self) -> int:
        return self.b9

    @property
    def bwi(self) -> int:
        return self.b7

    @property
    def level_parameter(self) -> int:
        # CCID 1.1 §6.1.4: wLevelParameter is little-endian in bytes 8-9.
        return self.b8 | self.b9 << 8


def decode_message(buf: bytes, *, max_message_length: int = MAX_MESSAGE_LENGTH) -> CcidMessage:
    """Decode one whole bulk message, refusing an oversized dwLength before touching abData."""
    if max_message_length < HEADER_LEN:
        raise LocalProtocolError(f"max_message_length {max_message_length} is below the ccid header size")
    if len(buf) < HEADER_LEN:
        raise MalformedCcidMessageError(f"ccid message of {len(buf)} bytes is shorter than the header")
    if buf[0] not in _BULK_TYPES:
        raise MalformedCcidMessageError(f"unknown ccid bulk message type 0x{buf[0]:02x}")
    length = int.from_bytes(buf[1:5], "little")
    limit = min(max_message_length, MAX_MESSAGE_LENGTH) - HEADER_LEN
    if length > limit:
        raise MalformedCcidMessageError(f"ccid dwLength {length} exceeds the maximum of {limit}")
    if len(buf) - HEADER_LEN != length:
        raise MalformedCcidMessageError(
            f"ccid dwLength {length} does not match the {len(buf) - HEADER_LEN} data bytes received"
        )
    return CcidMessage(MessageType(buf[0]), buf[6], buf[5], buf[7], buf[8], buf[9], bytes(buf[HEADER_LEN:]))


def status_byte(icc: IccStatus, cmd: CommandStatus = CommandStatus.OK) -> int:
    """bStatus = bmICCStatus | bmCommandStatus << 6 (CCID 1.1 §6.2.6)."""
    return int(icc) | int(cmd) << 6


def response_type_for(cmd: MessageType) -> MessageType:
    """The RDR_to_PC type that answers `cmd`; LocalProtocolError if `cmd` is not a command."""
    try:
        return _RESPONSE_FOR[cmd]
    except KeyError:
        raise LocalProtocolError(f"{cmd!r} is not a PC_to_RDR command") from None


# ---- builders, host side (CCID 1.1 §6.1) ----


def icc_power_on(seq: int, *, power_select: int = 0, slot: int = 0) -> CcidMessage:
    # bPowerSelect: 0 automatic, 1 = 5.0 V, 2 = 3.0 V, 3 = 1.8 V (§6.1.1).
    if power_select not in (0, 1, 2, 3):
        raise LocalProtocolError(f"ccid bPowerSelect must be 0..3, got {power_select}")
    return CcidMessage(MessageType.PC_to_RDR_IccPowerOn, seq, slot, b7=power_select)


def icc_power_off(seq: int, *, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_to_RDR_IccPowerOff, seq, slot)


def get_slot_status(seq: int, *, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_to_RDR_GetSlotStatus, seq, slot)


def xfr_block(seq: int, data: bytes, *, bwi: int = 0, level_parameter: int = 0, slot: int = 0) -> CcidMessage:
    if not 0 <= level_parameter <= 0xFFFF:
        raise LocalProtocolError(f"ccid wLevelParameter must be 0..65535, got {level_parameter}")
    lo, hi = level_parameter & 0xFF, level_parameter >> 8
    return CcidMessage(MessageType.PC_to_RDR_XfrBlock, seq, slot, bwi, lo, hi, bytes(data))


def set_parameters(seq: int, protocol: int, params: bytes, *, slot: int = 0) -> CcidMessage:
    # Reference §1.9: T=0 takes a 5-byte structure, T=1 a 7-byte one; nothing else exists.
    expected = _PARAMS_LEN.get(protocol)
    if expected is None:
        raise LocalProtocolError(f"ccid bProtocolNum must be 0 or 1, got {protocol}")
    if len(params) != expected:
        raise LocalProtocolError(f"T={protocol} parameters must be {expected} bytes, got {len(params)}")
    return CcidMessage(MessageType.PC_to_RDR_SetParameters, seq, slot, b7=protocol, data=bytes(params))


def escape(seq: int, data: bytes, *, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_to_RDR_Escape, seq, slot, data=bytes(data))


def abort(seq: int, *, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_to_RDR_Abort, seq, slot)


# ---- builders, device side (CCID 1.1 §6.2) ----


def data_block(
    seq: int,
    data: bytes = b"",
    *,
    icc: IccStatus = IccStatus.PRESENT_ACTIVE,
    cmd: CommandStatus = CommandStatus.OK,
    error: int = 0,
    chain: int = 0,
    slot: int = 0,
) -> CcidMessage:
    status = status_byte(icc, cmd)
    return CcidMessage(MessageType.RDR_to_PC_DataBlock, seq, slot, status, error, chain, bytes(data))


def slot_status(
    seq: int,
    *,
    icc: IccStatus,
    cmd: CommandStatus = CommandStatus.OK,
    error: int = 0,
    clock_status: int = 0,
    slot: int = 0,
) -> CcidMessage:
    status = status_byte(icc, cmd)
    return CcidMessage(MessageType.RDR_to_PC_SlotStatus, seq, slot, status, error, clock_status)


def parameters(
    seq: int,
    protocol: int,
    params: bytes,
    *,
    icc: IccStatus = IccStatus.PRESENT_ACTIVE,
    cmd: CommandStatus = CommandStatus.OK,
    error: int = 0,
    slot: int = 0,
) -> CcidMessage:
    status = status_byte(icc, cmd)
    return CcidMessage(MessageType.RDR_to_PC_Parameters, seq, slot, status, error, protocol, bytes(params))


def escape_response(
    seq: int,
    data: bytes = b"",
    *,
    icc: IccStatus = IccStatus.PRESENT_ACTIVE,
    cmd: CommandStatus = CommandStatus.OK,
    error: int = 0,
    slot: int = 0,
) -> CcidMessage:
    status = status_byte(icc, cmd)
    return CcidMessage(MessageType.RDR_to_PC_Escape, seq, slot, status, error, 0, bytes(data))


# ---- interrupt-IN (CCID 1.1 §6.3) ----


@dataclass(frozen=True, slots=True)
class NotifySlotChange:
    """RDR_to_PC_NotifySlotChange: 2 bits per slot, slot 0 in bits 0-1 (bit0 present, bit1 changed).

    The wire carries whole bytes (4 slots each), so both tuples are padded with False to a
    multiple of 4 slots; that makes the padded form the one canonical value and
    `decode_interrupt(x.encode()) == x` hold.
    """

    present: tuple[bool, ...]
    changed: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.present) != len(self.changed):
            raise LocalProtocolError(
                f"NotifySlotChange needs equal tuples, got {len(self.present)} and {len(self.changed)}"
            )
        if not 1 <= len(self.present) <= MAX_INTERRUPT_SLOTS:
            raise LocalProtocolError(f"NotifySlotChange slot count must be 1..256, got {len(self.present)}")
        pad = (False,) * (-len(self.present) % _SLOTS_PER_BYTE)
        object.__setattr__(self, "present", tuple(bool(p) for p in self.present) + pad)
        object.__setattr__(self, "changed", tuple(bool(c) for c in self.changed) + pad)

    def encode(self) -> bytes:
        bits = 0
        for i, (present, changed) in enumerate(zip(self.present, self.changed, strict=True)):
            bits |= (present | changed << 1) << (2 * i)
        size = len(self.present) // _SLOTS_PER_BYTE
        return bytes([MessageType.RDR_to_PC_NotifySlotChange]) + bits.to_bytes(size, "little")


@dataclass(frozen=True, slots=True)
class HardwareError:
    """RDR_to_PC_HardwareError: `51 bSlot bSeq bHardwareErrorCode` (0x01 = overcurrent)."""

    slot: int
    seq: int
    code: int

    def __post_init__(self) -> None:
        for name in ("slot", "seq", "code"):
            _check_byte(name, getattr(self, name))

    def encode(self) -> bytes:
        return bytes([MessageType.RDR_to_PC_HardwareError, self.slot, self.seq, self.code])


_MAX_NOTIFY_LEN: Final = 1 + MAX_INTERRUPT_SLOTS // _SLOTS_PER_BYTE
_HARDWARE_ERROR_LEN: Final = 4


def decode_interrupt(buf: bytes) -> NotifySlotChange | HardwareError:
    """Decode one interrupt-IN transfer; MalformedCcidMessageError on anything else."""
    if not buf:
        raise MalformedCcidMessageError("empty ccid interrupt message")
    if buf[0] == MessageType.RDR_to_PC_HardwareError:
        if len(buf) != _HARDWARE_ERROR_LEN:
            raise MalformedCcidMessageError(f"ccid HardwareError must be 4 bytes, got {len(buf)}")
        return HardwareError(slot=buf[1], seq=buf[2], code=buf[3])
    if buf[0] != MessageType.RDR_to_PC_NotifySlotChange:
        raise MalformedCcidMessageError(f"unknown ccid interrupt message type 0x{buf[0]:02x}")
    if not 2 <= len(buf) <= _MAX_NOTIFY_LEN:
        raise MalformedCcidMessageError(
            f"ccid NotifySlotChange must be 2..{_MAX_NOTIFY_LEN} bytes, got {len(buf)}"
        )
    bits = int.from_bytes(buf[1:], "little")
    slots = range((len(buf) - 1) * _SLOTS_PER_BYTE)
    present = tuple(bool(bits >> (2 * i) & 1) for i in slots)
    changed = tuple(bool(bits >> (2 * i + 1) & 1) for i in slots)
    return NotifySlotChange(present=present, changed=changed)
