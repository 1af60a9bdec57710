"""ATR parsing: reference §1.12 vectors, rejection of malformed ATRs, build/parse round trip."""

from __future__ import annotations

from functools import reduce

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.atr import MAX_ATR_LENGTH, Atr, Checksum
from protocol.errors import MalformedAtrError

ETOKEN_5110 = bytes.fromhex("3B D5 18 00 81 31 3A 7D 80 73 C8 21 10 30")
ETOKEN_5100 = bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4")
YUBIKEY_5 = bytes.fromhex("3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40")

_NAMES = ("TA", "TB", "TC", "TD")


def build_atr(ts: int, groups: list[dict[str, int]], historical: bytes) -> bytes:
    """A small independent ATR builder: Y nibbles from the groups, TCK when T != 0 appears.

    `groups[i]` holds TA..TC of group i+1 and, under "T", the protocol announced in TD(i+1)
    when a further group follows (the TD byte itself is derived here).
    """
    out = bytearray([ts, 0])
    presence = [sum(1 << n for n, name in enumerate(_NAMES[:3]) if name in g) for g in groups]
    for i in range(len(groups) - 1):
        presence[i] |= 0x8
    out[1] = (presence[0] << 4) | len(historical)
    protocols = []
    for i, group in enumerate(groups):
        out += bytes(group[name] for name in _NAMES[:3] if name in group)
        if i + 1 < len(groups):
            protocols.append(group["T"])
            out.append((presence[i + 1] << 4) | group["T"])
    out += historical
    if any(t != 0 for t in protocols):
        out.append(reduce(lambda a, b: a ^ b, out[1:], 0))
    return bytes(out)


def test_etoken_5110_atr_has_ifsc_58_and_bwi_7():
    atr = Atr.parse(ETOKEN_5110)
    assert (atr.ts, atr.t0) == (0x3B, 0xD5)
    assert atr.ta1 == 0x18
    assert atr.tc1 == 0x00
    assert atr.protocols == (1,)
    assert atr.ifsc == 58
    assert (atr.bwi, atr.cwi) == (7, 13)
    assert atr.historical == bytes.fromhex("80 73 C8 21 10")
    assert atr.tck == 0x30
    assert atr.checksum is Checksum.LRC
    assert atr.specific_mode is False
    assert atr.interface_bytes == (
        {"TA": 0x18, "TC": 0x00, "TD": 0x81},
        {"TD": 0x31},
        {"TA": 0x3A, "TB": 0x7D},
    )


def test_etoken_5100_atr_has_ifsc_254():
    atr = Atr.parse(ETOKEN_5100)
    assert atr.ifsc == 254
    assert atr.raw == ETOKEN_5100


def test_yubikey_5_atr():
    atr = Atr.parse(YUBIKEY_5)
    assert atr.ta1 == 0x13
    assert atr.interface_bytes[0]["TB"] == 0x00
    assert atr.tc1 == 0x00
    assert atr.protocols == (1,)
    assert atr.ifsc == 254
    assert (atr.bwi, atr.cwi) == (1, 5)
    assert atr.historical == bytes.fromhex("80 73 C0 21 C0") + b"WYubiKey"
    assert atr.tck == 0x40


def test_t0_only_atr_has_no_tck_and_t1_defaults():
    atr = Atr.parse(bytes.fromhex("3B 02 14 50"))  # no interface bytes, two historical bytes
    assert atr.protocols == (0,)
    assert atr.tck is None
    assert atr.interface_bytes == ({},)
    assert (atr.ifsc, atr.bwi, atr.cwi, atr.checksum) == (32, 4, 13, Checksum.LRC)
    assert atr.ta1 is None


def test_inverse_convention_ts_is_accepted():
    assert Atr.parse(bytes.fromhex("3F 00")).ts == 0x3F


def test_crc_selected_by_tc3_bit0_and_ifsc_ff_reads_254():
    raw = build_atr(0x3B, [{"T": 1}, {"T": 1}, {"TA": 0xFF, "TC": 0x01}], b"")
    atr = Atr.parse(raw)
    assert atr.checksum is Checksum.CRC
    assert atr.ifsc == 254


