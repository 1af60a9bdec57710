"""Bridge framing: the 6-byte header, the per-type limits and the frame decoder (docs/protocol.md §2).

Theory of operation: a frame is `type:u8 flags:u8 length:u32be` and `length` payload bytes.
`FrameDecoder` checks the type, the flags and the length against that type's named maximum as
soon as the 6 header bytes are in, before any payload byte is kept, so a peer cannot make us
hold more than one maximal frame. Message encoding/decoding is `protocol/wire.py`, which
re-exports everything public here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from protocol._sentinel import NEED_DATA, NeedData
from protocol.errors import CloseCode, LocalProtocolError, MalformedFrameError

HEADER_LEN: Final = 6
MAX_CONTROL_PAYLOAD: Final = 16384
"""Largest JSON payload: generous for the biggest message (admin result), small enough to hold."""
CCID_PREFIX_LEN: Final = 6
MIN_CCID_MESSAGE: Final = 10
"""CCID Rev 1.1 §6.1: every bulk message starts with a 10-byte header."""
MIN_INTERRUPT_MESSAGE: Final = 2
"""CCID Rev 1.1 §6.3: interrupt-IN messages (NotifySlotChange 0x50, HardwareError 0x51) are short."""
MAX_CCID_MESSAGE: Final = 10 + 65546
"""CCID header + libccid's largest abData (an extended APDU with 64 KiB data and Le)."""
MAX_CCID_PAYLOAD: Final = CCID_PREFIX_LEN + MAX_CCID_MESSAGE
MAX_ADMIN_RESPONSE_PAYLOAD: Final = 1 << 20
"""An admin answer (e.g. `status` of a server with hundreds of clients) may be large; it only
ever comes from the server, to an identity the server itself accepted as an admin."""

HEADER: Final = struct.Struct(">BBI")
MAX_SPECULATION_PAYLOAD: Final = (256 * 1024) + 16 * (2 + 8 * 512) + 8 + MAX_CCID_MESSAGE
"""Largest `LeaseExchange` / `Prefetched` / `SpeculationPaths` payload: protocol/speculation.py
bounds (MAX_STEPS_BYTES + MAX_PATHS x step overhead + fixed fields + one CCID message); a test
checks the two agree."""


