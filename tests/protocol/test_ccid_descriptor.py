"""The 54-byte CCID class functional descriptor (reference §1.7, §1.8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ccid import CcidClassDescriptor, ExchangeLevel, Feature
from protocol.errors import LocalProtocolError, MalformedCcidMessageError

# Reference §1.7, reconstructed descriptors.
SAFENET_5110_FIPS = bytes.fromhex(
    "36 21 10 01 00 02 02 00 00 00 C0 12 00 00 C0 12 00 00 00 67 32 00 00 CE 99 0C 00 00 FE 00 00 00"
    " 00 00 00 00 00 00 00 00 30 02 01 00 0F 01 00 00 00 00 00 00 00 01"
)
YUBIKEY_5 = bytes.fromhex(
    "36 21 00 01 00 07 02 00 00 00 A0 0F 00 00 A0 0F 00 00 00 00 B0 04 00 00 B0 04 00 00 F6 0B 00 00"
    " 00 00 00 00 00 00 00 00 FE 00 04 00 00 0C 00 00 FF FF 00 00 00 01"
)


def test_parses_reference_safenet_5110_fips():
    d = CcidClassDescriptor.parse(SAFENET_5110_FIPS)
    assert d == CcidClassDescriptor(
        bcd_ccid=0x0110,
        max_slot_index=0,
        voltage_support=0x02,
        protocols=0x02,
        default_clock_khz=4800,
        maximum_clock_khz=4800,
        num_clock_supported=0,
        data_rate_bps=12903,
        max_data_rate_bps=825806,
        num_data_rates_supported=0,
        max_ifsd=254,
        synch_protocols=0,
        mechanical=0,
        features=0x00010230,
        max_ccid_message_length=271,
        class_get_response=0,
        class_envelope=0,
        lcd_layout=0,
        pin_support=0,
        max_ccid_busy_slots=1,
        descriptor_type=0x21,
    )
    assert d.exchange_level is ExchangeLevel.TPDU
    assert d.supported_protocols == frozenset({1})
    assert d.supported_voltages_mv == frozenset({3000})
    assert d.max_apdu_data == 261
    assert (
        d.feature_flags == Feature.AUTO_CLOCK | Feature.AUTO_BAUD | Feature.NAD_OTHER_THAN_00 | Feature.TPDU
    )


def test_parses_reference_yubikey_5():
    d = CcidClassDescriptor.parse(YUBIKEY_5)
    assert d.bcd_ccid == 0x0100
    assert d.exchange_level is ExchangeLevel.EXTENDED_APDU
    assert d.supported_protocols == frozenset({1})
    assert d.supported_voltages_mv == frozenset({5000, 3000, 1800})
    assert (d.default_clock_khz, d.maximum_clock_khz) == (4000, 4000)
    assert (d.data_rate_bps, d.max_data_rate_bps) == (307200, 307200)
    assert d.max_ifsd == 3062
    assert d.max_ccid_message_length == 3072
    assert d.max_apdu_data == 3062
    assert (d.class_get_response, d.class_envelope) == (0xFF, 0xFF)
    # dwFeatures 0x000400FE: every automatic bit from 0x02 to 0x80, no AUTO_IFSD.
    assert d.features == 0x000400FE
    assert Feature.AUTO_PPS_PROP in d.feature_flags
    assert Feature.AUTO_IFSD not in d.feature_flags


@pytest.mark.parametrize("raw", [SAFENET_5110_FIPS, YUBIKEY_5], ids=["safenet", "yubikey"])
def test_reference_descriptors_encode_back_to_the_same_bytes(raw: bytes):
    assert CcidClassDescriptor.parse(raw).encode() == raw


def test_default_descriptor_encodes_a_plain_tpdu_reader():
    raw = CcidClassDescriptor().encode()
    assert len(raw) == 54
    assert raw[:10] == bytes.fromhex("36 21 10 01 00 07 03 00 00 00")
    assert raw[28:32] == (254).to_bytes(4, "little")
    assert raw[44:48] == (271).to_bytes(4, "little")
    assert raw[53] == 1


@pytest.mark.parametrize(
    ("bits", "level"),
    [
        (0x00000, ExchangeLevel.CHARACTER),
        (0x10000, ExchangeLevel.TPDU),
        (0x20000, ExchangeLevel.SHORT_APDU),
        (0x40000, ExchangeLevel.EXTENDED_APDU),
    ],
)
def test_exchange_level_comes_from_bits_16_to_18(bits: int, level: ExchangeLevel):
    assert CcidClassDescriptor(features=bits | 0x4FE).exchange_level is level
    assert CcidClassDescriptor(features=bits | 0x100000).exchange_level is level


@pytest.mark.parametrize("bits", [0x30000, 0x50000, 0x60000, 0x70000])
def test_parse_rejects_more_than_one_exchange_level(bits: int):
    raw = bytearray(CcidClassDescriptor().encode())
    raw[40:44] = bits.to_bytes(4, "little")
    with pytest.raises(MalformedCcidMessageError, match=f"0x{bits:08x}"):
        CcidClassDescriptor.parse(bytes(raw))
    with pytest.raises(LocalProtocolError, match=f"0x{bits:08x}"):
        CcidClassDescriptor(features=bits)


def test_feature_values_match_reference_table():
    assert {f.name: f.value for f in Feature} == {
        "AUTO_CONF_ATR": 0x2,
        "AUTO_ACTIVATION": 0x4,
        "AUTO_VOLTAGE": 0x8,
        "AUTO_CLOCK": 0x10,
        "AUTO_BAUD": 0x20,
        "AUTO_PPS_PROP": 0x40,
        "AUTO_PPS_CUR": 0x80,
        "CLOCK_STOP": 0x100,
        "NAD_OTHER_THAN_00": 0x200,
        "AUTO_IFSD": 0x400,
        "ICCD_TOKEN": 0x800,
        "TPDU": 0x10000,
        "SHORT_APDU": 0x20000,
        "EXTENDED_APDU": 0x40000,
        "USB_WAKEUP": 0x100000,
    }


def test_feature_flags_keep_unknown_bits():
    assert int(CcidClassDescriptor(features=0x80000001).feature_flags) == 0x80000001


@pytest.mark.parametrize(
    ("protocols", "expected"),
    [(0, set()), (1, {0}), (2, {1}), (3, {0, 1}), (0x300, set()), (0x20003, {0, 1})],
)
def test_supported_protocols_reads_only_t0_and_t1_bits(protocols: int, expected: set[int]):
    assert CcidClassDescriptor(protocols=protocols).supported_protocols == expected


@pytest.mark.parametrize(
    ("bits", "expected"), [(0, set()), (1, {5000}), (2, {3000}), (4, {1800}), (7, {5000, 3000, 1800})]
)
def test_supported_voltages(bits: int, expected: set[int]):
    assert CcidClassDescriptor(voltage_support=bits).supported_voltages_mv == expected


@pytest.mark.parametrize(("length", "apdu"), [(271, 261), (64, 54), (10, 0), (5, 0), (0, 0)])
def test_max_apdu_data_is_message_length_minus_header(length: int, apdu: int):
    assert CcidClassDescriptor(max_ccid_message_length=length).max_apdu_data == apdu


@pytest.mark.parametrize("size", [0, 1, 53, 55, 256])
def test_parse_rejects_wrong_size(size: int):
    raw = (SAFENET_5110_FIPS * 5)[:size]
    with pytest.raises(MalformedCcidMessageError, match=str(size)):
        CcidClassDescriptor.parse(raw)


@pytest.mark.parametrize("b_length", [0x00, 0x09, 0x35, 0x37, 0xFF])
def test_parse_rejects_wrong_blength(b_length: int):
    raw = bytes([b_length]) + SAFENET_5110_FIPS[1:]
    with pytest.raises(MalformedCcidMessageError, match=f"0x{b_length:02x}"):
        CcidClassDescriptor.parse(raw)


@pytest.mark.parametrize("b_type", [b for b in range(256) if b not in (0x21, 0xFF)])
def test_parse_rejects_wrong_descriptor_type(b_type: int):
    raw = bytes([0x36, b_type]) + SAFENET_5110_FIPS[2:]
    with pytest.raises(MalformedCcidMessageError, match=f"0x{b_type:02x}"):
        CcidClassDescriptor.parse(raw)


def test_parse_accepts_proprietary_descriptor_type_ff():
    # Reference §1.7: some old readers use 0xFF and libccid accepts them.
    raw = bytes([0x36, 0xFF]) + SAFENET_5110_FIPS[2:]
    d = CcidClassDescriptor.parse(raw)
    assert d.descriptor_type == 0xFF
    assert d.encode() == raw


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_slot_index", 256),
        ("bcd_ccid", 0x10000),
        ("lcd_layout", -1),
        ("max_ifsd", 1 << 32),
        ("max_ccid_message_length", -1),
        ("descriptor_type", 0x22),
    ],
)
def test_constructor_rejects_unencodable_fields(field: str, value: int):
    with pytest.raises(LocalProtocolError, match=field.split("_")[0]):
        CcidClassDescriptor(**{field: value})


u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
level_bits = st.sampled_from([0, 0x10000, 0x20000, 0x40000])
descriptors = st.builds(
    CcidClassDescriptor,
    bcd_ccid=u16,
    max_slot_index=u8,
    voltage_support=u8,
    protocols=u32,
    default_clock_khz=u32,
    maximum_clock_khz=u32,
    num_clock_supported=u8,
    data_rate_bps=u32,
    max_data_rate_bps=u32,
    num_data_rates_supported=u8,
    max_ifsd=u32,
    synch_protocols=u32,
    mechanical=u32,
    features=st.tuples(u32, level_bits).map(lambda t: t[0] & ~0x70000 | t[1]),
    max_ccid_message_length=u32,
    class_get_response=u8,
    class_envelope=u8,
    lcd_layout=u16,
    pin_support=u8,
    max_ccid_busy_slots=u8,
    descriptor_type=st.sampled_from([0x21, 0xFF]),
)


@settings(max_examples=300)
@given(descriptors)
def test_descriptor_round_trips(d: CcidClassDescriptor):
    raw = d.encode()
    assert len(raw) == 54
    assert CcidClassDescriptor.parse(raw) == d


@settings(max_examples=300)
@given(st.binary(min_size=52, max_size=52), st.sampled_from([0x21, 0xFF, 0x24]))
def test_parse_of_arbitrary_bytes_round_trips_or_is_malformed(rest: bytes, b_type: int):
    raw = bytes([0x36, b_type]) + rest
    try:
        d = CcidClassDescriptor.parse(raw)
    except MalformedCcidMessageError:
        assert b_type == 0x24 or bin(int.from_bytes(raw[40:44], "little") & 0x70000).count("1") > 1
        return
    assert d.encode() == raw
