"""vsmartcard vpcd framing, both ends, sans I/O.

Every message in both directions is a 2-byte big-endian length followed by that many payload
bytes (vsmartcard vpcd.c sendToVICC/recvFromVICC). From vpcd (pcscd's driver) to the card, a
1-byte payload is a control code (power off 00, power on 01, reset 02, get ATR 04) and any
longer payload is a command APDU. From the card, every message is a reply: an ATR to get-ATR,
an R-APDU to an APDU. Power events get no reply. A zero-length reply or a closed connection
means "card removed" (vpcd `vicc_eject`), so the card side never sends an empty message.

The length field caps a payload at 0xFFFF bytes, so a frame is bounded before it is buffered.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from protocol._sentinel import NEED_DATA, NeedData
from protocol.errors import LocalProtocolError, RemoteProtocolError

LENGTH_PREFIX: Final = 2
MAX_PAYLOAD: Final = 0xFFFF
MAX_ATR_LENGTH: Final = 33  # ISO 7816-3 §8.2.1; vpcd MAX_ATR_SIZE
DEFAULT_PORT: Final = 35963  # vpcd.h VPCDPORT; slot n listens on DEFAULT_PORT + n


class VpcdControl(IntEnum):
    POWER_OFF = 0
    POWER_ON = 1
    RESET = 2
    GET_ATR = 4


@dataclass(frozen=True, slots=True)
class Control:
    code: VpcdControl


@dataclass(frozen=True, slots=True)
class Apdu:
    data: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """Reader side: one reply from the card (an ATR or an R-APDU)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    pass


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"vpcd payload too long: {len(payload)} > {MAX_PAYLOAD} bytes")
    return len(payload).to_bytes(LENGTH_PREFIX, "big") + payload


class _Deframer:
    """Splits a byte stream into length-prefixed payloads."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise LocalProtocolError("vpcd data received after eof")
            return
        if not data:
            self._eof = True
            return
        # At most one partial frame (2 + 0xFFFF bytes) stays buffered: next_event() drains
        # whole frames, and the caller reads again only after NEED_DATA.
        self._buf += data

    def next_payload(self) -> bytes | Closed | NeedData:
        if len(self._buf) >= LENGTH_PREFIX:
            length = int.from_bytes(self._buf[:LENGTH_PREFIX], "big")
            if len(self._buf) >= LENGTH_PREFIX + length:
                payload = bytes(self._buf[LENGTH_PREFIX : LENGTH_PREFIX + length])
                del self._buf[: LENGTH_PREFIX + length]
                return payload
        if self._eof:
            if self._buf:
                pending = len(self._buf)
                raise RemoteProtocolError(f"vpcd connection closed mid-frame ({pending} bytes pending)")
            return Closed()
        return NEED_DATA


class VpcdCardSide:
    """We are the card; the peer is vpcd inside pcscd."""

    def __init__(self) -> None:
        self._deframer = _Deframer()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the socket; b"" means EOF."""
        self._deframer.receive_data(data)

    def next_event(self) -> Control | Apdu | Closed | NeedData:
        payload = self._deframer.next_payload()
        if not isinstance(payload, bytes):
            return payload
        if len(payload) == 0:
            raise RemoteProtocolError("vpcd sent an empty message")
        if len(payload) == 1:
            try:
                return Control(VpcdControl(payload[0]))
            except ValueError:
                raise RemoteProtocolError(f"unknown vpcd control code 0x{payload[0]:02x}") from None
        return Apdu(payload)

    def send_atr(self, atr: bytes) -> bytes:
        # An empty ATR would signal removal and hang pcscd's clients (DESIGN §11).
        if not 1 <= len(atr) <= MAX_ATR_LENGTH:
            raise LocalProtocolError(f"atr must be 1..{MAX_ATR_LENGTH} bytes, got {len(atr)}")
        return frame(atr)

    def send_response(self, rapdu: bytes) -> bytes:
        if len(rapdu) < 2:
            raise LocalProtocolError(f"r-apdu must carry a status word, got {len(rapdu)} bytes")
        return frame(rapdu)


class VpcdReaderSide:
    """The pcscd/vpcd end, for tests and the benchmark harness."""

    def __init__(self) -> None:
        self._deframer = _Deframer()

    def receive_data(self, data: bytes) -> None:
        self._deframer.receive_data(data)

    def next_event(self) -> Response | Closed | NeedData:
        payload = self._deframer.next_payload()
        if isinstance(payload, bytes):
            return Response(payload)
        return payload

    def send_control(self, code: VpcdControl) -> bytes:
        return frame(bytes((code,)))

    def send_apdu(self, apdu: bytes) -> bytes:
        # A 1-byte payload would be read as a control code; the shortest APDU is 4 bytes.
        if len(apdu) < 4:
            raise LocalProtocolError(f"command apdu must be at least 4 bytes, got {len(apdu)}")
        return frame(apdu)
