"""A few PC/SC calls through libpcsclite with ctypes: a client we did not write, for tests.

pcsc-lite on Linux: SCARDCONTEXT/SCARDHANDLE are `long`, DWORD is `unsigned long` (8 bytes on
x86-64), SCARD_IO_REQUEST is {dwProtocol, cbPciLength}. Only what the reset test needs.
"""

from __future__ import annotations

import ctypes
from typing import Final

SCARD_SCOPE_SYSTEM: Final = 2
SCARD_SHARE_SHARED: Final = 2
SCARD_PROTOCOL_T0: Final = 1
SCARD_PROTOCOL_T1: Final = 2
SCARD_LEAVE_CARD: Final = 0
SCARD_RESET_CARD: Final = 1

_DWORD = ctypes.c_ulong
_LONG = ctypes.c_long


class _IoRequest(ctypes.Structure):
    _fields_ = [("dwProtocol", _DWORD), ("cbPciLength", _DWORD)]


class PcscError(RuntimeError):
    pass


def _lib() -> ctypes.CDLL:
    return ctypes.CDLL("libpcsclite.so.1")


def _check(name: str, rv: int) -> None:
    if rv != 0:
        raise PcscError(f"{name} failed: 0x{rv & 0xFFFFFFFF:08X}")


class Card:
    """One SCardConnect'ed card in `reader`, shared mode, T=0 or T=1."""

    def __init__(self, reader: str) -> None:
        self._lib = _lib()
        self._ctx = _LONG()
        _check("SCardEstablishContext", self._lib.SCardEstablishContext(
            _DWORD(SCARD_SCOPE_SYSTEM), None, None, ctypes.byref(self._ctx)))  # fmt: skip
        self._handle = _LONG()
        self._protocol = _DWORD()
        rv = self._lib.SCardConnect(
            self._ctx, reader.encode(), _DWORD(SCARD_SHARE_SHARED),
            _DWORD(SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1), ctypes.byref(self._handle),
            ctypes.byref(self._protocol),
        )  # fmt: skip
        if rv != 0:
            self._lib.SCardReleaseContext(self._ctx)
            _check("SCardConnect", rv)

    def transmit(self, apdu: bytes) -> bytes:
        pci = _IoRequest(self._protocol.value, ctypes.sizeof(_IoRequest))
        out = ctypes.create_string_buffer(65538)
        out_len = _DWORD(len(out))
        rv = self._lib.SCardTransmit(
            self._handle, ctypes.byref(pci), apdu, _DWORD(len(apdu)), None, out, ctypes.byref(out_len)
        )
        _check("SCardTransmit", rv)
        return out.raw[: out_len.value]

    def reconnect(self, initialization: int) -> None:
        """SCardReconnect: SCARD_RESET_CARD resets the card, SCARD_LEAVE_CARD does not."""
        _check("SCardReconnect", self._lib.SCardReconnect(
            self._handle, _DWORD(SCARD_SHARE_SHARED), _DWORD(SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1),
            _DWORD(initialization), ctypes.byref(self._protocol)))  # fmt: skip

    def close(self) -> None:
        self._lib.SCardDisconnect(self._handle, _DWORD(SCARD_LEAVE_CARD))
        self._lib.SCardReleaseContext(self._ctx)
