"""The USB descriptors of the emulated CCID reader (USB 2.0 §9.6, CCID 1.1 §5).

One full-speed device, one configuration, one CCID interface (class 0x0B) with bulk-OUT 0x01,
bulk-IN 0x82 (64-byte packets) and interrupt-IN 0x83 (NotifySlotChange). The reader exchanges
at extended-APDU level with every automatic feature set, so a host driver sends whole APDUs and
never negotiates voltage, clock, baud rate, PPS or IFSD: what the server's virtual reader
already offers over the tunnel (docs/client.md "USB/IP" says why this device and not a copy of
the token's own).

VID:PID: libccid drives only the VID:PID pairs listed in its Info.plist (ccid_usb.c,
OpenUSBByName); 0E0F:0004 is listed there as "VMware Virtual USB CCID", the one entry for a
hypervisor's emulated reader, and it has no quirk in libccid. Windows' usbccid binds by
interface class, not VID:PID.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocol.ccid import CcidClassDescriptor, Feature

VID: Final = 0x0E0F
PID: Final = 0x0004
BCD_DEVICE: Final = 0x0100
MANUFACTURER: Final = "tokenbridge"
PACKET_SIZE: Final = 64  # wMaxPacketSize of both bulk endpoints (full speed)
INTERRUPT_PACKET_SIZE: Final = 8
EP_BULK_OUT: Final = 0x01
EP_BULK_IN: Final = 0x82
EP_INTR_IN: Final = 0x83
CONFIGURATION_VALUE: Final = 1

DT_DEVICE: Final = 0x01
DT_CONFIG: Final = 0x02
DT_STRING: Final = 0x03
DT_INTERFACE: Final = 0x04
DT_ENDPOINT: Final = 0x05
DT_CCID: Final = 0x21
CLASS_CCID: Final = 0x0B
STRING_MANUFACTURER: Final = 1
STRING_PRODUCT: Final = 2
STRING_SERIAL: Final = 3
LANGID_EN_US: Final = 0x0409

# libccid's largest command buffer is 4+3+65536+3 bytes (defs.h CMD_BUF_SIZE): with a message
# length of 10 more, no host driver has to chain an extended APDU (wLevelParameter) and no
# answer needs bChainParameter.
MAX_MESSAGE_LENGTH: Final = 10 + 65546
FEATURES: Final = (
    Feature.AUTO_CONF_ATR
    | Feature.AUTO_ACTIVATION
    | Feature.AUTO_VOLTAGE
    | Feature.AUTO_CLOCK
    | Feature.AUTO_BAUD
    | Feature.AUTO_PPS_PROP
    | Feature.AUTO_PPS_CUR
    | Feature.AUTO_IFSD
    | Feature.EXTENDED_APDU
)
CCID_DESCRIPTOR: Final = CcidClassDescriptor(
    bcd_ccid=0x0110,
    voltage_support=0x07,
    protocols=0x03,
    max_ifsd=254,
    features=int(FEATURES),
    max_ccid_message_length=MAX_MESSAGE_LENGTH,
    class_get_response=0xFF,
    class_envelope=0xFF,
    max_ccid_busy_slots=1,
)


@dataclass(frozen=True)
class ReaderDescriptors:
    product: str
    serial: str

    def device(self) -> bytes:
        return struct.pack(
            "<BBHBBBBHHHBBBB",
            18,
            DT_DEVICE,
            0x0200,  # bcdUSB
            0,
            0,
            0,  # class at interface level
            64,  # bMaxPacketSize0
            VID,
            PID,
            BCD_DEVICE,
            STRING_MANUFACTURER,
            STRING_PRODUCT,
            STRING_SERIAL,
            1,
        )

    def configuration(self) -> bytes:
        interface = struct.pack("<BBBBBBBBB", 9, DT_INTERFACE, 0, 0, 3, CLASS_CCID, 0, 0, 0)
        endpoints = b"".join(
            struct.pack("<BBBBHB", 7, DT_ENDPOINT, address, kind, size, interval)
            for address, kind, size, interval in (
                (EP_BULK_OUT, 0x02, PACKET_SIZE, 0),
                (EP_BULK_IN, 0x02, PACKET_SIZE, 0),
                (EP_INTR_IN, 0x03, INTERRUPT_PACKET_SIZE, 16),
            )
        )
        body = interface + CCID_DESCRIPTOR.encode() + endpoints
        # bmAttributes 0x80: bus powered; bMaxPower 50 = 100 mA.
        head = struct.pack("<BBHBBBBB", 9, DT_CONFIG, 9 + len(body), 1, CONFIGURATION_VALUE, 0, 0x80, 50)
        return head + body

    def string(self, index: int) -> bytes | None:
        if index == 0:
            return struct.pack("<BBH", 4, DT_STRING, LANGID_EN_US)
        text = {
            STRING_MANUFACTURER: MANUFACTURER,
            STRING_PRODUCT: self.product,
            STRING_SERIAL: self.serial,
        }.get(index)
        if text is None:
            return None
        raw = text.encode("utf-16-le")[:252]
        return bytes([2 + len(raw), DT_STRING]) + raw