def test_ta2_means_specific_mode():
    raw = build_atr(0x3B, [{"TA": 0x11, "T": 1}, {"TA": 0x81}], b"")
    assert Atr.parse(raw).specific_mode is True


def test_ta_after_t0_group_is_not_ifsc():
    # TA3 qualified by TD2 = T=0 is not a T=1 parameter; the T=1 group after it is.
    raw = build_atr(0x3B, [{"T": 0}, {"T": 0}, {"TA": 0x10, "T": 1}, {"TA": 0x80}], b"")
    atr = Atr.parse(raw)
    assert atr.ifsc == 0x80
    assert atr.protocols == (0, 1)


def test_global_t15_is_not_a_protocol_but_requires_tck():
    raw = build_atr(0x3B, [{"T": 1}, {"T": 15}, {"TA": 0x03}], b"")
    atr = Atr.parse(raw)
    assert atr.protocols == (1,)
    assert atr.tck is not None


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (bytes([0x3B, 0x0F]) + bytes(32), "34 bytes"),
        (bytes.fromhex("3C 00"), "0x3C"),
        (bytes.fromhex("3B"), "truncated"),
        (ETOKEN_5100[:-1], "tck missing"),
        (ETOKEN_5100[:4], "truncated"),
        (ETOKEN_5100[:9], "historical"),
        (ETOKEN_5100[:-1] + b"\xf5", "tck 0xf5 is wrong"),
        (ETOKEN_5100 + b"\x00", "trailing"),
        (bytes.fromhex("3B 00 00"), "trailing"),
    ],
)
def test_parse_rejects_malformed_atr(raw, fragment):
    with pytest.raises(MalformedAtrError, match=f"(?i){fragment}"):
        Atr.parse(raw)


def test_every_truncation_of_yubikey_atr_is_rejected():
    for cut in range(len(YUBIKEY_5)):
        with pytest.raises(MalformedAtrError):
            Atr.parse(YUBIKEY_5[:cut])


def test_every_single_byte_corruption_of_t1_atr_is_caught_or_changes_parse():
    # TCK catches any single-byte change after TS; a changed TS fails the TS check.
    for pos in range(len(ETOKEN_5100)):
        damaged = bytearray(ETOKEN_5100)
        damaged[pos] ^= 0x01
        with pytest.raises(MalformedAtrError):
            Atr.parse(bytes(damaged))


_group = st.fixed_dictionaries(
    {},
    optional={"TA": st.integers(0, 255), "TB": st.integers(0, 255), "TC": st.integers(0, 255)},
)


@st.composite
def _atr_parts(draw: st.DrawFn) -> tuple[int, list[dict[str, int]], bytes]:
    groups = draw(st.lists(_group, min_size=1, max_size=4))
    for group in groups[:-1]:
        group["T"] = draw(st.sampled_from([0, 1, 15]))
    historical = draw(st.binary(max_size=15))
    ts = draw(st.sampled_from([0x3B, 0x3F]))
    return ts, groups, historical


@settings(max_examples=300)
@given(_atr_parts())
def test_build_parse_round_trip(parts):
    ts, groups, historical = parts
    raw = build_atr(ts, groups, historical)
    if len(raw) > MAX_ATR_LENGTH:
        with pytest.raises(MalformedAtrError, match="more than"):
            Atr.parse(raw)
        return
    atr = Atr.parse(raw)
    assert atr.raw == raw
    assert atr.ts == ts
    assert atr.historical == historical
    expected_groups = tuple({k: v for k, v in g.items() if k != "T"} for g in groups)
    assert tuple({k: v for k, v in g.items() if k != "TD"} for g in atr.interface_bytes) == expected_groups
    assert [g["TD"] & 0x0F for g in atr.interface_bytes if "TD" in g] == [g["T"] for g in groups[:-1]]
    assert (atr.tck is not None) == any(g["T"] != 0 for g in groups[:-1])
    assert atr.ta1 == groups[0].get("TA")
    assert atr.tc1 == groups[0].get("TC")
