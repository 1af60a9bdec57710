"""USB descriptors of a simulated token, in the shape pyusb's backends hand out.

pyusb copies named attributes off whatever a backend returns (`core._set_attr`, reference
§3.1), so each descriptor here carries exactly the libusb1 field names, the extra fields
pyusb reads (bus/address/port/speed, bRefresh/bSynchAddress, extra_descriptors), and an
`encode()` giving the wire bytes for GET_DESCRIPTOR (USB 2.0 §9.6).

Layout of a token (reference §1.7 and §5): interfaces 0..n-1 are placeholder HID
interfaces (a composite YubiKey or Fusion exposes OTP/FIDO before CCID) and interface n =
`profile.interface_number` is the CCID interface (class 0x0B) whose extra bytes are the
54-byte CCID class descriptor, with bulk-OUT, bulk-IN and, unless the profile lacks it,
interrupt-IN endpoints.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .profiles import Profile

# USB 2.0 §9.4 Table 9-5 descriptor types.
DT_DEVICE: Final = 0x01
DT_CONFIG: Final = 0x02
DT_STRING: Final = 0x03
DT_INTERFACE: Final = 0x04
DT_ENDPOINT: Final = 0x05

CLASS_HID: Final = 0x03
CLASS_CCID: Final = 0x0B  # USB CCID 1.1 §5.1 bInterfaceClass

EP_BULK_OUT: Final = 0x01
EP_BULK_IN: Final = 0x82
EP_INTR_IN: Final = 0x83
EP_HID_BASE: Final = 0x84  # placeholder HID interface i uses 0x84 + i

# USB 2.0 §9.6.6 bmAttributes transfer types.
XFER_BULK: Final = 0x02
XFER_INTERRUPT: Final = 0x03

LANGID_EN_US: Final = 0x0409
STRING_MANUFACTURER: Final = 1
STRING_PRODUCT: Final = 2
STRING_SERIAL: Final = 3
SPEED_FULL: Final = 2  # libusb_speed LIBUSB_SPEED_FULL

# HID 1.11 §6.2.1: HID descriptor, one report descriptor of 34 bytes (content unused).
_HID_CLASS_DESCRIPTOR: Final = bytes.fromhex("092111010001222200")


@dataclass
class EndpointDescriptor:
    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int = 0
    bLength: int = 7
    bDescriptorType: int = DT_ENDPOINT
    bRefresh: int = 0
    bSynchAddress: int = 0
    extra_descriptors: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        head = struct.pack(
            "<BBBBHB",
            7,
            DT_ENDPOINT,
            self.bEndpointAddress,
            self.bmAttributes,
            self.wMaxPacketSize,
            self.bInterval,
        )
        return head + bytes(self.extra_descriptors)


@dataclass
class InterfaceDescriptor:
    bInterfaceNumber: int
    bInterfaceClass: int
    endpoints: list[EndpointDescriptor]
    extra_descriptors: list[int] = field(default_factory=list)
    bAlternateSetting: int = 0
    bInterfaceSubClass: int = 0
    bInterfaceProtocol: int = 0
    iInterface: int = 0
    bLength: int = 9
    bDescriptorType: int = DT_INTERFACE

    @property
    def bNumEndpoints(self) -> int:
        return len(self.endpoints)

    def encode(self) -> bytes:
        head = bytes(
            [
                9,
                DT_INTERFACE,
                self.bInterfaceNumber,
                self.bAlternateSetting,
                self.bNumEndpoints,
                self.bInterfaceClass,
                self.bInterfaceSubClass,
                self.bInterfaceProtocol,
                self.iInterface,
            ]
        )
        return head + bytes(self.extra_descriptors) + b"".join(e.encode() for e in self.endpoints)


@dataclass
class ConfigurationDescriptor:
    interfaces: list[InterfaceDescriptor]
    bConfigurationValue: int = 1
    iConfiguration: int = 0
    bmAttributes: int = 0x80  # bus powered
    bMaxPower: int = 50  # 100 mA in 2 mA units
    bLength: int = 9
    bDescriptorType: int = DT_CONFIG
    extra_descriptors: list[int] = field(default_factory=list)

    @property
    def bNumInterfaces(self) -> int:
        return len(self.interfaces)

    @property
    def wTotalLength(self) -> int:
        return len(self.encode())

    def encode(self) -> bytes:
        body = b"".join(i.encode() for i in self.interfaces)
        head = struct.pack(
            "<BBHBBBBB",
            9,
            DT_CONFIG,
            9 + len(body),
            self.bNumInterfaces,
            self.bConfigurationValue,
            self.iConfiguration,
            self.bmAttributes,
            self.bMaxPower,
        )
        return head + body


@dataclass
class DeviceDescriptor:
    idVendor: int
    idProduct: int
    bcdDevice: int
    iSerialNumber: int
    bus: int | None
    address: int | None
    port_number: int | None
    port_numbers: tuple[int, ...] | None
    speed: int | None = SPEED_FULL
    bcdUSB: int = 0x0200
    bDeviceClass: int = 0  # class per interface
    bDeviceSubClass: int = 0
    bDeviceProtocol: int = 0
    bMaxPacketSize0: int = 64
    iManufacturer: int = STRING_MANUFACTURER
    iProduct: int = STRING_PRODUCT
    bNumConfigurations: int = 1
    bLength: int = 18
    bDescriptorType: int = DT_DEVICE

    def encode(self) -> bytes:
        return struct.pack(
            "<BBHBBBBHHHBBBB",
            18,
            DT_DEVICE,
            self.bcdUSB,
            self.bDeviceClass,
            self.bDeviceSubClass,
            self.bDeviceProtocol,
            self.bMaxPacketSize0,
            self.idVendor,
            self.idProduct,
            self.bcdDevice,
            self.iManufacturer,
            self.iProduct,
            self.iSerialNumber,
            self.bNumConfigurations,
        )


def build_configuration(profile: Profile) -> ConfigurationDescriptor:
    """The one configuration of a token built from `profile` (see the module docstring)."""
    interfaces = [
        InterfaceDescriptor(
            bInterfaceNumber=n,
            bInterfaceClass=CLASS_HID,
            endpoints=[EndpointDescriptor(EP_HID_BASE + n, XFER_INTERRUPT, 64, bInterval=10)],
            extra_descriptors=list(_HID_CLASS_DESCRIPTOR),
        )
        for n in range(profile.interface_number)
    ]
    endpoints = [
        EndpointDescriptor(EP_BULK_OUT, XFER_BULK, 64),
        EndpointDescriptor(EP_BULK_IN, XFER_BULK, 64),
    ]
    if profile.has_interrupt:
        # CCID 1.1 §5.2.3: interrupt-IN carries NotifySlotChange, 8 bytes is plenty.
        endpoints.append(EndpointDescriptor(EP_INTR_IN, XFER_INTERRUPT, 8, bInterval=24))
    interfaces.append(
        InterfaceDescriptor(
            bInterfaceNumber=profile.interface_number,
            bInterfaceClass=CLASS_CCID,
            endpoints=endpoints,
            extra_descriptors=list(profile.descriptor.encode()),
        )
    )
    return ConfigurationDescriptor(interfaces)


def string_descriptor(text: str) -> bytes:
    """USB 2.0 §9.6.7: bLength, bDescriptorType 3, UTF-16LE text (at most 126 characters)."""
    payload = text.encode("utf-16-le")[:252]
    return bytes([2 + len(payload), DT_STRING]) + payload


def langid_descriptor() -> bytes:
    """String descriptor 0: the supported LANGIDs (US English only)."""
    return bytes([4, DT_STRING]) + struct.pack("<H", LANGID_EN_US)
