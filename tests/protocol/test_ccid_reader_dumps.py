"""Every descriptor dump in libccid's readers/ folder, rebuilt, encoded, parsed and cross-checked.

Each dump is libccid's `parse` tool output: the descriptor's numeric fields plus explanatory
lines that libccid derives itself (exchange level, T=0/T=1, voltages, feature texts). We rebuild
the 54 bytes from the numbers only, then check that what *our* parser derives agrees with what
*libccid's text* says — the level comes from the text line, never recomputed from dwFeatures here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest

from protocol.ccid import CcidClassDescriptor, ExchangeLevel, Feature

DUMPS = Path(__file__).parent.parent / "vectors" / "ccid-readers"
DUMP_FILES = sorted(DUMPS.glob("*.txt"))
EXPECTED_DUMP_COUNT = 692

# Files in the folder that are not descriptor dumps, with the reason. Each is still checked
# (it must really contain no descriptor), so nothing is skipped silently.
EXPECTED_EXCLUSIONS = {
    "supported_readers.txt": "libccid's list of supported VID:PID pairs, not a descriptor dump",
}

LEVEL_TEXT = {
    "Character": ExchangeLevel.CHARACTER,
    "TPDU": ExchangeLevel.TPDU,
    "Short APDU": ExchangeLevel.SHORT_APDU,
    "Short and Extended APDU": ExchangeLevel.EXTENDED_APDU,
}
# libccid parse.c texts for the dwFeatures bits (reference §1.8). Prefix match, because one dump
# wraps "...Fi, Di params" onto a second line and an old one says "parameters".
FEATURE_TEXT = {
    "Automatic parameter configuration based on ATR data": Feature.AUTO_CONF_ATR,
    "Automatic activation of ICC on inserting": Feature.AUTO_ACTIVATION,
    "Automatic ICC voltage selection": Feature.AUTO_VOLTAGE,
    "Automatic ICC clock frequency change according to parameters": Feature.AUTO_CLOCK,
    "Automatic baud rate change according to frequency and Fi, Di": Feature.AUTO_BAUD,
    "Automatic parameters negotiation made by the CCID": Feature.AUTO_PPS_PROP,
    "Automatic PPS made by the CCID": Feature.AUTO_PPS_CUR,
    "CCID can set ICC in clock stop mode": Feature.CLOCK_STOP,
    "NAD value other than 00 accepted (T=1)": Feature.NAD_OTHER_THAN_00,
    "Automatic IFSD exchange as first exchange (T=1)": Feature.AUTO_IFSD,
    "ICCD token": Feature.ICCD_TOKEN,
    "Unknown (ICCD?)": Feature.ICCD_TOKEN,  # older parse.c wording for bit 0x800
}
# Feature bits parse.c prints a text line for (it has none for USB wake-up).
PRINTED_FEATURES = [f for f in Feature if f & 0xFFFF]
# The only dwFeatures detail line that is a wrapped continuation, not a feature of its own.
FEATURE_CONTINUATIONS = {"params"}
VOLTAGE_TEXT = {"5.0V": 5000, "3.0V": 3000, "1.8V": 1800}
PROTOCOL_TEXT = {"T=0": 0, "T=1": 1}

LEVEL_RE = re.compile(
    r"^(?:(0[0-4])\.{4} )?(Character|TPDU|Short APDU|Short and Extended APDU) level exchange$"
)
FEATURE_PREFIX_RE = re.compile(r"^(\.\.\.\.([0-9A-F]{2})|\.\.([0-9A-F]{2})\.\.) (.*)$")


@dataclass
class DumpedDescriptor:
    """One "CCID Class Descriptor" block: raw field texts and libccid's detail lines per field."""

    fields: dict[str, str] = field(default_factory=dict)
    details: dict[str, list[str]] = field(default_factory=dict)


def split_descriptors(text: str) -> list[DumpedDescriptor]:
    blocks: list[DumpedDescriptor] = []
    current: DumpedDescriptor | None = None
    last_field = ""
    for line in text.replace("\r", "").splitlines():
        if line == " CCID Class Descriptor":
            current = DumpedDescriptor()
            blocks.append(current)
        elif line.startswith(" ") and not line.startswith("  "):
            current = None  # a USB device/interface field: the block is over
        elif current is not None and (m := re.match(r"^  (\w+): (.*)$", line)):
            last_field = m.group(1)
            current.fields[last_field] = m.group(2).strip()
            current.details[last_field] = []
        elif current is not None and line.startswith("   "):
            current.details[last_field].append(line.strip())
    return blocks


