"""The card side of T=0 at a TPDU-level reader (ISO 7816-3 §10, ISO 7816-4 §5.3.4).

A TPDU reader passes one T=0 command TPDU per XfrBlock (5-byte header, then P3 data bytes for
case 3) and returns what the card sent, data and SW1 SW2; the procedure bytes stay between
reader and card. Response data to a command with data (case 4, which T=0 carries as case 3)
is announced with 61xx and fetched by GET RESPONSE (00 C0 00 00 Le), 256 bytes at a time.
Pure: the whole-APDU card is `execute`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

INS_GET_RESPONSE: Final = 0xC0
SW_OK: Final = b"\x90\x00"
SW_WRONG_LENGTH: Final = b"\x67\x00"


class T0Tpdu:
    """T=0 TPDUs in, card answers out; `execute` runs one whole APDU (data + SW)."""

    def __init__(self, execute: Callable[[bytes], bytes]) -> None:
        self._execute = execute
        self._pending = b""

    def reset(self) -> None:
        self._pending = b""

    def handle(self, tpdu: bytes) -> bytes:
        if len(tpdu) < 5 or (len(tpdu) > 5 and len(tpdu) != 5 + tpdu[4]):
            self._pending = b""
            return SW_WRONG_LENGTH
        if tpdu[1] == INS_GET_RESPONSE and self._pending:
            return self._next_chunk(tpdu[4] or 256)
        self._pending = b""
        rapdu = self._execute(tpdu)
        data, sw = rapdu[:-2], rapdu[-2:]
        if len(tpdu) == 5 or not data:
            return rapdu  # case 1/2: the data goes back at once (up to Le)
        # Case 3 carrying a case 4: the answer waits for GET RESPONSE.
        self._pending = data + sw
        return bytes([0x61, min(len(data), 256) & 0xFF])

    def _next_chunk(self, le: int) -> bytes:
        data, sw = self._pending[:-2], self._pending[-2:]
        chunk, rest = data[:le], data[le:]
        if rest:
            self._pending = rest + sw
            return chunk + bytes([0x61, min(len(rest), 256) & 0xFF])
        self._pending = b""
        return chunk + sw


__all__ = ["T0Tpdu"]
