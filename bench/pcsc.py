"""A tiny ctypes binding to libpcsclite: just enough PC/SC to time APDUs (pyscard is not needed).

pcsc-lite on Linux: DWORD and LONG are C `unsigned long` / `long`; SCARDCONTEXT and SCARDHANDLE
are `long`-sized handles (pcsclite.h).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from types import TracebackType

SCARD_SCOPE_SYSTEM = 2
SCARD_SHARE_SHARED = 2
SCARD_PROTOCOL_T0 = 1
SCARD_PROTOCOL_T1 = 2
SCARD_LEAVE_CARD = 0
SCARD_RESET_CARD = 1
MAX_RESPONSE = 65538 + 2

_DWORD = ctypes.c_ulong
_LONG = ctypes.c_long


class _IoRequest(ctypes.Structure):
    _fields_ = (("dwProtocol", _DWORD), ("cbPciLength", _DWORD))


class PcscError(RuntimeError):
    def __init__(self, call: str, rv: int) -> None:
        super().__init__(f"{call} failed: 0x{rv & 0xFFFFFFFF:08X}")
        self.rv = rv


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcsclite") or "libpcsclite.so.1"
    return ctypes.CDLL(name)


class Card:
    """One PC/SC connection to the card in `reader` (shared mode, T=1 or T=0)."""

    def __init__(self, reader: str) -> None:
        self._lib = _lib()
        self._ctx = _LONG()
        self._check(
            "SCardEstablishContext",
            self._lib.SCardEstablishContext(_DWORD(SCARD_SCOPE_SYSTEM), None, None, ctypes.byref(self._ctx)),
        )
        self._handle = _LONG()
        protocol = _DWORD()
        self._check(
            "SCardConnect",
            self._lib.SCardConnect(
                self._ctx,
                reader.encode(),
                _DWORD(SCARD_SHARE_SHARED),
                _DWORD(SCARD_PROTOCOL_T0 | SCARD_PROTOCOL_T1),
                ctypes.byref(self._handle),
                ctypes.byref(protocol),
            ),
        )
        self._pci = _IoRequest(protocol.value, ctypes.sizeof(_IoRequest))
        self._buf = (ctypes.c_ubyte * MAX_RESPONSE)()

    def _check(self, call: str, rv: int) -> None:
        if rv != 0:
            raise PcscError(call, rv)

    def transmit(self, apdu: bytes) -> bytes:
        length = _DWORD(MAX_RESPONSE)
        send = (ctypes.c_ubyte * len(apdu)).from_buffer_copy(apdu)
        self._check(
            "SCardTransmit",
            self._lib.SCardTransmit(
                self._handle,
                ctypes.byref(self._pci),
                send,
                _DWORD(len(apdu)),
                None,
                self._buf,
                ctypes.byref(length),
            ),
        )
        return bytes(self._buf[: length.value])

    def close(self, disposition: int = SCARD_LEAVE_CARD) -> None:
        if self._handle.value:
            self._lib.SCardDisconnect(self._handle, _DWORD(disposition))
            self._handle = _LONG()
        if self._ctx.value:
            self._lib.SCardReleaseContext(self._ctx)
            self._ctx = _LONG()

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
