"""The CCID device side of the simulated token: one bulk command in, one response out.

Theory of operation. `CcidDevice.handle(raw)` takes one whole PC_to_RDR message (the
backend delivers each bulk-OUT transfer as one message) and returns a `Reply`: the frames
to queue on bulk-IN and how long the final frame is held back (a delay fault or a slow
signature), together with the time-extension frame the backend repeats meanwhile. Timing
lives in the backend; this module decides *what* the token answers:

- header checks first, as a reader's firmware does before anything else (CCID 1.1 §6.1):
  dwLength above dwMaxCCIDMessageLength - 10 or not matching the transfer → bError 1
  (offset of dwLength), bSlot other than 0 → bError 5 (offset of bSlot);
- power state: XfrBlock while unpowered fails with ICC_MUTE, status "present, inactive";
- exchange level from the class descriptor (CCID 1.1 §5.1 dwFeatures): TPDU runs the
  card side of T=1 (`protocol.t1.T1Card`, reset at every power-on), APDU levels take whole
  APDUs, the extended level with the chaining of CCID 1.1 §6.1.4 / reference §1.10.4;
- anything a token does not implement answers the matching response type with
  "command failed, CMD_NOT_SUPPORTED" (reference §1.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from protocol.atr import Atr, Checksum
from protocol.ccid import (
    HEADER_LEN,
    CcidMessage,
    CommandStatus,
    ExchangeLevel,
    Feature,
    IccStatus,
    MessageType,
    SlotError,
    data_block,
    escape_response,
    parameters,
    response_type_for,
    slot_status,
    status_byte,
)
from protocol.errors import LocalProtocolError
from protocol.t1 import ApduComplete, Idle, SendBlock, SType, T1Card, s_block

from .faults import Evidence, Faults
from .t0_card import T0Tpdu

if TYPE_CHECKING:
    from .profiles import Profile

# ISO 7816-4 extended case 4: header 4 + Lc 3 + 65535 data + Le 2; a chained command may
# never buffer more than this.
MAX_APDU_LENGTH: Final = 65544
MAX_T1_IFSD: Final = 254  # ISO 7816-3 §11.4.2: IFSD 0xFF is reserved

# CCID 1.1 §6.2.6 bError: "index of the first bad field" for command-specific failures.
ERR_BAD_LENGTH: Final = 1
ERR_BAD_SLOT: Final = 5
ERR_BAD_BYTE7: Final = 7
ERR_BAD_LEVEL: Final = 8

# CCID 1.1 §6.1.4 wLevelParameter / §6.2.1 bChainParameter (reference §1.10.4).
CHAIN_WHOLE: Final = 0x00
CHAIN_BEGIN: Final = 0x01
CHAIN_END: Final = 0x02
CHAIN_MIDDLE: Final = 0x03
CHAIN_CONTINUE: Final = 0x10

# Gemalto GET_FIRMWARE_FEATURES escape (libccid sends `6A` to every 08E6 device at open,
# reference §1.10.1); the answer below says "no pinpad, no display, nothing special".
ESCAPE_GET_FIRMWARE_FEATURES: Final = b"\x6a"
FIRMWARE_FEATURES: Final = bytes(16)

_INS_GENERAL_AUTHENTICATE: Final = 0x87
_CLA_CHAINING: Final = 0x10


class Card(Protocol):
    """What the device needs of the card inside it (`piv.PivCard` in production)."""

    def power_on(self) -> None: ...
    def power_off(self) -> None: ...
    def execute(self, apdu: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """Frames to queue for one command; the last one is held `delay_s` seconds."""

    frames: tuple[bytes, ...]
    delay_s: float = 0.0
    time_extension: bytes = b""  # repeated while the final frame is held back


def default_t1_parameters(atr: Atr) -> bytes:
    """The 7-byte T=1 protocol data structure the ATR implies (CCID 1.1 §6.1.7, ref §1.9)."""
    return bytes(
        [
            atr.ta1 if atr.ta1 is not None else 0x11,
            0x10 | (1 if atr.checksum is Checksum.CRC else 0),
            atr.tc1 if atr.tc1 is not None else 0,
            (atr.bwi << 4) | atr.cwi,
            0x00,
            min(atr.ifsc, 254),
            0x00,
        ]
    )


def _response_type(raw_type: int) -> MessageType:
    try:
        return response_type_for(MessageType(raw_type))
    except (ValueError, LocalProtocolError):
        # Unknown or response-only type: a slot status is the least surprising answer.
        return MessageType.RDR_to_PC_SlotStatus


def _failure(resp: MessageType, seq: int, icc: IccStatus, error: int, slot: int = 0) -> CcidMessage:
    return CcidMessage(resp, seq, slot, status_byte(icc, CommandStatus.FAILED), error, 0)


class CcidDevice:
    """Answers PC_to_RDR messages for one slot holding `card`."""

    def __init__(
        self,
        profile: Profile,
        card: Card,
        *,
        faults: Faults,
        evidence: Evidence,
        epoch: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._profile = profile
        self._card = card
        self._faults = faults
        self._evidence = evidence
        self._epoch = epoch
        self._level = profile.descriptor.exchange_level
        self._max_data = profile.descriptor.max_ccid_message_length - HEADER_LEN
        self._atr = Atr.parse(profile.atr)
        self._defaults = default_t1_parameters(self._atr)
        self.parameters = self._defaults
        self.powered = False
        self._t1 = self._new_t1()
        self._command_chain: bytearray | None = None
        self._response_chunks: list[bytes] = []
        self._pending_rapdu: bytes | None = None
        # A card whose ATR offers T=0 only speaks T=0 TPDUs at a TPDU-level reader.
        self._t0 = T0Tpdu(lambda apdu: self._execute(apdu)[0]) if self._atr.protocols == (0,) else None
        # ISO 7816-3 §9: the card's Fi/Di (0x11 after a reset, PPS1 after a PPS) and the one the
        # reader was set to by SetParameters (None: never set). TPDU only: when they differ the
        # two ends sample at different rates and the card hears nothing it can read (mute).
        self.card_fidi = 0x11
        self.reader_fidi: int | None = None
        self._pps_window = False  # a PPS is only valid as the first exchange after the ATR
        self.pps_seen: bytes | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def icc_status(self) -> IccStatus:
        # A token is a reader with its card soldered in: the card is always present.
        return IccStatus.PRESENT_ACTIVE if self.powered else IccStatus.PRESENT_INACTIVE

    def power_loss(self) -> None:
        """USB power went away (unplug): the card loses its volatile state."""
        if self.powered:
            self._card.power_off()
            self._evidence.record_power_off()
        self.powered = False
        self._reset_exchange()

    def _new_t1(self) -> T1Card:
        return T1Card(ifsc=self._atr.ifsc, checksum=self._atr.checksum)

    def _reset_exchange(self) -> None:
        self._t1.reset()
        if self._t0 is not None:
            self._t0.reset()
        self._command_chain = None
        self._response_chunks = []
        self._pending_rapdu = None

    # -- entry point -----------------------------------------------------------------------

    def handle(self, raw: bytes) -> Reply:
        """Answer one whole bulk-OUT message (an empty Reply for a runt without a header)."""
        if len(raw) < HEADER_LEN:
            return Reply(())  # no bSeq to answer with; a real reader drops it too
        seq, slot = raw[6], raw[5]
        resp = _response_type(raw[0])
        length = int.from_bytes(raw[1:5], "little")
        delay = self._faults.take_delay()
        if length > self._max_data or length != len(raw) - HEADER_LEN:
            msg = _failure(resp, seq, self.icc_status, ERR_BAD_LENGTH, slot)
        elif slot != 0:
            msg = _failure(resp, seq, IccStatus.ABSENT, ERR_BAD_SLOT, slot)
        else:
            msg, extra = self._dispatch(raw, resp, seq)
            delay += extra
        return self._finish(msg, delay)

    def _finish(self, msg: CcidMessage, delay: float) -> Reply:
        final = msg.encode()
        if self._faults.take_malformed():
            final = final[:-1]  # dwLength now promises one byte more than is sent
        frames: tuple[bytes, ...] = (final,)
        if self._faults.take_wrong_seq():
            stray = bytearray(msg.encode())
            stray[6] = (stray[6] - 1) & 0xFF
            frames = (bytes(stray), final)
        te = b""
        if delay > 0 and self._profile.sends_time_extensions:
            te_status = status_byte(self.icc_status, CommandStatus.TIME_EXTENSION)
            te = CcidMessage(msg.msg_type, msg.seq, 0, te_status, self._faults.wtx_multiplier).encode()
        return Reply(frames, delay, te)

    def _dispatch(self, raw: bytes, resp: MessageType, seq: int) -> tuple[CcidMessage, float]:
        try:
            mtype = MessageType(raw[0])
        except ValueError:
            return _failure(resp, seq, self.icc_status, SlotError.CMD_NOT_SUPPORTED), 0.0
        data = raw[HEADER_LEN:]
        if mtype is MessageType.PC_to_RDR_XfrBlock:
            return self._xfr_block(seq, raw[7], raw[8] | raw[9] << 8, data)
        handler = self._simple_handlers().get(mtype)
        if handler is None:
            return _failure(resp, seq, self.icc_status, SlotError.CMD_NOT_SUPPORTED), 0.0
        return handler(seq, raw[7], data), 0.0

    def _simple_handlers(self) -> dict[MessageType, Callable[[int, int, bytes], CcidMessage]]:
        return {
            MessageType.PC_to_RDR_IccPowerOn: self._power_on,
            MessageType.PC_to_RDR_IccPowerOff: self._power_off,
            MessageType.PC_to_RDR_GetSlotStatus: self._slot_status,
            MessageType.PC_to_RDR_Abort: self._abort,
            MessageType.PC_to_RDR_SetParameters: self._set_parameters,
            MessageType.PC_to_RDR_GetParameters: self._get_parameters,
            MessageType.PC_to_RDR_ResetParameters: self._reset_parameters,
            MessageType.PC_to_RDR_Escape: self._escape,
        }

    # -- slot management -------------------------------------------------------------------

    def _power_on(self, seq: int, power_select: int, _data: bytes) -> CcidMessage:
        # CCID 1.1 §6.1.1 bPowerSelect: 00 automatic, 01 5 V, 02 3 V, 03 1.8 V.
        if power_select > 3:
            return _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, ERR_BAD_BYTE7)
        warm = self.powered
        self._card.power_on()
        self.powered = True
        self.parameters = self._defaults
        self._reset_exchange()
        if self._profile.descriptor.features & Feature.AUTO_IFSD:
            # CCID 1.1 §5.1 dwFeatures 0x400: the reader's own S(IFS request) is the first T=1
            # exchange, so the card sends blocks of up to the reader's dwMaxIFSD from now on.
            self._t1.ifsd = min(self._profile.descriptor.max_ifsd, MAX_T1_IFSD)
        self.card_fidi, self.reader_fidi, self._pps_window = 0x11, None, True
        self._evidence.record_power_on(warm=warm)
        return data_block(seq, self._profile.atr)

    def _power_off(self, seq: int, _b7: int, _data: bytes) -> CcidMessage:
        if self.powered:
            self._card.power_off()
            self._evidence.record_power_off()
        self.powered = False
        self._reset_exchange()
        return slot_status(seq, icc=IccStatus.PRESENT_INACTIVE)

    def _slot_status(self, seq: int, _b7: int, _data: bytes) -> CcidMessage:
        return slot_status(seq, icc=self.icc_status)

    def _abort(self, seq: int, _b7: int, _data: bytes) -> CcidMessage:
        # CCID 1.1 §6.1.13: nothing is ever in flight across calls here, so only chaining
        # state needs dropping.
        self._command_chain = None
        self._response_chunks = []
        return slot_status(seq, icc=self.icc_status)

    def _set_parameters(self, seq: int, protocol: int, data: bytes) -> CcidMessage:
        # The protocol must be one the ATR offers (T=1 for every default profile, reference
        # §1.12); anything else is refused by pointing at bProtocolNum.
        if protocol not in self._atr.protocols or protocol not in (0, 1):
            return _failure(MessageType.RDR_to_PC_Parameters, seq, self.icc_status, ERR_BAD_BYTE7)
        if len(data) != (7 if protocol == 1 else 5):
            return _failure(MessageType.RDR_to_PC_Parameters, seq, self.icc_status, ERR_BAD_LENGTH)
        self.parameters = bytes(data)
        self.reader_fidi = data[0]
        return parameters(seq, protocol, self.parameters, icc=self.icc_status)

    def _get_parameters(self, seq: int, _b7: int, _data: bytes) -> CcidMessage:
        return parameters(seq, 1 if len(self.parameters) == 7 else 0, self.parameters, icc=self.icc_status)

    def _reset_parameters(self, seq: int, _b7: int, _data: bytes) -> CcidMessage:
        self.parameters = self._defaults
        return parameters(seq, 1 if len(self.parameters) == 7 else 0, self.parameters, icc=self.icc_status)

    def _escape(self, seq: int, _b7: int, data: bytes) -> CcidMessage:
        if self._profile.escape_supported and data == ESCAPE_GET_FIRMWARE_FEATURES:
            return escape_response(seq, FIRMWARE_FEATURES, icc=self.icc_status)
        return _failure(MessageType.RDR_to_PC_Escape, seq, self.icc_status, SlotError.CMD_NOT_SUPPORTED)

    # -- data exchange ---------------------------------------------------------------------

    def _xfr_block(self, seq: int, bwi: int, level: int, data: bytes) -> tuple[CcidMessage, float]:
        del bwi  # only a real UART timer would care about the host's BWT multiplier
        if not self.powered:
            mute = _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, SlotError.ICC_MUTE)
            return mute, 0.0
        if self._level is ExchangeLevel.TPDU:
            pps, self._pps_window = self._pps_window and data[:1] == b"\xff", False
            if pps:
                return self._pps(seq, data), 0.0
            if self.reader_fidi is not None and self.reader_fidi != self.card_fidi:
                return _failure(
                    MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, SlotError.ICC_MUTE
                ), 0.0
            if self._t0 is not None:
                return data_block(seq, self._t0.handle(data)), 0.0
            return self._xfr_tpdu(seq, data)
        if self._level is ExchangeLevel.EXTENDED_APDU:
            return self._xfr_extended(seq, level, data)
        if level != CHAIN_WHOLE:
            return _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, ERR_BAD_LEVEL), 0.0
        rapdu, delay = self._execute(data)
        return data_block(seq, rapdu), delay

    def _execute(self, apdu: bytes) -> tuple[bytes, float]:
        """Run one whole command APDU; also returns how long a slow signature takes."""
        self._evidence.record_apdu(apdu, self._epoch())
        rapdu = self._card.execute(apdu)
        slow = self._faults.slow_sign_s
        is_sign = len(apdu) >= 4 and apdu[1] == _INS_GENERAL_AUTHENTICATE and not apdu[0] & _CLA_CHAINING
        return rapdu, (max(0.0, slow) if is_sign else 0.0)

    def _pps(self, seq: int, request: bytes) -> CcidMessage:
        """ISO 7816-3 §9.2: a valid PPS request for T=1 at a rate in TA1's range is confirmed by
        echoing it; the card then runs at PPS1's Fi/Di. Anything else: no answer (mute)."""
        check = 0
        for byte in request:
            check ^= byte
        has_pps1 = len(request) >= 4 and bool(request[1] & 0x10)
        ta1 = self._atr.ta1 or 0x11
        valid = check == 0 and len(request) == (4 if has_pps1 else 3) and request[1] & 0x0F == 1
        if not valid or (has_pps1 and (request[2] >> 4 > ta1 >> 4 or request[2] & 0x0F > ta1 & 0x0F)):
            return _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, SlotError.ICC_MUTE)
        self.pps_seen = bytes(request)
        self.card_fidi = request[2] if has_pps1 else 0x11
        return data_block(seq, bytes(request))

    def _xfr_tpdu(self, seq: int, block: bytes) -> tuple[CcidMessage, float]:
        event = self._t1.receive(block)
        if isinstance(event, SendBlock):
            return data_block(seq, event.block), 0.0
        if isinstance(event, ApduComplete):
            rapdu, delay = self._execute(event.apdu)
            if delay > 0 and self._faults.wtx_blocks:
                # ISO 7816-3 §11.6.2.3: ask for more time with S(WTX); the answer follows
                # the host's S(WTX response).
                self._pending_rapdu = rapdu
                return data_block(seq, self._t1.request_wtx(self._faults.wtx_multiplier)), 0.0
            answer = self._t1.respond(rapdu)
            if self._faults.take_t1_resynch():
                # The card ran the command but sends S(RESYNCH request) (reply NAD, same EDC).
                answer = s_block(answer[0], SType.RESYNCH, False, b"", self._atr.checksum)
            return data_block(seq, answer), delay
        assert isinstance(event, Idle)
        if self._pending_rapdu is not None:
            rapdu, self._pending_rapdu = self._pending_rapdu, None
            return data_block(seq, self._t1.respond(rapdu)), max(0.0, self._faults.slow_sign_s)
        # The card has nothing to say: the reader's BWT runs out (CCID 1.1 §6.2.6).
        return _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, SlotError.ICC_MUTE), 0.0

    def _xfr_extended(self, seq: int, level: int, data: bytes) -> tuple[CcidMessage, float]:
        if level == CHAIN_CONTINUE:
            return self._next_response_chunk(seq), 0.0
        if level in (CHAIN_WHOLE, CHAIN_BEGIN):
            self._command_chain = bytearray()
            self._response_chunks = []
        elif level not in (CHAIN_MIDDLE, CHAIN_END) or self._command_chain is None:
            return self._bad_level(seq), 0.0
        assert self._command_chain is not None
        if len(self._command_chain) + len(data) > MAX_APDU_LENGTH:
            self._command_chain = None
            fail = _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, SlotError.XFR_OVERRUN)
            return fail, 0.0
        self._command_chain += data
        if level in (CHAIN_BEGIN, CHAIN_MIDDLE):
            # §1.10.4: each non-final chunk is acknowledged by an empty DataBlock.
            return data_block(seq, chain=CHAIN_CONTINUE), 0.0
        apdu, self._command_chain = bytes(self._command_chain), None
        rapdu, delay = self._execute(apdu)
        if len(rapdu) <= self._max_data:
            return data_block(seq, rapdu), delay
        chunks = [rapdu[i : i + self._max_data] for i in range(0, len(rapdu), self._max_data)]
        self._response_chunks = chunks[1:]
        return data_block(seq, chunks[0], chain=CHAIN_BEGIN), delay

    def _next_response_chunk(self, seq: int) -> CcidMessage:
        if not self._response_chunks:
            return self._bad_level(seq)
        chunk = self._response_chunks.pop(0)
        chain = CHAIN_MIDDLE if self._response_chunks else CHAIN_END
        return data_block(seq, chunk, chain=chain)

    def _bad_level(self, seq: int) -> CcidMessage:
        self._command_chain = None
        self._response_chunks = []
        return _failure(MessageType.RDR_to_PC_DataBlock, seq, self.icc_status, ERR_BAD_LEVEL)
