"""One simulated USB token: what a pyusb handle on it can do, and its fault hooks.

Theory of operation. Each `SimulatedToken` owns one lock with two `threading.Condition`s
(bulk-IN and interrupt-IN, so a write wakes only the bulk reader). A bulk-OUT
write hands the whole CCID message to `CcidDevice.handle` and queues the reply frames on
bulk-IN; a bulk-IN read pops one frame (one CCID message per transfer, as libccid expects,
reference §1.3), waiting on the condition up to the caller's timeout, so the server's
worker thread blocks as it would on real hardware and a test thread can unplug the token
meanwhile. A frame held back by a delay is announced by a time-extension frame at once
and then every `TIME_EXTENSION_INTERVAL_S` (CCID 1.1 §6.2.7). Unplug bumps the token's
generation: every handle opened before it fails with ENODEV forever, as a libusb handle
on a vanished device does (reference §3.3); replug re-enumerates at a new address.
Errors are raised exactly as pyusb's libusb1 backend raises them (reference §3.2).
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import usb.core  # type: ignore[import-untyped]

from protocol.ccid import NotifySlotChange

from . import usb_descriptors as ud
from .ccid_device import Card, CcidDevice
from .faults import Evidence, Faults

if TYPE_CHECKING:
    from .profiles import Profile

TIME_EXTENSION_INTERVAL_S: Final = 0.05

# libusb error codes and the messages pyusb's libusb1 backend puts in USBError.
NO_DEVICE: Final = (-4, errno.ENODEV, "No such device (it may have been disconnected)")
NOT_FOUND: Final = (-5, errno.ENOENT, "Entity not found")
BUSY: Final = (-6, errno.EBUSY, "Resource busy")
PIPE: Final = (-9, errno.EPIPE, "Pipe error")
OVERFLOW: Final = (-8, errno.EOVERFLOW, "Overflow")
INVALID: Final = (-2, errno.EINVAL, "Invalid parameter")


_ADDRESSES = itertools.count(2)


def usb_error(code: tuple[int, int, str]) -> usb.core.USBError:
    return usb.core.USBError(code[2], code[0], code[1])


def _timeout_error() -> usb.core.USBTimeoutError:
    return usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)


def fill(buff: array[int], payload: bytes) -> int:
    """Copy into pyusb's buffer in place (the libusb1 contract) and return the count."""
    n = len(payload)
    buff[0:n] = array("B", payload)  # same-length slice: the buffer keeps its size
    return n


@dataclass
class _Frame:
    data: bytes
    ready_at: float
    time_extension: bytes = b""
    next_te_at: float = 0.0


@dataclass(frozen=True)
class DeviceRef:
    """What `enumerate_devices` yields: one token as it was enumerated."""

    token: SimulatedToken
    generation: int
    address: int
    serial: str


@dataclass(frozen=True)
class Handle:
    ref: DeviceRef
    handle_id: int


