"""USB/IP wire format, the exporting ("server", device) side: pure, sans-I/O.

Linux kernel documentation "USB/IP protocol" (Documentation/usb/usbip_protocol.rst) defines
the packets; every field is big-endian except the 8-byte USB setup packet, which is copied as
the host sent it (little-endian, USB 2.0 §9.3).

Theory of operation
-------------------
A connection starts in the *operation* phase: the importer sends one OP_REQ_DEVLIST (we answer
OP_REP_DEVLIST, then it closes) or one OP_REQ_IMPORT naming a bus id (we answer OP_REP_IMPORT;
on success the connection moves to the *URB* phase for that device). In the URB phase every
packet starts with a 48-byte header: USBIP_CMD_SUBMIT (followed by the OUT data) or
USBIP_CMD_UNLINK; we answer with USBIP_RET_SUBMIT (followed by the IN data) and
USBIP_RET_UNLINK. `UsbipServerSide` decodes what the importer sends (`receive_data`,
`next_event`); the `rep_*`/`ret_*` functions encode our answers. Every length is checked from
the header before anything is buffered (OUT data is bounded by `MAX_OUT_LENGTH`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from protocol import NEED_DATA, NeedData
from protocol.errors import CloseCode, RemoteProtocolError

USBIP_VERSION: Final = 0x0111
DEFAULT_PORT: Final = 3240  # IANA "usbip"
BUSID_SIZE: Final = 32
PATH_SIZE: Final = 256
HEADER_SIZE: Final = 48
# The largest OUT transfer we buffer: one whole CCID command (10 + 65546 bytes) with room to spare.
MAX_OUT_LENGTH: Final = 131072
ST_OK: Final = 0
ST_NA: Final = 1  # "not available": unknown bus id, or already imported


class UrbStatus(IntEnum):
    """URB status values on the wire: negated *Linux* errno numbers, whatever the host OS.

    Python's `errno` module gives the local OS's numbers (on Windows ECONNRESET is 10054), so the
    values the USB/IP importers (vhci-hcd, usbip-win2) expect are spelled out here.
    """

    OK = 0
    ENOENT = -2  # a killed URB
    EPIPE = -32  # endpoint stalled
    EOVERFLOW = -75  # babble: more data than the buffer holds
    ECONNRESET = -104  # unlinked while pending


class OpCode(IntEnum):
    OP_REQ_DEVLIST = 0x8005
    OP_REP_DEVLIST = 0x0005
    OP_REQ_IMPORT = 0x8003
    OP_REP_IMPORT = 0x0003


class Command(IntEnum):
    USBIP_CMD_SUBMIT = 0x00000001
    USBIP_CMD_UNLINK = 0x00000002
    USBIP_RET_SUBMIT = 0x00000003
    USBIP_RET_UNLINK = 0x00000004


class Direction(IntEnum):
    OUT = 0
    IN = 1


class Speed(IntEnum):  # enum usb_device_speed
    LOW = 1
    FULL = 2
    HIGH = 3


@dataclass(frozen=True, slots=True)
class ExportedDevice:
    """One exported device as OP_REP_DEVLIST / OP_REP_IMPORT describe it."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: Speed
    vid: int
    pid: int
    bcd_device: int
    device_class: int
    device_subclass: int
    device_protocol: int
    configuration_value: int
    num_configurations: int
    interfaces: tuple[tuple[int, int, int], ...]  # (class, subclass, protocol) per interface

    @property
    def devid(self) -> int:
        return (self.busnum << 16) | self.devnum

    def encode(self, *, with_interfaces: bool) -> bytes:
        head = struct.pack(
            ">256s32sIIIHHHBBBBBB",
            self.path.encode(),
            self.busid.encode(),
            self.busnum,
            self.devnum,
            int(self.speed),
            self.vid,
            self.pid,
            self.bcd_device,
            self.device_class,
            self.device_subclass,
            self.device_protocol,
            self.configuration_value,
            self.num_configurations,
            len(self.interfaces),
        )
        if not with_interfaces:
            return head
        return head + b"".join(struct.pack(">BBBx", *i) for i in self.interfaces)


# -- what the importer sends ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReqDevlist:
    pass


@dataclass(frozen=True, slots=True)
class ReqImport:
    busid: str


@dataclass(frozen=True, slots=True)
class CmdSubmit:
    seqnum: int
    devid: int
    direction: Direction
    ep: int  # endpoint number without the direction bit
    transfer_flags: int
    length: int  # transfer_buffer_length
    interval: int
    setup: bytes  # 8 bytes, meaningful on endpoint 0
    data: bytes  # OUT data (length bytes); empty for IN


@dataclass(frozen=True, slots=True)
class CmdUnlink:
    seqnum: int
    devid: int
    unlink_seqnum: int


@dataclass(frozen=True, slots=True)
class Closed:
    pass


Event = ReqDevlist | ReqImport | CmdSubmit | CmdUnlink | Closed


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"USB/IP: {message}", CloseCode.PROTOCOL_ERROR)


