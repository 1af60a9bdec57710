"""USB transport for CCID tokens: the only module in tokenbridge that imports `usb` (pyusb).

Theory of operation
-------------------
`UsbCcidDevice` is synchronous and thin: it finds the token (VID/PID/serial), finds its CCID
interface and class descriptor the way libccid does (reference §1.7), claims the interface and
moves whole CCID messages over the bulk pipes. A bulk-IN read that its timeout cuts mid-message
still returns the packets that had arrived (libusb reports the timeout with bytes transferred,
pyusb returns the count), so reads are assembled into messages by 10 + dwLength
(`protocol.ccid_stream`); found on the real libusb stack (tests/usb_rig/test_libusb_link.py).
Every pyusb/libusb exception is translated here
into a `bridge_server.errors` type with a message an operator can act on (reference §3.2).

`AsyncUsbDevice` is the trio face of it. Each blocking call runs in a worker thread through
`trio.to_thread.run_sync(..., limiter=...)` with `abandon_on_cancel=False` (a USB transfer that
is in flight must finish before we touch the handle again). Reads are issued with a short pyusb
timeout and looped, so a caller's `trio.fail_after` lands within one poll period. The bulk pipes
share one `CapacityLimiter(1)`; the interrupt pipe has its own, because libusb's synchronous API
is safe across endpoints and a parked interrupt read must not add its poll period to every APDU.
"""

from __future__ import annotations

import array
import contextlib
import errno
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog
import trio
import usb.core  # type: ignore[import-untyped]
import usb.util  # type: ignore[import-untyped]

from bridge_server.errors import (
    DeviceBusyError,
    DeviceError,
    DeviceGoneError,
    DevicePermissionError,
    DeviceStallError,
    DeviceTimeoutError,
)
from bridge_server.usb.matching import (
    DeviceInfo,
    DeviceMatch,
    find_ccid_interface,
    refuse_iccd,
    select_device,
)
from protocol.ccid import HEADER_LEN, MAX_DATA_LENGTH, CcidClassDescriptor
from protocol.ccid_stream import BulkInAssembler
from protocol.errors import MalformedCcidMessageError

log = structlog.get_logger(__name__)

# libccid reads every response into 10 + 65546 bytes (reference §1.3); never less than the device says.
MIN_READ_BUFFER = HEADER_LEN + MAX_DATA_LENGTH
MAX_INTERRUPT_READ = 64  # NotifySlotChange/HardwareError are ≤ 4 bytes for one slot (reference §1.5)

PERMISSION_HINT = (
    "install the udev rule systemd/70-tokenbridge.rules and add the service user to the tokenbridge group"
)
BUSY_HINT = (
    "pcscd on this host holds the token: stop and mask pcscd.socket/pcscd.service or exclude the device"
)


