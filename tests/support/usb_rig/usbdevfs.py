"""Linux usbdevfs ioctl numbers and struct layouts (x86-64), as libusb's Linux backend uses them.

From linux/usbdevice_fs.h; the numbers are computed with the kernel's _IOC encoding so a
reader can check each one against the header.
"""

from __future__ import annotations

import struct
from typing import Final

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("U") << 8) | nr


URB_SIZE: Final = 56  # struct usbdevfs_urb without iso descriptors
URB_FORMAT: Final = (
    "<BBxxiIxxxxQiiiiiIQ"  # type endpoint status flags buffer len actual start n err signr ctx
)
URB_BUFFER_OFFSET: Final = 16
URB_STATUS_OFFSET: Final = 4
URB_ACTUAL_OFFSET: Final = 28
assert struct.calcsize(URB_FORMAT) == URB_SIZE

SETINTERFACE: Final = _ioc(_IOC_READ, 4, 8)
SETCONFIGURATION: Final = _ioc(_IOC_READ, 5, 4)
GETDRIVER: Final = _ioc(_IOC_WRITE, 8, 260)
SUBMITURB: Final = _ioc(_IOC_READ, 10, URB_SIZE)
DISCARDURB: Final = _ioc(_IOC_NONE, 11, 0)
REAPURB: Final = _ioc(_IOC_WRITE, 12, 8)
REAPURBNDELAY: Final = _ioc(_IOC_WRITE, 13, 8)
CLAIMINTERFACE: Final = _ioc(_IOC_READ, 15, 4)
RELEASEINTERFACE: Final = _ioc(_IOC_READ, 16, 4)
IOCTL: Final = _ioc(_IOC_READ | _IOC_WRITE, 18, 16)
RESET: Final = _ioc(_IOC_NONE, 20, 0)
CLEAR_HALT: Final = _ioc(_IOC_READ, 21, 4)
GET_CAPABILITIES: Final = _ioc(_IOC_READ, 26, 4)
DISCONNECT_CLAIM: Final = _ioc(_IOC_READ, 27, 264)
GET_SPEED: Final = _ioc(_IOC_NONE, 31, 0)

URB_TYPE_INTERRUPT: Final = 1
URB_TYPE_CONTROL: Final = 2
URB_TYPE_BULK: Final = 3

# USBDEVFS_CAP_NO_PACKET_SIZE_LIM: libusb submits one URB per transfer (no 16 KiB split).
CAPABILITIES: Final = 0x04
SPEED_FULL: Final = 2  # enum usb_device_speed USB_SPEED_FULL
