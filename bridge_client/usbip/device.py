"""The emulated CCID reader's USB side, pure and sans-I/O: what a real reader's firmware does.

Theory of operation
-------------------
The USB/IP connection hands us URBs (`submit`) and cancellations (`unlink`); we hand back
`Completion`s (each becomes one RET_SUBMIT). Nothing here waits: an IN URB that has nothing to
read yet is kept pending per endpoint, in order, until data arrives.

- Endpoint 0 (USB 2.0 §9.4): GET_DESCRIPTOR (device, configuration with the CCID class
  descriptor, strings), GET_STATUS, GET_CONFIGURATION/INTERFACE, SET_CONFIGURATION (1 or 0),
  SET_INTERFACE (0/0), CLEAR_FEATURE / SET_FEATURE(ENDPOINT_HALT), the CCID ABORT class request,
  and the hub-port SET_FEATURE(PORT_RESET) USB/IP importers send for a device reset. Anything
  else stalls (-EPIPE).
- Bulk-OUT: OUT URBs are joined into whole CCID messages by the header's dwLength (a reader
  knows where a command ends from it, however the host split it into packets), bounded by the
  class descriptor's dwMaxCCIDMessageLength. Commands that need the card (IccPowerOn,
  IccPowerOff, XfrBlock) go to the card task (`take_command`); the rest are answered here. A
  command while the card task works is answered at once with bError CMD_SLOT_BUSY (CCID 1.1
  §6.2.6); ABORT is answered as done.
- Bulk-IN: answers are cut at the URB's buffer; a message that ends exactly where a URB is
  full and fills its last 64-byte packet owes a zero-length packet, which completes the next
  URB with 0 bytes (USB 2.0 §5.8.3). A URB whose buffer is no multiple of wMaxPacketSize and is
  shorter than what is left would overflow: it completes with -EOVERFLOW and the data stays.
- Interrupt-IN: NotifySlotChange (CCID 1.1 §6.3.1) on card insertion and removal; notifications
  not yet read merge into one (changed bits OR-ed, the latest presence).
- `unlink` of a pending URB removes it (RET_UNLINK -ECONNRESET, no RET_SUBMIT); of a finished one
  changes nothing (RET_UNLINK 0).
- A reset (or SET_CONFIGURATION) drops half-received commands and unread answers, powers the
  card down and clears halts; the card task is told through `take_power_loss`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from bridge_client.usbip import descriptors as d
from bridge_client.usbip.wire import UrbStatus
from protocol import ccid
from protocol.ccid import CommandStatus, IccStatus, MessageType, SlotError
from protocol.errors import MalformedCcidMessageError

EPIPE, EOVERFLOW = int(UrbStatus.EPIPE), int(UrbStatus.EOVERFLOW)
# The card task's commands; everything else is the reader's own business.
CARD_COMMANDS = frozenset(
    {MessageType.PC_to_RDR_IccPowerOn, MessageType.PC_to_RDR_IccPowerOff, MessageType.PC_to_RDR_XfrBlock}
)
MAX_PENDING_URBS = 64  # per endpoint; hosts keep one or two in flight
MAX_UNREAD_ANSWERS = 32  # a CCID host reads each answer before its next command


@dataclass(frozen=True, slots=True)
class Completion:
    seqnum: int
    status: int  # UrbStatus: 0 or a negated Linux errno
    data: bytes = b""  # IN data
    actual_length: int | None = None  # OUT: bytes taken (default len(data))


@dataclass(slots=True)
class _Urb:
    seqnum: int
    length: int


class UrbLimitError(Exception):
    """The host keeps more IN URBs pending than any driver would."""


class CcidReaderDevice:
    def __init__(self, descriptors: d.ReaderDescriptors) -> None:
        self.descriptors = descriptors
        self.configuration = 0
        self.halted: set[int] = set()
        self.card_present = False
        self.powered = False
        self.busy: ccid.CcidMessage | None = None  # the command the card task works on
        self._commands: deque[ccid.CcidMessage] = deque()
        self._out = bytearray()
        self._bulk_in: deque[bytes] = deque()
        self._offset = 0
        self._zlp_owed = False
        self._notify: tuple[bool, bool] | None = None  # (present, changed) not yet read
        self._pending: dict[int, deque[_Urb]] = {d.EP_BULK_IN: deque(), d.EP_INTR_IN: deque()}
        self._power_loss = False
        self._parameters: tuple[int, bytes] = (1, _DEFAULT_PARAMETERS[1])

    # -- URBs from the host ----------------------------------------------------------------
    def submit(self, seqnum: int, endpoint: int, length: int, setup: bytes, data: bytes) -> list[Completion]:
        """One CMD_SUBMIT; `endpoint` carries the direction bit (0x82 = bulk-IN)."""
        if endpoint in (0, 0x80):
            return [self._control(seqnum, setup, data)]
        if self.configuration == 0 or endpoint not in (d.EP_BULK_OUT, d.EP_BULK_IN, d.EP_INTR_IN):
            return [Completion(seqnum, EPIPE)]
        if endpoint in self.halted:
            return [Completion(seqnum, EPIPE)]
        if endpoint == d.EP_BULK_OUT:
            return [Completion(seqnum, 0, actual_length=len(data)), *self._bulk_out(data)]
        queue = self._pending[endpoint]
        if len(queue) >= MAX_PENDING_URBS:
            raise UrbLimitError(f"more than {MAX_PENDING_URBS} URBs pending on endpoint 0x{endpoint:02X}")
        queue.append(_Urb(seqnum, length))
        return self._pump()

    def unlink(self, seqnum: int) -> bool:
        """True when the URB was still pending (and is now gone)."""
        for queue in self._pending.values():
            for urb in queue:
                if urb.seqnum == seqnum:
                    queue.remove(urb)
                    return True
        return False

    # -- the card task's side --------------------------------------------------------------
    def take_command(self) -> ccid.CcidMessage | None:
        if self.busy is not None or not self._commands:
            return None
        self.busy = self._commands.popleft()
        return self.busy

    def take_power_loss(self) -> bool:
        """True once after a reset powered the card down (forward an IccPowerOff if leased)."""
        lost, self._power_loss = self._power_loss, False
        return lost

    def answer(self, message: ccid.CcidMessage) -> list[Completion]:
        """The card task's answer to `busy`; the slot is free again."""
        self.busy = None
        return self._queue_answer(message)

    def time_extension(self) -> list[Completion]:
        """CCID 1.1 §6.2.7: the card needs more time (bStatus 0x80, bError = BWT multiplier 1)."""
        if self.busy is None or self._bulk_in:
            return []  # the host has not read the last one yet: one is enough
        wtx = ccid.data_block(
            self.busy.seq, icc=IccStatus.PRESENT_ACTIVE, cmd=CommandStatus.TIME_EXTENSION, error=1
        )
        return self._queue_answer(wtx)

    def set_card_present(self, present: bool) -> list[Completion]:
        if present == self.card_present:
            return []
        self.card_present = present
        if not present:
            self.powered = False
        self._notify = (present, True)  # an unread notification merges: the latest presence, changed
        return self._pump()

    def icc_status(self) -> IccStatus:
        if not self.card_present:
            return IccStatus.ABSENT
        return IccStatus.PRESENT_ACTIVE if self.powered else IccStatus.PRESENT_INACTIVE

    # -- endpoint 0 --------------------------------------------------------------------------
    def _control(self, seqnum: int, setup: bytes, data: bytes) -> Completion:
        request_type, request, value, index, length = struct.unpack("<BBHHH", setup)
        answer = self._standard(request_type, request, value, index)
        if answer is None:
            return Completion(seqnum, EPIPE)
        if request_type & 0x80:
            return Completion(seqnum, 0, answer[:length])
        return Completion(seqnum, 0, actual_length=len(data))

    def _standard(self, request_type: int, request: int, value: int, index: int) -> bytes | None:
        key = (request_type, request)
        if key == (0x80, 6):  # GET_DESCRIPTOR
            kind, number = value >> 8, value & 0xFF
            if kind == d.DT_DEVICE:
                return self.descriptors.device()
            if kind == d.DT_CONFIG and number == 0:
                return self.descriptors.configuration()
            if kind == d.DT_STRING:
                return self.descriptors.string(number)
            return None
        if key in ((0x80, 0), (0x81, 0)):  # GET_STATUS device / interface: bus powered, no wakeup
            return b"\x00\x00"
        if key == (0x82, 0):
            return b"\x01\x00" if index in self.halted else b"\x00\x00"
        if key == (0x80, 8):  # GET_CONFIGURATION
            return bytes([self.configuration])
        if key == (0x81, 10):  # GET_INTERFACE
            return b"\x00" if index == 0 else None
        if key == (0x00, 9):  # SET_CONFIGURATION
            if value not in (0, d.CONFIGURATION_VALUE):
                return None
            self.configuration = value
            self._reset_state()
            return b""
        if key == (0x01, 11):  # SET_INTERFACE
            return b"" if (index, value) == (0, 0) else None
        if key in ((0x02, 1), (0x02, 3)) and value == 0:  # CLEAR_FEATURE / SET_FEATURE(ENDPOINT_HALT)
            if index not in (d.EP_BULK_OUT, d.EP_BULK_IN, d.EP_INTR_IN):
                return None
            (self.halted.discard if request == 1 else self.halted.add)(index)
            return b""
        if key == (0x00, 5):  # SET_ADDRESS: the importer's own business
            return b""
        if key == (0x23, 3) and value == 4:  # SET_FEATURE(PORT_RESET): a USB reset
            self._reset_state()
            return b""
        if key == (0x21, 1):  # CCID 1.1 §5.3.1 ABORT: the PC_to_RDR_Abort that follows does the work
            return b""
        return None

    def _reset_state(self) -> None:
        if self.powered:
            self._power_loss = True
        self.powered = False
        self.halted.clear()
        self._out.clear()
        self._commands.clear()
        self._bulk_in.clear()
        self._offset, self._zlp_owed = 0, False

    # -- bulk ----------------------------------------------------------------------------------
    def _bulk_out(self, data: bytes) -> list[Completion]:
        self._out += data
        done: list[Completion] = []
        while len(self._out) >= ccid.HEADER_LEN:
            (length,) = struct.unpack_from("<I", self._out, 1)
            if length > d.MAX_MESSAGE_LENGTH - ccid.HEADER_LEN:
                # A reader cannot take it: drop what we have and stall, as firmware would.
                self._out.clear()
                self.halted.add(d.EP_BULK_OUT)
                break
            if len(self._out) < ccid.HEADER_LEN + length:
                break
            raw = bytes(self._out[: ccid.HEADER_LEN + length])
            del self._out[: ccid.HEADER_LEN + length]
            done += self._command(raw)
        return done

    def _command(self, raw: bytes) -> list[Completion]:
        seq, slot = raw[6], raw[5]
        try:
            msg = ccid.decode_message(raw, max_message_length=d.MAX_MESSAGE_LENGTH)
        except MalformedCcidMessageError:
            # CCID 1.1 §6.2.6: an unknown command fails with bError CMD_NOT_SUPPORTED (0).
            return self._queue_answer(self._failed(MessageType.RDR_to_PC_SlotStatus, seq, slot, 0))
        kind = msg.msg_type
        if kind not in _ANSWERED:  # an RDR_to_PC type sent as a command
            return self._queue_answer(self._failed(MessageType.RDR_to_PC_SlotStatus, seq, slot, 0))
        if slot != 0:  # CCID 1.1 §6.2.6: bError 5 names the bad field, bSlot
            return self._queue_answer(self._failed(ccid.response_type_for(kind), seq, slot, 5))
        if kind == MessageType.PC_to_RDR_Abort:
            return self._queue_answer(ccid.slot_status(seq, icc=self.icc_status()))
        if self.busy is not None or self._commands:
            reply = ccid.response_type_for(kind)
            return self._queue_answer(self._failed(reply, seq, 0, SlotError.CMD_SLOT_BUSY))
        if kind in CARD_COMMANDS:
            if not self.card_present:
                reply = ccid.response_type_for(kind)
                return self._queue_answer(self._failed(reply, seq, 0, SlotError.ICC_MUTE))
            if kind == MessageType.PC_to_RDR_XfrBlock and not self.powered:
                return self._queue_answer(
                    self._failed(MessageType.RDR_to_PC_DataBlock, seq, 0, SlotError.ICC_MUTE)
                )
            self._commands.append(msg)
            return []
        return self._queue_answer(self._local(msg))

    def _local(self, msg: ccid.CcidMessage) -> ccid.CcidMessage:
        kind, seq, icc = msg.msg_type, msg.seq, self.icc_status()
        if kind == MessageType.PC_to_RDR_GetSlotStatus:
            return ccid.slot_status(seq, icc=icc)
        if kind in (
            MessageType.PC_to_RDR_GetParameters,
            MessageType.PC_to_RDR_SetParameters,
            MessageType.PC_to_RDR_ResetParameters,
        ):
            if icc == IccStatus.ABSENT:
                return self._failed(MessageType.RDR_to_PC_Parameters, seq, 0, SlotError.ICC_MUTE)
            # The server's reader below the tunnel sets the card's real parameters; this one only
            # keeps what the host set (CCID 1.1 §6.1.7) so that GetParameters reads it back.
            if kind == MessageType.PC_to_RDR_SetParameters and msg.b7 in _DEFAULT_PARAMETERS:
                if len(msg.data) != len(_DEFAULT_PARAMETERS[msg.b7]):
                    return self._failed(
                        MessageType.RDR_to_PC_Parameters, seq, 0, 10
                    )  # bError: dwLength offset
                self._parameters = (msg.b7, msg.data)
            elif kind == MessageType.PC_to_RDR_SetParameters:
                return self._failed(MessageType.RDR_to_PC_Parameters, seq, 0, 7)  # bProtocolNum offset
            elif kind == MessageType.PC_to_RDR_ResetParameters:
                self._parameters = (1, _DEFAULT_PARAMETERS[1])
            protocol, params = self._parameters
            return ccid.parameters(seq, protocol, params, icc=icc)
        return self._failed(ccid.response_type_for(kind), seq, 0, SlotError.CMD_NOT_SUPPORTED)

    def _failed(self, kind: MessageType, seq: int, slot: int, error: int) -> ccid.CcidMessage:
        status = ccid.status_byte(self.icc_status(), CommandStatus.FAILED)
        return ccid.CcidMessage(kind, seq, slot, status, int(error))

    def _queue_answer(self, message: ccid.CcidMessage) -> list[Completion]:
        if len(self._bulk_in) >= MAX_UNREAD_ANSWERS:
            raise UrbLimitError(
                f"the host left {MAX_UNREAD_ANSWERS} answers unread and keeps sending commands"
            )
        self._bulk_in.append(message.encode())
        return self._pump()

    # -- delivering IN data ----------------------------------------------------------------
    def _pump(self) -> list[Completion]:
        done: list[Completion] = []
        bulk = self._pending[d.EP_BULK_IN]
        while bulk and (self._bulk_in or self._zlp_owed):
            urb = bulk[0]
            if self._zlp_owed:
                self._zlp_owed = False
                done.append(Completion(bulk.popleft().seqnum, 0, b""))
                continue
            message = self._bulk_in[0]
            left = len(message) - self._offset
            n = min(left, urb.length)
            if n < left and urb.length % d.PACKET_SIZE:
                # The device's next full packet does not fit the host's buffer: babble.
                done.append(Completion(bulk.popleft().seqnum, EOVERFLOW, b""))
                continue
            chunk = message[self._offset : self._offset + n]
            bulk.popleft()
            if n == left:
                self._bulk_in.popleft()
                self._offset = 0
                self._zlp_owed = n == urb.length and len(message) % d.PACKET_SIZE == 0
            else:
                self._offset += n
            done.append(Completion(urb.seqnum, 0, chunk))
        intr = self._pending[d.EP_INTR_IN]
        if intr and self._notify is not None:
            present, changed = self._notify
            self._notify = None
            note = ccid.NotifySlotChange(present=(present,), changed=(changed,)).encode()
            done.append(Completion(intr.popleft().seqnum, 0, note[:2]))
        return done