def _hex(text: str) -> int:
    return int(text, 16)


def _lead_int(text: str) -> int:
    return int(text.split()[0])


def _mhz_to_khz(text: str) -> int:
    mhz, unit = text.split()
    assert unit == "MHz"
    return int(Decimal(mhz) * 1000)


def _bcd(text: str) -> int:
    # parse.c prints bcdCCID as "%X.%02X" (major byte, minor byte).
    major, minor = text.split(".")
    return _hex(major) << 8 | _hex(minor)


def _protocols(text: str) -> int:
    # parse.c prints dwProtocols as "0x%04X 0x%04X" (high word, low word).
    high, low = text.split()
    return _hex(high) << 16 | _hex(low)


FIELD_PARSERS = {
    "bDescriptorType": ("descriptor_type", _hex),
    "bcdCCID": ("bcd_ccid", _bcd),
    "bMaxSlotIndex": ("max_slot_index", _hex),
    "bVoltageSupport": ("voltage_support", _hex),
    "dwProtocols": ("protocols", _protocols),
    "dwDefaultClock": ("default_clock_khz", _mhz_to_khz),
    "dwMaximumClock": ("maximum_clock_khz", _mhz_to_khz),
    "bNumClockSupported": ("num_clock_supported", _lead_int),
    "dwDataRate": ("data_rate_bps", _lead_int),
    "dwMaxDataRate": ("max_data_rate_bps", _lead_int),
    "bNumDataRatesSupported": ("num_data_rates_supported", _lead_int),
    "dwMaxIFSD": ("max_ifsd", _lead_int),
    "dwSynchProtocols": ("synch_protocols", _hex),
    "dwMechanical": ("mechanical", _hex),
    "dwFeatures": ("features", _hex),
    "dwMaxCCIDMessageLength": ("max_ccid_message_length", _lead_int),
    "bClassGetResponse": ("class_get_response", _hex),
    "bClassEnvelope": ("class_envelope", _hex),
    "wLcdLayout": ("lcd_layout", _hex),
    "bPINSupport": ("pin_support", _hex),
    "bMaxCCIDBusySlots": ("max_ccid_busy_slots", _lead_int),
}


def rebuild(dumped: DumpedDescriptor) -> CcidClassDescriptor:
    assert _hex(dumped.fields["bLength"]) == 0x36
    kwargs = {attr: parse(dumped.fields[name]) for name, (attr, parse) in FIELD_PARSERS.items()}
    return CcidClassDescriptor(**kwargs)


def stated_level(dumped: DumpedDescriptor) -> ExchangeLevel:
    levels = []
    for line in dumped.details["dwFeatures"]:
        if m := LEVEL_RE.match(line):
            if m.group(1) is not None:  # "01...." = bits 16..23 of dwFeatures, as printed
                assert LEVEL_TEXT[m.group(2)] is _level_for_prefix(m.group(1))
            levels.append(LEVEL_TEXT[m.group(2)])
    assert len(levels) == 1, f"expected one level line, got {dumped.details['dwFeatures']}"
    return levels[0]


def _level_for_prefix(prefix: str) -> ExchangeLevel:
    return {
        "00": ExchangeLevel.CHARACTER,
        "01": ExchangeLevel.TPDU,
        "02": ExchangeLevel.SHORT_APDU,
        "04": ExchangeLevel.EXTENDED_APDU,
    }[prefix]


def stated_features(dumped: DumpedDescriptor) -> set[Feature]:
    found: set[Feature] = set()
    for line in dumped.details["dwFeatures"]:
        if LEVEL_RE.match(line) or line in FEATURE_CONTINUATIONS:
            continue
        prefix_value, text = None, line
        if m := FEATURE_PREFIX_RE.match(line):
            prefix_value = _hex(m.group(2)) if m.group(2) else _hex(m.group(3)) << 8
            text = m.group(4)
        matches = [flag for phrase, flag in FEATURE_TEXT.items() if text.startswith(phrase)]
        assert len(matches) == 1, f"unrecognised dwFeatures line {line!r}"
        if prefix_value is not None:  # the printed mask must be our Feature's value
            assert matches[0] == prefix_value, line
        found.add(matches[0])
    return found


