"""Device-layer errors of the token server (USB transport and CCID driver).

Foreign exceptions (pyusb's `USBError`, `NotImplementedError`) are translated into these at the
boundary, in `bridge_server.usb.transport`, with `raise ... from exc`. Every message says which
device and what to do about it, because an ops engineer reads them in `journalctl`.
"""

from __future__ import annotations

from protocol.errors import BridgeError


class DeviceError(BridgeError):
    """The USB token could not be used. Base of every device-layer error."""


class DeviceNotFoundError(DeviceError):
    """No attached USB device matches the configured VID/PID/serial (or the match is ambiguous)."""


class DeviceBusyError(DeviceError):
    """The CCID interface is claimed by another process (usually pcscd on the token host)."""


class DevicePermissionError(DeviceError):
    """The service user may not open the USB device node (udev rule or group missing)."""


class DeviceGoneError(DeviceError):
    """The device disappeared (unplugged, reset, or the handle died: ENODEV)."""


class DeviceTimeoutError(DeviceError):
    """The device did not answer within the deadline (including a capped time extension)."""


class DeviceStallError(DeviceError):
    """An endpoint stalled (EPIPE). The halt was cleared; the exchange in flight is lost."""


class CardError(DeviceError):
    """The card or the CCID slot failed an exchange (slot error, T=1 failure, malformed response).

    `slot_error` is the CCID bError when the reader reported one, else None. The caller fails the
    APDU; it never invents a status word for it.
    """

    def __init__(self, msg: str, slot_error: int | None = None) -> None:
        super().__init__(msg)
        self.slot_error = slot_error

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.slot_error))
