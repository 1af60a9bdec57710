"""The server-held PIN's pure part (bridge_server/guard/server_pin.py): decide and fill."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_server.guard.server_pin import (
    DEFAULT_PIV_REFERENCES,
    PLACEHOLDER,
    ServerPin,
    Verdict,
    decide,
    fill,
    is_placeholder,
    unpadded,
    wipe,
)
from protocol.apdu import CommandApdu

PIV = DEFAULT_PIV_REFERENCES
# What OpenSC's PIV driver sends for `--pin 000000` (SP 800-73-4 Part 2 §3.2.1: 8 bytes, FF-padded).
PLACEHOLDER_VERIFY = bytes.fromhex("0020008008" + "303030303030" + "FFFF")


def verdict(raw: bytes, *, listed: bool = True, refs: frozenset[int] = PIV, pin_length: int = 6) -> Verdict:
    return decide(raw, listed=listed, references=refs, pin_length=pin_length).verdict


# -- decide ------------------------------------------------------------------------------------


def test_a_listed_identitys_padded_placeholder_verify_is_substituted() -> None:
    assert verdict(PLACEHOLDER_VERIFY) is Verdict.SUBSTITUTE


def test_a_listed_identitys_bare_placeholder_verify_is_substituted() -> None:
    assert verdict(bytes.fromhex("0020008006") + PLACEHOLDER) is Verdict.SUBSTITUTE


def test_an_extended_length_placeholder_verify_is_substituted() -> None:
    assert verdict(bytes.fromhex("00200080000008") + PLACEHOLDER + b"\xff\xff") is Verdict.SUBSTITUTE


def test_non_pin_commands_and_short_commands_pass_for_everybody() -> None:
    select = bytes.fromhex("00A4040009A00000030800001000")
    for listed in (True, False):
        assert verdict(select, listed=listed) is Verdict.FORWARD
        assert verdict(b"\x00\x20\x00", listed=listed) is Verdict.FORWARD
        assert verdict(b"", listed=listed) is Verdict.FORWARD


def test_the_status_query_passes_for_everybody() -> None:
    for raw in (bytes.fromhex("00200080"), bytes.fromhex("0020008000")):  # case 1 and case 2 (Le)
        assert verdict(raw, listed=True) is Verdict.FORWARD
        assert verdict(raw, listed=False) is Verdict.FORWARD


def test_an_unlisted_identitys_own_pin_passes() -> None:
    own = bytes.fromhex("0020008008") + b"123456\xff\xff"
    assert verdict(own, listed=False) is Verdict.FORWARD


def test_an_unlisted_identitys_placeholder_is_refused_before_it_can_spend_a_retry() -> None:
    decision = decide(PLACEHOLDER_VERIFY, listed=False, references=PIV, pin_length=6)
    assert decision.verdict is Verdict.REFUSE
    assert "not in server_pin.for" in decision.detail


def test_an_unlisted_identitys_placeholder_in_another_command_is_not_judged_here() -> None:
    change = bytes.fromhex("0024008010") + b"000000\xff\xff" + b"654321\xff\xff"
    assert verdict(change, listed=False) is Verdict.FORWARD
    for ins in ("21", "24", "2C"):  # data that is exactly the placeholder, but not a VERIFY (20)
        raw = bytes.fromhex(f"00{ins}008008") + b"000000\xff\xff"
        assert verdict(raw, listed=False) is Verdict.FORWARD


def test_a_listed_identitys_real_looking_pin_is_refused() -> None:
    own = bytes.fromhex("0020008008") + b"123456\xff\xff"
    decision = decide(own, listed=True, references=PIV, pin_length=6)
    assert decision.verdict is Verdict.REFUSE
    assert "placeholder" in decision.detail


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (bytes.fromhex("0024008010") + b"000000\xff\xff654321\xff\xff", "instruction 24"),  # CHANGE REF DATA
        (bytes.fromhex("002C008010") + b"12345678" + b"654321\xff\xff", "instruction 2C"),  # RESET RETRY
        (bytes.fromhex("0021008008") + b"000000\xff\xff", "instruction 21"),  # VERIFY, BER-TLV data
        (bytes.fromhex("0020008108") + b"000000\xff\xff", "reference 81"),  # the PUK
        (bytes.fromhex("0020000008") + b"000000\xff\xff", "reference 00"),  # global PIN, not configured
        (bytes.fromhex("1020008008") + b"000000\xff\xff", "CLA 10"),  # a chain link
        (bytes.fromhex("0C20008008") + b"000000\xff\xff", "CLA 0C"),  # secure messaging
        (bytes.fromhex("0420008008") + b"000000\xff\xff", "CLA 04"),  # secure messaging, proprietary SM
        (bytes.fromhex("8020008008") + b"000000\xff\xff", "CLA 80"),  # proprietary class
        (bytes.fromhex("6020008008") + b"000000\xff\xff", "CLA 60"),  # further interindustry, SM bit
        (bytes.fromhex("0020018008") + b"000000\xff\xff", "P1 01"),
        (bytes.fromhex("0020008009") + b"000000\xff\xff", "malformed"),  # Lc says 9, 8 follow
    ],
)
def test_a_listed_identitys_other_pin_commands_are_refused(raw: bytes, why: str) -> None:
    decision = decide(raw, listed=True, references=PIV, pin_length=6)
    assert decision.verdict is Verdict.REFUSE
    assert why.split()[-1] in decision.detail or why == "malformed"


def test_further_interindustry_class_without_secure_messaging_is_substituted() -> None:
    # ISO 7816-4 §5.4.1: 0x40-0x7F carry the channel in b4-b1 and SM in b6; 0x41 is channel 5, plain.
    assert verdict(bytes.fromhex("4120008008") + b"000000\xff\xff") is Verdict.SUBSTITUTE


def test_a_logical_channel_in_the_first_classes_is_substituted() -> None:
    assert verdict(bytes.fromhex("0320008008") + b"000000\xff\xff") is Verdict.SUBSTITUTE


def test_the_configured_references_decide_which_p2_is_substituted() -> None:
    raw = bytes.fromhex("0020000108") + b"000000\xff\xff"
    assert verdict(raw, refs=frozenset({0x01})) is Verdict.SUBSTITUTE
    assert verdict(raw, refs=frozenset({0x80})) is Verdict.REFUSE


def test_a_pin_longer_than_the_padded_field_is_refused_and_one_that_fits_is_not() -> None:
    assert verdict(PLACEHOLDER_VERIFY, pin_length=9) is Verdict.REFUSE
    assert verdict(PLACEHOLDER_VERIFY, pin_length=8) is Verdict.SUBSTITUTE
    bare = bytes.fromhex("0020008006") + PLACEHOLDER
    assert verdict(bare, pin_length=12) is Verdict.SUBSTITUTE  # no padding: the PIN goes bare


def test_placeholder_recognition_strips_only_trailing_padding() -> None:
    assert is_placeholder(b"000000\xff\xff")
    assert is_placeholder(b"000000")
    assert not is_placeholder(b"\xff000000")
    assert not is_placeholder(b"0000000")
    assert not is_placeholder(b"00000")
    assert unpadded(b"12\xff3\xff\xff") == b"12\xff3"


# -- fill --------------------------------------------------------------------------------------


def test_fill_pads_the_pin_as_the_placeholder_was_padded() -> None:
    out = fill(PLACEHOLDER_VERIFY, bytearray(b"918273"))
    assert bytes(out) == bytes.fromhex("0020008008") + b"918273\xff\xff"
    assert isinstance(out, bytearray)


def test_fill_sends_an_eight_digit_pin_without_padding() -> None:
    assert bytes(fill(PLACEHOLDER_VERIFY, b"12345678")) == bytes.fromhex("0020008008") + b"12345678"


def test_fill_sends_a_bare_pin_when_the_placeholder_came_bare() -> None:
    raw = bytes.fromhex("0020000106") + PLACEHOLDER
    assert bytes(fill(raw, b"1234")) == bytes.fromhex("0020000104") + b"1234"
    assert bytes(fill(raw, b"123456789")) == bytes.fromhex("0020000109") + b"123456789"


def test_fill_keeps_the_extended_length_form_and_le() -> None:
    raw = bytes.fromhex("00200080000008") + b"000000\xff\xff" + bytes.fromhex("0100")
    assert bytes(fill(raw, b"4321")) == bytes.fromhex(
        "00200080000008"
    ) + b"4321\xff\xff\xff\xff" + bytes.fromhex("0100")


def test_fill_keeps_a_short_le_and_the_class_byte() -> None:
    raw = bytes.fromhex("0320008008") + b"000000\xff\xff" + b"\x00"
    assert bytes(fill(raw, b"4321")) == bytes.fromhex("0320008008") + b"4321\xff\xff\xff\xff" + b"\x00"


pins = st.lists(st.integers(min_value=0x21, max_value=0x7E), min_size=4, max_size=8).map(bytes)


@given(
    pin=pins,
    extended=st.booleans(),
    pad_to=st.integers(min_value=8, max_value=16),
    cla=st.sampled_from([0, 1, 2, 3]),
)
def test_filled_apdus_parse_as_the_same_command_with_the_pin_in_place(
    pin: bytes, extended: bool, pad_to: int, cla: int
) -> None:
    data = PLACEHOLDER + b"\xff" * (pad_to - len(PLACEHOLDER))
    raw = CommandApdu(cla, 0x20, 0x00, 0x80, data=data, extended=extended).encode()
    assert verdict(raw, pin_length=len(pin)) is Verdict.SUBSTITUTE
    out = CommandApdu.parse(bytes(fill(raw, pin)))
    assert (out.cla, out.ins, out.p1, out.p2, out.extended) == (cla, 0x20, 0x00, 0x80, extended)
    assert out.data == pin + b"\xff" * (pad_to - len(pin))


@given(raw=st.binary(max_size=40), listed=st.booleans())
def test_decide_never_raises_and_substitutes_only_placeholder_verifies(raw: bytes, listed: bool) -> None:
    result = verdict(raw, listed=listed)
    if result is Verdict.SUBSTITUTE:
        apdu = CommandApdu.parse(raw)
        assert listed and apdu.ins == 0x20 and apdu.p2 == 0x80 and is_placeholder(apdu.data)


# -- the container -----------------------------------------------------------------------------


def test_a_server_pin_never_prints_nor_pickles_and_wipes_to_zeros() -> None:
    pin = ServerPin(bytearray(b"918273"))
    assert "918273" not in repr(pin) and "918273" not in str(pin) and "918273" not in f"{pin}"
    with pytest.raises(TypeError):
        pickle.dumps(pin)
    assert len(pin) == 6
    pin.wipe()
    assert pin.value == bytearray(6)


def test_wipe_overwrites_a_buffer_and_ignores_none() -> None:
    buf = bytearray(b"secret")
    wipe(buf)
    assert buf == bytearray(6)
    wipe(None)


def test_fill_keeps_the_largest_les_which_encode_as_zero() -> None:
    extended = bytes.fromhex("00200080000006") + PLACEHOLDER + bytes.fromhex("0000")  # Ne 65536
    assert bytes(fill(extended, b"4321")) == bytes.fromhex("00200080000004") + b"4321" + bytes.fromhex("0000")
    short = bytes.fromhex("0020008006") + PLACEHOLDER + b"\x00"  # Ne 256
    assert bytes(fill(short, b"4321")) == bytes.fromhex("0020008004") + b"4321\x00"