def stated_set(dumped: DumpedDescriptor, name: str, table: dict[str, int]) -> frozenset[int]:
    return frozenset(table[line] for line in dumped.details[name] if line in table)


def test_every_dump_was_copied():
    assert len(DUMP_FILES) == EXPECTED_DUMP_COUNT
    assert set(EXPECTED_EXCLUSIONS) <= {p.name for p in DUMP_FILES}


@pytest.mark.parametrize("path", DUMP_FILES, ids=[p.name for p in DUMP_FILES])
def test_reader_dump_descriptor_round_trips_and_derives_what_libccid_states(path: Path):
    text = path.read_text(encoding="utf-8", errors="strict")
    blocks = split_descriptors(text)
    if path.name in EXPECTED_EXCLUSIONS:
        assert blocks == []
        assert "CCID Class Descriptor" not in text
        return
    assert len(blocks) == text.count("CCID Class Descriptor") >= 1
    for dumped in blocks:
        check_descriptor(dumped)


def check_descriptor(dumped: DumpedDescriptor) -> None:
    rebuilt = rebuild(dumped)
    raw = rebuilt.encode()
    assert len(raw) == 54
    parsed = CcidClassDescriptor.parse(raw)
    assert parsed == rebuilt

    # Wire offsets from reference §1.7, checked independently of the codec's own layout.
    max_len = _lead_int(dumped.fields["dwMaxCCIDMessageLength"])
    ifsd = _lead_int(dumped.fields["dwMaxIFSD"])
    assert raw[0] == 0x36
    assert raw[1] == _hex(dumped.fields["bDescriptorType"])
    assert struct.unpack_from("<I", raw, 6)[0] == _protocols(dumped.fields["dwProtocols"])
    assert struct.unpack_from("<I", raw, 28)[0] == ifsd
    assert struct.unpack_from("<I", raw, 40)[0] == _hex(dumped.fields["dwFeatures"])
    assert struct.unpack_from("<I", raw, 44)[0] == max_len
    assert raw[53] == _lead_int(dumped.fields["bMaxCCIDBusySlots"])

    # What libccid's text says, against what our parser derives.
    assert parsed.exchange_level is stated_level(dumped)
    assert parsed.max_ccid_message_length == max_len
    assert parsed.max_apdu_data == max(0, max_len - 10)
    assert parsed.max_ifsd == ifsd
    assert parsed.supported_protocols == stated_set(dumped, "dwProtocols", PROTOCOL_TEXT)
    assert parsed.supported_voltages_mv == stated_set(dumped, "bVoltageSupport", VOLTAGE_TEXT)
    assert stated_features(dumped) == {f for f in PRINTED_FEATURES if f in parsed.feature_flags}


REFERENCE_SAFENET_5110_FIPS = bytes.fromhex(
    "36 21 10 01 00 02 02 00 00 00 C0 12 00 00 C0 12 00 00 00 67 32 00 00 CE 99 0C 00 00 FE 00 00 00"
    " 00 00 00 00 00 00 00 00 30 02 01 00 0F 01 00 00 00 00 00 00 00 01"
)


def test_safenet_5110_fips_dump_rebuilds_to_the_reference_bytes():
    # Reference §1.7 reconstructed these bytes from the same dump by hand.
    (dumped,) = split_descriptors((DUMPS / "SafeNet_eToken_5110+_FIPS.txt").read_text())
    assert rebuild(dumped).encode() == REFERENCE_SAFENET_5110_FIPS


def test_dump_splitter_reads_multi_interface_dumps():
    blocks = split_descriptors((DUMPS / "Access_IS_ATR220_0x0184.txt").read_text())
    assert [b.fields["dwMaxIFSD"] for b in blocks] == ["2048", "1024", "1024", "1024", "1024"]


def test_level_line_without_mask_prefix_is_read():
    # Verisign_secure_token.txt comes from an old parse.c that printed no "01...." prefix.
    (dumped,) = split_descriptors((DUMPS / "Verisign_secure_token.txt").read_text())
    assert stated_level(dumped) is ExchangeLevel.TPDU
    assert rebuild(dumped).descriptor_type == 0xFF
