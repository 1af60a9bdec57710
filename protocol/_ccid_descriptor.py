"""The 54-byte CCID class functional descriptor (CCID 1.1 §5.1, reference §1.7/§1.8).

Re-exported by `protocol.ccid`; import it from there. All multi-byte fields are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import Enum, IntFlag
from typing import Final

from protocol.errors import LocalProtocolError, MalformedCcidMessageError

DESCRIPTOR_LENGTH: Final = 0x36  # bLength, 54 bytes
# bDescriptorType: 0x21 per the spec; some old readers use 0xFF and libccid accepts it (§1.7).
_DESCRIPTOR_TYPES: Final = frozenset({0x21, 0xFF})
_EXCHANGE_MASK: Final = 0x00070000  # CCID_CLASS_EXCHANGE_MASK (reference §1.8)

# Wire order after bLength: (dataclass field, struct code). Offsets in reference §1.7.
_LAYOUT: Final = (
    ("descriptor_type", "B"),
    ("bcd_ccid", "H"),
    ("max_slot_index", "B"),
    ("voltage_support", "B"),
    ("protocols", "I"),
    ("default_clock_khz", "I"),
    ("maximum_clock_khz", "I"),
    ("num_clock_supported", "B"),
    ("data_rate_bps", "I"),
    ("max_data_rate_bps", "I"),
    ("num_data_rates_supported", "B"),
    ("max_ifsd", "I"),
    ("synch_protocols", "I"),
    ("mechanical", "I"),
    ("features", "I"),
    ("max_ccid_message_length", "I"),
    ("class_get_response", "B"),
    ("class_envelope", "B"),
    ("lcd_layout", "H"),
    ("pin_support", "B"),
    ("max_ccid_busy_slots", "B"),
)
_STRUCT: Final = struct.Struct("<B" + "".join(code for _, code in _LAYOUT))
_MAX_FOR_CODE: Final = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF}
# bVoltageSupport bits (§1.7): bit0 5.0 V, bit1 3.0 V, bit2 1.8 V.
_VOLTAGES_MV: Final = ((0x01, 5000), (0x02, 3000), (0x04, 1800))
_HEADER_LEN: Final = 10  # CCID message header; duplicated from ccid.py to avoid an import cycle


class ExchangeLevel(Enum):
    """Exchange level announced by dwFeatures & 0x70000 (reference §1.8, §1.10.2)."""

    CHARACTER = "character"
    TPDU = "tpdu"
    SHORT_APDU = "short_apdu"
    EXTENDED_APDU = "extended_apdu"


class Feature(IntFlag):
    """dwFeatures bits (reference §1.8)."""

    AUTO_CONF_ATR = 0x2
    AUTO_ACTIVATION = 0x4
    AUTO_VOLTAGE = 0x8
    AUTO_CLOCK = 0x10
    AUTO_BAUD = 0x20
    AUTO_PPS_PROP = 0x40
    AUTO_PPS_CUR = 0x80
    CLOCK_STOP = 0x100
    NAD_OTHER_THAN_00 = 0x200
    AUTO_IFSD = 0x400
    ICCD_TOKEN = 0x800
    TPDU = 0x10000
    SHORT_APDU = 0x20000
    EXTENDED_APDU = 0x40000
    USB_WAKEUP = 0x100000


_LEVELS: Final = {
    0: ExchangeLevel.CHARACTER,
    Feature.TPDU: ExchangeLevel.TPDU,
    Feature.SHORT_APDU: ExchangeLevel.SHORT_APDU,
    Feature.EXTENDED_APDU: ExchangeLevel.EXTENDED_APDU,
}


def _problem(values: dict[str, int]) -> str | None:
    """What makes these field values unencodable or meaningless, or None."""
    for name, code in _LAYOUT:
        if not 0 <= values[name] <= _MAX_FOR_CODE[code]:
            return f"ccid descriptor {name} {values[name]} does not fit its {code} field"
    if values["descriptor_type"] not in _DESCRIPTOR_TYPES:
        return f"ccid descriptor bDescriptorType 0x{values['descriptor_type']:02x} is not 0x21 or 0xff"
    # libccid's CmdXfrBlock has no case for two level bits at once, so such a reader is unusable.
    if values["features"] & _EXCHANGE_MASK not in _LEVELS:
        return f"ccid dwFeatures 0x{values['features']:08x} announces more than one exchange level"
    return None


@dataclass(frozen=True, slots=True)
class CcidClassDescriptor:
    """The CCID class descriptor; field names follow the spec, units are in the names."""

    bcd_ccid: int = 0x0110
    max_slot_index: int = 0
    voltage_support: int = 7
    protocols: int = 3
    default_clock_khz: int = 4000
    maximum_clock_khz: int = 4000
    num_clock_supported: int = 0
    data_rate_bps: int = 10752
    max_data_rate_bps: int = 10752
    num_data_rates_supported: int = 0
    max_ifsd: int = 254
    synch_protocols: int = 0
    mechanical: int = 0
    features: int = 0
    max_ccid_message_length: int = 271
    class_get_response: int = 0
    class_envelope: int = 0
    lcd_layout: int = 0
    pin_support: int = 0
    max_ccid_busy_slots: int = 1
    descriptor_type: int = 0x21

    def __post_init__(self) -> None:
        problem = _problem({f.name: getattr(self, f.name) for f in fields(self)})
        if problem is not None:
            raise LocalProtocolError(problem)

    @classmethod
    def parse(cls, raw: bytes) -> CcidClassDescriptor:
        """Parse the 54 descriptor bytes; MalformedCcidMessageError if they are not one."""
        if len(raw) != DESCRIPTOR_LENGTH:
            raise MalformedCcidMessageError(f"ccid class descriptor must be 54 bytes, got {len(raw)}")
        if raw[0] != DESCRIPTOR_LENGTH:
            raise MalformedCcidMessageError(f"ccid class descriptor bLength 0x{raw[0]:02x} is not 0x36")
        values = dict(zip((name for name, _ in _LAYOUT), _STRUCT.unpack(raw)[1:], strict=True))
        problem = _problem(values)
        if problem is not None:
            raise MalformedCcidMessageError(problem)
        return cls(**values)

    def encode(self) -> bytes:
        return _STRUCT.pack(DESCRIPTOR_LENGTH, *(getattr(self, name) for name, _ in _LAYOUT))

    @property
    def exchange_level(self) -> ExchangeLevel:
        return _LEVELS[self.features & _EXCHANGE_MASK]

    @property
    def feature_flags(self) -> Feature:
        return Feature(self.features)

    @property
    def supported_protocols(self) -> frozenset[int]:
        # dwProtocols bit0 = T=0, bit1 = T=1; higher bits are RFU and ignored.
        return frozenset(t for t in (0, 1) if self.protocols >> t & 1)

    @property
    def supported_voltages_mv(self) -> frozenset[int]:
        return frozenset(mv for bit, mv in _VOLTAGES_MV if self.voltage_support & bit)

    @property
    def max_apdu_data(self) -> int:
        # libccid caps an XfrBlock payload at dwMaxCCIDMessageLength - 10 (reference §1.7).
        return max(0, self.max_ccid_message_length - _HEADER_LEN)