class SimulatedToken:
    """One USB device: CCID device side + card + faults + evidence."""

    def __init__(
        self, profile: Profile, *, card: Card | None = None, serial: str | None = None, port: int = 1
    ) -> None:
        if card is None:
            from .piv import PivCard  # deferred: piv pulls in `cryptography`

            card = PivCard()
        self.profile = profile
        self.card = card
        self.faults = Faults()
        self.evidence = Evidence()
        self.current_epoch: int | None = None
        self.serial = serial if serial is not None else profile.serial
        self.port = port
        self.configuration = ud.build_configuration(profile)
        # One lock, two conditions: a bulk-OUT write wakes only the bulk-IN reader, not the
        # interrupt reader parked in its poll (an extra thread wake-up per CCID exchange).
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._intr_cond = threading.Condition(lock)
        self._plugged = True
        self._generation = 1
        self._address = next(_ADDRESSES)
        self._handles = itertools.count(1)
        self._claims: dict[int, int] = {}
        self._bulk_in: deque[_Frame] = deque()
        self._intr_in: deque[bytes] = deque([self._inserted()])
        self.device = CcidDevice(
            profile, card, faults=self.faults, evidence=self.evidence, epoch=lambda: self.current_epoch
        )

    def __repr__(self) -> str:
        return f"<SimulatedToken {self.profile.name} serial={self.serial!r} plugged={self._plugged}>"

    @staticmethod
    def _inserted() -> bytes:
        # CCID 1.1 §6.3.1: `50 03` = slot 0 present and changed.
        return NotifySlotChange(present=(True,), changed=(True,)).encode()

    # -- fault hooks -----------------------------------------------------------------------

    @property
    def plugged(self) -> bool:
        return self._plugged

    def unplug(self) -> None:
        """Pull the token: every transfer (also those waiting) fails with ENODEV."""
        with self._cond:
            self._plugged = False
            self.device.power_loss()
            self._bulk_in.clear()
            self._intr_in.clear()
            self._claims.clear()
            self._notify_all()

    def replug(self, *, serial: str | None = None) -> None:
        """Plug it back in (a new address; `serial` makes a different device appear)."""
        with self._cond:
            if self._plugged:
                self.device.power_loss()
            if serial is not None:
                self.serial = serial
            self._plugged = True
            self._generation += 1
            self._address = next(_ADDRESSES)
            self._claims.clear()
            self._bulk_in.clear()
            self._intr_in = deque([self._inserted()])
            self._notify_all()

    # -- used by the backend ---------------------------------------------------------------

    def ref(self) -> DeviceRef:
        with self._cond:
            return DeviceRef(self, self._generation, self._address, self.serial)

    def open(self, ref: DeviceRef) -> Handle:
        with self._cond:
            self._check_alive(ref)
            return Handle(ref, next(self._handles))

    def _check_alive(self, ref: DeviceRef) -> None:
        if not self._plugged or ref.generation != self._generation:
            raise usb_error(NO_DEVICE)

    def check_alive(self, handle: Handle) -> None:
        with self._cond:
            self._check_alive(handle.ref)

    def claim(self, handle: Handle, interface: int) -> None:
        with self._cond:
            self._check_alive(handle.ref)
            if interface >= len(self.configuration.interfaces):
                raise usb_error(NOT_FOUND)
            holder = self._claims.get(interface)
            if holder is not None and holder != handle.handle_id:
                raise usb_error(BUSY)
            self._claims[interface] = handle.handle_id

    def release(self, handle: Handle, interface: int | None = None) -> None:
        with self._cond:
            for intf, holder in list(self._claims.items()):
                if holder == handle.handle_id and interface in (None, intf):
                    del self._claims[intf]
            if interface is not None:
                self._check_alive(handle.ref)

    def write_bulk(self, handle: Handle, data: bytes) -> int:
        with self._cond:
            self._check_alive(handle.ref)
            if self.faults.take_stall():
                raise usb_error(PIPE)
            reply = self.device.handle(data)
            now = time.monotonic()
            for frame in reply.frames[:-1]:
                self._bulk_in.append(_Frame(frame, now))
            if reply.frames:
                te = reply.time_extension
                self._bulk_in.append(_Frame(reply.frames[-1], now + reply.delay_s, te, now))
            self._cond.notify_all()
            return len(data)

    def read_bulk(self, handle: Handle, buff: array[int], timeout_ms: int) -> int:
        deadline = None if timeout_ms <= 0 else time.monotonic() + timeout_ms / 1000
        with self._cond:
            while True:
                self._check_alive(handle.ref)
                now = time.monotonic()
                wake = deadline
                if self._bulk_in:
                    head = self._bulk_in[0]
                    if head.ready_at <= now:
                        self._bulk_in.popleft()
                        return self._deliver(buff, head.data)
                    if head.time_extension and head.next_te_at <= now:
                        head.next_te_at = now + TIME_EXTENSION_INTERVAL_S
                        return self._deliver(buff, head.time_extension)
                    due = min(head.ready_at, head.next_te_at) if head.time_extension else head.ready_at
                    wake = due if wake is None else min(wake, due)
                self._wait_until(now, deadline, wake)

    def read_interrupt(self, handle: Handle, endpoint: int, buff: array[int], timeout_ms: int) -> int:
        deadline = None if timeout_ms <= 0 else time.monotonic() + timeout_ms / 1000
        with self._cond:
            while True:
                self._check_alive(handle.ref)
                if endpoint == ud.EP_INTR_IN and self._intr_in:
                    return self._deliver(buff, self._intr_in.popleft())
                self._wait_until(time.monotonic(), deadline, deadline, self._intr_cond)

    def _wait_until(
        self, now: float, deadline: float | None, wake: float | None, cond: threading.Condition | None = None
    ) -> None:
        """One wait on the condition; raises the libusb timeout once `deadline` passed."""
        if deadline is not None and now >= deadline:
            raise _timeout_error()
        (cond or self._cond).wait(None if wake is None else max(0.0, wake - now))

    def _deliver(self, buff: array[int], data: bytes) -> int:
        if len(data) > len(buff):
            # libusb: the device sent more than the host asked for; the message is lost.
            raise usb_error(OVERFLOW)
        return fill(buff, data)

    def reset(self, handle: Handle) -> None:
        """USB port reset: the card loses power, pending frames are dropped."""
        with self._cond:
            self._check_alive(handle.ref)
            self.device.power_loss()
            self._bulk_in.clear()
            self._notify_all()

    def _notify_all(self) -> None:
        self._cond.notify_all()
        self._intr_cond.notify_all()

    def strings(self) -> dict[int, str]:
        return {
            ud.STRING_MANUFACTURER: self.profile.manufacturer,
            ud.STRING_PRODUCT: self.profile.product,
            ud.STRING_SERIAL: self.serial,
        }