def translate_usb_error(exc: BaseException, what: str) -> DeviceError:
    """Map a pyusb exception to our error tree (reference §3.2); `what` names device and action."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, usb.core.USBTimeoutError) or code == errno.ETIMEDOUT:
        return DeviceTimeoutError(f"{what}: timed out")
    if code == errno.ENODEV:
        return DeviceGoneError(f"{what}: device is gone (unplugged or reset)")
    if code == errno.EACCES:
        return DevicePermissionError(f"{what}: permission denied; {PERMISSION_HINT}")
    if code == errno.EBUSY:
        return DeviceBusyError(f"{what}: interface is busy; {BUSY_HINT}")
    if code == errno.EPIPE:
        return DeviceStallError(f"{what}: endpoint stalled")
    return DeviceError(f"{what}: usb error {exc}")


_T = TypeVar("_T")


def _usb_call(what: str, fn: Callable[..., _T], *args: Any) -> _T:
    try:
        return fn(*args)
    except usb.core.USBError as exc:
        raise translate_usb_error(exc, what) from exc


def _read_string(dev: Any, attr: str) -> str:
    # String descriptors need an open handle: without permission they fail; keep going without them.
    try:
        value = getattr(dev, attr)
    except (usb.core.USBError, ValueError, NotImplementedError):
        return ""
    return value or ""


def _read_serial_strict(dev: Any, what: str) -> str:
    if not dev.iSerialNumber:
        return ""
    try:
        # pyusb turns a failed open into "no langid" (ValueError); ask for the langids ourselves
        # so EACCES reaches the operator as a permission problem (USB 2.0 §9.6.7: string 0).
        dev.ctrl_transfer(0x80, 0x06, 0x0300, 0, 4)
    except usb.core.USBError as exc:
        if exc.errno == errno.EPIPE:
            return ""  # no string descriptors at all
        raise translate_usb_error(exc, f"{what}: reading the serial number") from exc
    try:
        return str(usb.util.get_string(dev, dev.iSerialNumber) or "")
    except usb.core.USBError as exc:
        raise translate_usb_error(exc, f"{what}: reading the serial number") from exc
    except (ValueError, NotImplementedError):
        return ""


def _port_path(dev: Any) -> str:
    try:
        ports = dev.port_numbers
    except (usb.core.USBError, NotImplementedError):
        return ""
    if dev.bus is None or not ports:
        return ""
    return f"{dev.bus}-" + ".".join(str(p) for p in ports)


def _device_info(dev: Any, *, serial: str | None = None) -> DeviceInfo:
    return DeviceInfo(
        vid=int(dev.idVendor),
        pid=int(dev.idProduct),
        serial=_read_string(dev, "serial_number") if serial is None else serial,
        bcd_device=int(dev.bcdDevice),
        bus=dev.bus,
        address=dev.address,
        product=_read_string(dev, "product"),
        port_path=_port_path(dev),
    )


def _enumerate(backend: object | None) -> list[Any]:
    try:
        return list(usb.core.find(find_all=True, backend=backend) or [])
    except usb.core.NoBackendError as exc:
        raise DeviceError("no usb backend available: install libusb-1.0 (Debian: libusb-1.0-0)") from exc
    except usb.core.USBError as exc:
        raise translate_usb_error(exc, "enumerating usb devices") from exc


def list_ccid_devices(backend: object | None = None) -> list[DeviceInfo]:
    """Every attached device with a CCID interface, for `status` and `doctor`."""
    found = []
    for dev in _enumerate(backend):
        try:
            if find_ccid_interface(dev) is not None:
                found.append(_device_info(dev))
        except usb.core.USBError:
            log.debug("usb.device_skipped", vid=dev.idVendor, pid=dev.idProduct)
    return found


class UsbCcidDevice:
    """A claimed CCID interface; synchronous, every timeout in milliseconds."""

    def __init__(self, dev: Any, info: DeviceInfo, intf: Any, descriptor: CcidClassDescriptor) -> None:
        self._dev = dev
        self.info = info
        self.descriptor = descriptor
        self._intf_number = int(intf.bInterfaceNumber)
        self._what = f"usb device {info.vid:04x}:{info.pid:04x} serial {info.serial!r}"
        eps = list(intf)
        self._bulk_out = _pick_endpoint(eps, usb.util.ENDPOINT_TYPE_BULK, usb.util.ENDPOINT_OUT)
        self._bulk_in = _pick_endpoint(eps, usb.util.ENDPOINT_TYPE_BULK, usb.util.ENDPOINT_IN)
        self._intr_in = _pick_endpoint(eps, usb.util.ENDPOINT_TYPE_INTR, usb.util.ENDPOINT_IN)
        if self._bulk_out is None or self._bulk_in is None:
            raise DeviceError(f"{self._what}: ccid interface {self._intf_number} lacks bulk endpoints")
        self.has_interrupt = self._intr_in is not None
        size = max(descriptor.max_ccid_message_length, MIN_READ_BUFFER)
        self._buf = array.array("B", bytes(size))
        self._assembler = BulkInAssembler(size)
        self._packet_size = int(self._bulk_in.wMaxPacketSize) or 64
        self._intr_buf = array.array("B", bytes(MAX_INTERRUPT_READ))
        self._closed = False
        self.data_rates: tuple[int, ...] | None = None  # GET_DATA_RATES, read once at open

    @classmethod
    def open(cls, match: DeviceMatch, *, backend: object | None = None) -> UsbCcidDevice:
        candidates = []
        for dev in _enumerate(backend):
            found = find_ccid_interface(dev)
            if found is None:
                continue
            serial = None
            if match.serial is not None and DeviceMatch(match.vid, match.pid).matches(
                _device_info(dev, serial="")
            ):
                # The serial decides; an unreadable one must say why (EACCES) instead of "not found".
                serial = _read_serial_strict(dev, f"usb device {dev.idVendor:04x}:{dev.idProduct:04x}")
            candidates.append((dev, _device_info(dev, serial=serial), found))
        info = select_device(match, [c[1] for c in candidates])
        dev, _, (cfg, intf, raw) = next(c for c in candidates if c[1] is info)
        refuse_iccd(int(intf.bInterfaceProtocol), info)
        try:
            descriptor = CcidClassDescriptor.parse(raw)
        except MalformedCcidMessageError as exc:
            raise DeviceError(f"{info.describe()}: unusable ccid class descriptor: {exc}") from exc
        what = f"opening {info.describe()}"
        _claim(dev, cfg, int(intf.bInterfaceNumber), what)
        device = cls(dev, info, intf, descriptor)
        device.data_rates = device.read_data_rates(1000)
        log.info("device.opened", device=info.describe(), interface=device._intf_number)
        return device

    def write(self, data: bytes, timeout_ms: int) -> None:
        sent = self._transfer("writing", self._bulk_out, data, timeout_ms)
        if sent != len(data):
            raise DeviceError(f"{self._what}: short write ({sent} of {len(data)} bytes)")

    def read(self, timeout_ms: int) -> bytes:
        """The next whole CCID message; DeviceTimeoutError if none is complete within `timeout_ms`.

        A transfer cut by its timeout still brings the packets that had arrived (libusb reports
        the timeout with bytes transferred and pyusb returns the count): they are kept and the
        message completes in a later call, once its 10 + dwLength bytes are in (reference §1.3).
        A zero-length transfer is "nothing yet"."""
        message = self._assembler.next_message()
        if message is None:
            n = self._transfer("reading", self._bulk_in, self._buf, timeout_ms)
            # A count that is no multiple of the packet size ended with a short packet: the
            # device's end of message. A timeout-cut transfer holds whole packets only.
            ended = n == 0 or n % self._packet_size != 0
            self._assembler.receive_data(bytes(self._buf[:n]), transfer_ended=ended)
            message = self._assembler.next_message()
        if message is None:
            raise DeviceTimeoutError(
                f"{self._what}: no whole ccid message within {timeout_ms} ms "
                f"({self._assembler.buffered} bytes of one so far)"
            )
        return message

    def transceive(self, data: bytes, write_timeout_ms: int, read_timeout_ms: int) -> bytes | None:
        """`write(data)` then one `read()`; None if no answer came within `read_timeout_ms`.

        One call, so an async caller pays one worker-thread hop per CCID exchange, not two."""
        self.write(data, write_timeout_ms)
        try:
            return self.read(read_timeout_ms)
        except DeviceTimeoutError:
            return None

    def read_interrupt(self, timeout_ms: int) -> bytes | None:
        if self._intr_in is None:
            raise DeviceError(f"{self._what}: no interrupt endpoint")
        try:
            n = self._transfer("reading interrupt", self._intr_in, self._intr_buf, timeout_ms)
        except DeviceTimeoutError:
            return None
        return bytes(self._intr_buf[:n])

    def _transfer(self, action: str, ep: Any, data: Any, timeout_ms: int) -> int:
        if self._closed:
            raise DeviceGoneError(f"{self._what}: closed")
        try:
            return int(ep.write(data, timeout_ms) if action == "writing" else ep.read(data, timeout_ms))
        except usb.core.USBError as exc:
            err = translate_usb_error(exc, f"{action} {self._what}")
            if isinstance(err, DeviceStallError):
                self._clear_halt(ep)
            raise err from exc

    def _clear_halt(self, ep: Any) -> None:
        try:
            ep.clear_halt()
        except (usb.core.USBError, NotImplementedError):
            log.warning("device.clear_halt_failed", device=self._what, endpoint=ep.bEndpointAddress)

    def read_data_rates(self, timeout_ms: int) -> tuple[int, ...] | None:
        """CCID 1.1 §5.3.3 GET_DATA_RATES, as libccid asks at open (up to 256 rates); None when
        the reader stalls it (most tokens, reference §1.6) or answers no multiple of 4 bytes."""
        try:
            raw = self._dev.ctrl_transfer(0xA1, 0x03, 0, self._intf_number, 256 * 4, timeout_ms)
        except usb.core.USBError as exc:
            if exc.errno == errno.ENODEV:
                raise translate_usb_error(exc, f"GET_DATA_RATES to {self._what}") from exc
            return None
        data = bytes(raw)
        if not data or len(data) % 4:
            return None
        return tuple(int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4))

    def abort_request(self, seq: int, slot: int, timeout_ms: int) -> None:
        """CCID 1.1 §5.3.1 ABORT class request (bmRequestType 0x21, bRequest 0x01, wValue
        bSeq << 8 | bSlot, wIndex the interface); DeviceStallError when the reader does not
        support it, as most tokens (reference §1.6). The PC_to_RDR_Abort follows on bulk-OUT."""
        if self._closed:
            raise DeviceGoneError(f"{self._what}: closed")
        value = (seq & 0xFF) << 8 | (slot & 0xFF)
        _usb_call(
            f"abort request to {self._what}",
            self._dev.ctrl_transfer,
            0x21,
            0x01,
            value,
            self._intf_number,
            None,
            timeout_ms,
        )

    def reset(self) -> None:
        """USB port reset (libusb_reset_device): the card loses power, bytes in flight are lost.

        pyusb releases our interface, resets, and closes the handle; the next transfer opens it
        again and claims the interface again. A device that comes back as another one (its
        descriptors changed) is gone: DeviceGoneError, and the caller opens it afresh."""
        if self._closed:
            raise DeviceGoneError(f"{self._what}: closed")
        try:
            self._dev.reset()
        except usb.core.USBError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                raise DeviceGoneError(f"{self._what}: did not come back from a usb reset") from exc
            raise translate_usb_error(exc, f"resetting {self._what}") from exc
        self._assembler = BulkInAssembler(len(self._buf))
        log.warning("device.usb_reset", device=self._what)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A gone device cannot release; pyusb's dispose ignores this too (reference §3.3).
        with contextlib.suppress(usb.core.USBError, NotImplementedError):
            usb.util.release_interface(self._dev, self._intf_number)
        usb.util.dispose_resources(self._dev)


def _pick_endpoint(eps: Sequence[Any], ep_type: int, direction: int) -> Any | None:
    for ep in eps:
        attrs = int(ep.bmAttributes)
        if (
            usb.util.endpoint_type(attrs) == ep_type
            and usb.util.endpoint_direction(ep.bEndpointAddress) == direction
        ):
            return ep
    return None


def _claim(dev: Any, cfg: Any, intf_number: int, what: str) -> None:
    """Set configuration only when needed, detach a kernel driver from this interface only, claim it."""
    try:
        active = dev.get_active_configuration().bConfigurationValue
    except usb.core.USBError as exc:
        if exc.errno in (errno.EACCES, errno.ENODEV):
            raise translate_usb_error(exc, what) from exc
        active = None  # not configured yet
    if active != cfg.bConfigurationValue:
        # Re-setting the active configuration may reset the device (reference §3.4): only when needed.
        _usb_call(what, dev.set_configuration, cfg.bConfigurationValue)
    try:
        if dev.is_kernel_driver_active(intf_number):
            _usb_call(what, dev.detach_kernel_driver, intf_number)
    except NotImplementedError:
        pass  # no kernel-driver API on this platform/backend (reference §3.4)
    except usb.core.USBError as exc:
        raise translate_usb_error(exc, what) from exc
    _usb_call(what, usb.util.claim_interface, dev, intf_number)


class AsyncUsbDevice:
    """trio adapter over `UsbCcidDevice`; reads wait until data arrives (bound them with fail_after)."""

    def __init__(self, device: UsbCcidDevice, *, poll_ms: int = 250, write_timeout_ms: int = 5000) -> None:
        self._device = device
        self._poll_ms = poll_ms
        self._write_timeout_ms = write_timeout_ms
        self._limiter = trio.CapacityLimiter(1)
        self._intr_limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(
        cls, match: DeviceMatch, *, backend: object | None = None, poll_ms: int = 250
    ) -> AsyncUsbDevice:
        device = await trio.to_thread.run_sync(
            lambda: UsbCcidDevice.open(match, backend=backend), abandon_on_cancel=False
        )
        return cls(device, poll_ms=poll_ms)

    @property
    def info(self) -> DeviceInfo:
        return self._device.info

    @property
    def descriptor(self) -> CcidClassDescriptor:
        return self._device.descriptor

    @property
    def has_interrupt(self) -> bool:
        return self._device.has_interrupt

    @property
    def data_rates(self) -> tuple[int, ...] | None:
        return self._device.data_rates

    async def write(self, data: bytes) -> None:
        await trio.to_thread.run_sync(
            self._device.write, data, self._write_timeout_ms, limiter=self._limiter, abandon_on_cancel=False
        )

    async def transceive(self, data: bytes) -> bytes:
        """Write one CCID message and return the next message from bulk-IN.

        Write and first read share one worker-thread hop (measured: ~80 µs per hop on the
        benchmark machine, docs/performance.md); a slow answer continues as `read()`."""
        started = time.monotonic()
        raw = await trio.to_thread.run_sync(
            self._device.transceive,
            data,
            self._write_timeout_ms,
            self._poll_ms,
            limiter=self._limiter,
            abandon_on_cancel=False,
        )
        if raw is not None:
            return raw
        await self._pace(started)
        return await self.read()

    async def read(self) -> bytes:
        """Next CCID message from bulk-IN; loops short pyusb reads so cancellation lands promptly."""
        while True:
            started = time.monotonic()
            try:
                return await trio.to_thread.run_sync(
                    self._device.read, self._poll_ms, limiter=self._limiter, abandon_on_cancel=False
                )
            except DeviceTimeoutError:
                await self._pace(started)

    async def read_interrupt(self) -> bytes:
        """Next interrupt-IN message (NotifySlotChange / HardwareError)."""
        while True:
            started = time.monotonic()
            raw = await trio.to_thread.run_sync(
                self._device.read_interrupt,
                self._poll_ms,
                limiter=self._intr_limiter,
                abandon_on_cancel=False,
            )
            if raw is not None:
                return raw
            await self._pace(started)

    async def _pace(self, started: float) -> None:
        # A backend that reports "timeout" without waiting must not turn this loop into a busy spin.
        if time.monotonic() - started < self._poll_ms / 2000:
            await trio.sleep(self._poll_ms / 4000)
        else:
            await trio.lowlevel.checkpoint()

    async def abort_request(self, seq: int) -> None:
        """The ABORT class request for slot 0 (see `UsbCcidDevice.abort_request`)."""
        await trio.to_thread.run_sync(
            self._device.abort_request,
            seq,
            0,
            self._write_timeout_ms,
            limiter=self._limiter,
            abandon_on_cancel=False,
        )

    async def usb_reset(self) -> None:
        """Reset the device (see `UsbCcidDevice.reset`); waits for both pipes' reads to end."""
        async with self._limiter, self._intr_limiter:
            await trio.to_thread.run_sync(self._device.reset, abandon_on_cancel=False)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._limiter, self._intr_limiter:
                self._device.close()


# Matching lives in bridge_server.usb.matching (pure); these names stay importable from here.
__all__ = [
    "AsyncUsbDevice",
    "DeviceInfo",
    "DeviceMatch",
    "UsbCcidDevice",
    "find_ccid_interface",
    "list_ccid_devices",
    "refuse_iccd",
    "select_device",
    "translate_usb_error",
]