# CCID 1.1 §6.1.7 abProtocolDataStructure defaults: T=0 (Fi/Di 11, guard time 0, WI 10) and
# T=1 (Fi/Di 11, LRC, guard time 0, BWI 4 / CWI 13, no clock stop, IFSC 254, NAD 0).
_DEFAULT_PARAMETERS = {
    0: bytes([0x11, 0x00, 0x00, 0x0A, 0x00]),
    1: bytes([0x11, 0x10, 0x00, 0x4D, 0x00, 0xFE, 0x00]),
}

# Command types whose answer type CCID defines (response_type_for knows them).
_ANSWERED = frozenset(
    {
        MessageType.PC_to_RDR_IccPowerOn,
        MessageType.PC_to_RDR_IccPowerOff,
        MessageType.PC_to_RDR_GetSlotStatus,
        MessageType.PC_to_RDR_XfrBlock,
        MessageType.PC_to_RDR_GetParameters,
        MessageType.PC_to_RDR_ResetParameters,
        MessageType.PC_to_RDR_SetParameters,
        MessageType.PC_to_RDR_Escape,
        MessageType.PC_to_RDR_IccClock,
        MessageType.PC_to_RDR_T0APDU,
        MessageType.PC_to_RDR_Secure,
        MessageType.PC_to_RDR_Mechanical,
        MessageType.PC_to_RDR_Abort,
        MessageType.PC_to_RDR_SetDataRateAndClockFrequency,
    }
)