class UsbipServerSide:
    """Decodes the importer's packets; `imported()` switches to the URB phase."""

    def __init__(self, *, max_out_length: int = MAX_OUT_LENGTH) -> None:
        self._buf = bytearray()
        self._eof = False
        self._urb_phase = False
        self._max_out = max_out_length

    def imported(self) -> None:
        """OP_REP_IMPORT with ST_OK was sent: URB headers follow from now on."""
        self._urb_phase = True

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        self._buf += data

    def next_event(self) -> Event | NeedData:
        event = self._urb() if self._urb_phase else self._op()
        if event is NEED_DATA and self._eof:
            if self._buf:
                raise _bad(f"connection closed inside a packet ({len(self._buf)} bytes pending)")
            return Closed()
        return event

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _op(self) -> Event | NeedData:
        if len(self._buf) < 8:
            return NEED_DATA
        version, code, _status = struct.unpack_from(">HHI", self._buf)
        if code == OpCode.OP_REQ_DEVLIST:
            self._take(8)
            return ReqDevlist()
        if code == OpCode.OP_REQ_IMPORT:
            if len(self._buf) < 8 + BUSID_SIZE:
                return NEED_DATA
            raw = self._take(8 + BUSID_SIZE)[8:]
            return ReqImport(raw.split(b"\0", 1)[0].decode("ascii", "replace"))
        raise _bad(f"unknown operation 0x{code:04X} (version 0x{version:04X})")

    def _urb(self) -> Event | NeedData:
        if len(self._buf) < HEADER_SIZE:
            return NEED_DATA
        command, seqnum, devid, direction, ep = struct.unpack_from(">IIIII", self._buf)
        if command == Command.USBIP_CMD_UNLINK:
            (unlink,) = struct.unpack_from(">I", self._buf, 20)
            self._take(HEADER_SIZE)
            return CmdUnlink(seqnum, devid, unlink)
        if command != Command.USBIP_CMD_SUBMIT:
            raise _bad(f"unknown command 0x{command:08X}")
        flags, length, _start, packets, interval = struct.unpack_from(">IIiiI", self._buf, 20)
        if direction not in (Direction.OUT, Direction.IN) or ep > 15:
            raise _bad(f"bad endpoint {ep} / direction {direction}")
        if packets not in (0, -1):
            raise _bad(f"isochronous transfer ({packets} packets) to a device without one")
        out = length if direction == Direction.OUT else 0
        if out > self._max_out:
            raise _bad(f"OUT transfer of {out} bytes exceeds {self._max_out}")
        if len(self._buf) < HEADER_SIZE + out:
            return NEED_DATA
        raw = self._take(HEADER_SIZE + out)
        return CmdSubmit(
            seqnum=seqnum,
            devid=devid,
            direction=Direction(direction),
            ep=ep,
            transfer_flags=flags,
            length=length,
            interval=interval,
            setup=raw[40:48],
            data=raw[HEADER_SIZE:],
        )


# -- what we send -----------------------------------------------------------------------------
def rep_devlist(devices: list[ExportedDevice]) -> bytes:
    head = struct.pack(">HHII", USBIP_VERSION, OpCode.OP_REP_DEVLIST, ST_OK, len(devices))
    return head + b"".join(d.encode(with_interfaces=True) for d in devices)


def rep_import(device: ExportedDevice | None) -> bytes:
    if device is None:
        return struct.pack(">HHI", USBIP_VERSION, OpCode.OP_REP_IMPORT, ST_NA)
    return struct.pack(">HHI", USBIP_VERSION, OpCode.OP_REP_IMPORT, ST_OK) + device.encode(
        with_interfaces=False
    )


def ret_submit(seqnum: int, status: int, *, data: bytes = b"", actual_length: int | None = None) -> bytes:
    """RET_SUBMIT; `data` follows for IN transfers, `actual_length` alone for OUT ones.

    The kernel documentation sets devid, direction and ep to 0 in replies: the seqnum says it all.
    """
    actual = len(data) if actual_length is None else actual_length
    head = struct.pack(">IIIIIiIiii8x", Command.USBIP_RET_SUBMIT, seqnum, 0, 0, 0, status, actual, 0, 0, 0)
    return head + data


def ret_unlink(seqnum: int, status: int) -> bytes:
    return struct.pack(">IIIIIi24x", Command.USBIP_RET_UNLINK, seqnum, 0, 0, 0, status)


__all__ = [
    "BUSID_SIZE",
    "DEFAULT_PORT",
    "HEADER_SIZE",
    "MAX_OUT_LENGTH",
    "USBIP_VERSION",
    "Closed",
    "CmdSubmit",
    "CmdUnlink",
    "Command",
    "Direction",
    "Event",
    "ExportedDevice",
    "OpCode",
    "ReqDevlist",
    "ReqImport",
    "Speed",
    "UrbStatus",
    "UsbipServerSide",
    "rep_devlist",
    "rep_import",
    "ret_submit",
    "ret_unlink",
]