class FrameType(IntEnum):
    """Frame type byte (docs/protocol.md §3)."""

    WELCOME = 0x01
    REFUSED = 0x02
    CLIENT_HELLO = 0x03
    TOKEN_STATUS = 0x10
    SPECULATION_PATHS = 0x11  # binary (protocol/speculation.py), version 2
    LEASE_REQUEST = 0x20
    LEASE_QUEUED = 0x21
    LEASE_GRANTED = 0x22
    LEASE_RELEASE = 0x23
    LEASE_ENDED = 0x24
    LEASE_EXCHANGE = 0x25  # binary (protocol/speculation.py), version 2
    CCID = 0x30
    PREFETCHED = 0x31  # binary (protocol/speculation.py), version 2
    PING = 0x40
    PONG = 0x41
    ERROR = 0x50
    ADMIN_REQUEST = 0x60
    ADMIN_RESPONSE = 0x61
    GOODBYE = 0x7F


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Event: the peer closed its end (EOF after a whole number of frames)."""


def max_payload(
    frame_type: FrameType, *, max_control: int, max_ccid: int, large_admin_response: bool = True
) -> int:
    """The largest payload allowed for `frame_type` under the given limits.

    `large_admin_response=False` is a decoder on the server: it holds the large frames only a
    server sends (ADMIN_RESPONSE, PREFETCHED, SPECULATION_PATHS) to `max_control`, so a client
    cannot make it buffer more than its own largest frame (LEASE_EXCHANGE).
    """
    if frame_type is FrameType.CCID:
        return max_ccid
    if frame_type is FrameType.ADMIN_RESPONSE and large_admin_response:
        return max(max_control, MAX_ADMIN_RESPONSE_PAYLOAD)
    if frame_type in _SPECULATION_FRAMES and (large_admin_response or frame_type is FrameType.LEASE_EXCHANGE):
        return MAX_SPECULATION_PAYLOAD
    return max_control


def frame_header(frame_type: FrameType, length: int) -> bytes:
    """The 6 header bytes of a frame (flags are always 0: reserved)."""
    return HEADER.pack(frame_type, 0, length)


@dataclass(frozen=True, slots=True)
class Frame:
    """One undecoded frame: its type and raw payload."""

    frame_type: FrameType
    payload: bytes


class FrameDecoder:
    """Split a byte stream into frames, checking each header before buffering its payload.

    Feed bytes with `receive_data` (`b""` = EOF) and pull with `next_frame` until it returns
    `NEED_DATA`. `receive_data` must only be called once `next_frame` has returned
    `NEED_DATA` (or raised), so at most one incomplete frame plus the chunk being fed is held.
    """

    def __init__(
        self,
        *,
        max_control_payload: int = MAX_CONTROL_PAYLOAD,
        max_ccid_payload: int = MAX_CCID_PAYLOAD,
        large_admin_response: bool = True,
    ):
        if max_control_payload < 2 or max_ccid_payload < CCID_PREFIX_LEN + MIN_CCID_MESSAGE:
            raise ValueError(f"limits too small: {max_control_payload=}, {max_ccid_payload=}")
        self._max_control = max_control_payload
        self._max_ccid = max_ccid_payload
        self._large_admin_response = large_admin_response
        self._buf = bytearray()
        self._eof = False

    @property
    def buffered(self) -> int:
        """How many received bytes are not yet returned as frames."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; `b""` means the peer closed its end.

        Raises:
            LocalProtocolError: data after EOF, or a whole frame (or a bad header) is still
                waiting to be pulled with `next_frame`.
        """
        if self._eof:
            raise LocalProtocolError(f"received {len(data)} bytes after eof")
        if not data:
            self._eof = True
            return
        try:
            pending = self._frame_end() is not None
        except MalformedFrameError:
            pending = True  # a bad header is waiting to be reported by next_frame()
        if pending:
            raise LocalProtocolError("call next_frame() until NEED_DATA before receive_data()")
        self._buf += data

    def next_frame(self) -> Frame | ConnectionClosed | NeedData:
        """Return the next whole frame, `ConnectionClosed` at a clean EOF, or `NEED_DATA`.

        Raises:
            MalformedFrameError: unknown type, nonzero flags, a length above the type's
                maximum (close code FRAME_TOO_LARGE), or EOF in the middle of a frame.
        """
        end = self._frame_end()
        if end is None:
            if not self._eof:
                return NEED_DATA
            if self._buf:
                raise MalformedFrameError(f"eof in the middle of a frame ({len(self._buf)} bytes buffered)")
            return ConnectionClosed()
        # One copy of the payload, not two (a bytearray slice copies before bytes() does), and
        # the buffer released when it held just this frame: the peak stays near 2x the frame
        # (reliability-anchors §7.2 B1, tests/load/test_decoder_allocation.py).
        with memoryview(self._buf) as view:
            frame = Frame(FrameType(self._buf[0]), bytes(view[HEADER_LEN:end]))
        if end == len(self._buf):
            self._buf = bytearray()
        else:
            del self._buf[:end]
        return frame

    def _frame_end(self) -> int | None:
        """End offset of the first buffered frame if it is whole, else None; checks the header."""
        if len(self._buf) < HEADER_LEN:
            return None
        raw_type, flags, length = HEADER.unpack_from(self._buf)
        if raw_type not in _FRAME_TYPES:
            raise MalformedFrameError(f"unknown frame type 0x{raw_type:02x}")
        if flags != 0:
            raise MalformedFrameError(f"reserved flags must be 0, got 0x{flags:02x}")
        limit = max_payload(
            FrameType(raw_type),
            max_control=self._max_control,
            max_ccid=self._max_ccid,
            large_admin_response=self._large_admin_response,
        )
        if length > limit:
            name = FrameType(raw_type).name.lower()
            raise MalformedFrameError(
                f"{name} frame length {length} exceeds {limit}", CloseCode.FRAME_TOO_LARGE
            )
        end = HEADER_LEN + length
        return end if len(self._buf) >= end else None


_FRAME_TYPES: Final = frozenset(int(t) for t in FrameType)
_SPECULATION_FRAMES: Final = frozenset(
    {FrameType.LEASE_EXCHANGE, FrameType.PREFETCHED, FrameType.SPECULATION_PATHS}
)
