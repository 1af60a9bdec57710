from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.apdu import (
    ApduClass,
    CommandApdu,
    ResponseApdu,
    classify,
    describe_sw,
    is_chained,
    redact,
    retries_left,
)
from protocol.errors import LocalProtocolError, MalformedApduError

# ISO 7816-4 §5.1 encodings, written out by hand.
VECTORS = [
    # case 1
    ("00 20 00 80", CommandApdu(0x00, 0x20, 0x00, 0x80)),
    # case 2 short, Le 00 = 256
    ("00 C0 00 00 00", CommandApdu(0x00, 0xC0, 0x00, 0x00, ne=256)),
    ("00 CB 3F FF 08", CommandApdu(0x00, 0xCB, 0x3F, 0xFF, ne=8)),
    # case 3 short: VERIFY with an FF-padded PIN
    (
        "00 20 00 80 08 31 32 33 34 35 36 FF FF",
        CommandApdu(0x00, 0x20, 0x00, 0x80, data=b"123456\xff\xff"),
    ),
    # case 4 short: PIV SELECT with truncated AID, Le 00 = 256 (protocol-reference §4.3)
    (
        "00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00",
        CommandApdu(0x00, 0xA4, 0x04, 0x00, data=bytes.fromhex("A00000030800001000"), ne=256),
    ),
    # case 2 extended, Le 0000 = 65536
    ("00 B0 00 00 00 00 00", CommandApdu(0x00, 0xB0, 0, 0, ne=65536, extended=True)),
    ("00 B0 00 00 00 01 00", CommandApdu(0x00, 0xB0, 0, 0, ne=256, extended=True)),
    # case 3 extended
    ("00 DB 3F FF 00 00 02 AA BB", CommandApdu(0x00, 0xDB, 0x3F, 0xFF, data=b"\xaa\xbb", extended=True)),
    # case 4 extended
    (
        "00 87 07 9A 00 00 01 CC 00 00",
        CommandApdu(0x00, 0x87, 0x07, 0x9A, data=b"\xcc", ne=65536, extended=True),
    ),
]


@pytest.mark.parametrize(("hexstr", "expected"), VECTORS)
def test_parse_matches_iso_vectors(hexstr: str, expected: CommandApdu) -> None:
    assert CommandApdu.parse(bytes.fromhex(hexstr)) == expected


@pytest.mark.parametrize(("hexstr", "expected"), VECTORS)
def test_encode_matches_iso_vectors(hexstr: str, expected: CommandApdu) -> None:
    assert expected.encode() == bytes.fromhex(hexstr)


@pytest.mark.parametrize(
    ("hexstr", "case"),
    [("00 20 00 80", 1), ("00 C0 00 00 10", 2), ("00 20 00 80 01 AA", 3), ("00 A4 04 00 01 AA 00", 4)],
)
def test_case_property_reports_iso_case(hexstr: str, case: int) -> None:
    assert CommandApdu.parse(bytes.fromhex(hexstr)).case == case


def test_long_data_is_encoded_extended_even_when_not_requested() -> None:
    apdu = CommandApdu(0x00, 0x87, 0x07, 0x9A, data=bytes(300), ne=256)
    assert apdu.extended
    raw = apdu.encode()
    assert raw[4:7] == b"\x00\x01\x2c"
    assert raw[-2:] == b"\x01\x00"


@pytest.mark.parametrize(
    "hexstr",
    [
        "",
        "00",
        "00 A4 04",
        "00 A4 04 00 05 AA",  # lc says 5, one byte present
        "00 A4 04 00 02 AA BB CC DD",  # two bytes too many
        "00 A4 04 00 00 00",  # 00 marker but too short for extended
        "00 A4 04 00 00 00 00 AA",  # extended lc 0 with trailing bytes
        "00 A4 04 00 00 00 03 AA BB",  # extended lc 3, two bytes present
        "00 A4 04 00 00 00 01 AA BB",  # extended lc 1 with a one-byte tail
    ],
)
def test_parse_rejects_malformed(hexstr: str) -> None:
    with pytest.raises(MalformedApduError):
        CommandApdu.parse(bytes.fromhex(hexstr))


def test_constructor_rejects_out_of_range_values() -> None:
    with pytest.raises(LocalProtocolError, match="300"):
        CommandApdu(0x00, 300, 0, 0)
    with pytest.raises(LocalProtocolError, match="65537"):
        CommandApdu(0x00, 0xB0, 0, 0, ne=65537)
    with pytest.raises(LocalProtocolError):
        CommandApdu(0x00, 0xB0, 0, 0, data=bytes(65536))


apdus = st.builds(
    CommandApdu,
    cla=st.integers(0, 255),
    ins=st.integers(0, 255),
    p1=st.integers(0, 255),
    p2=st.integers(0, 255),
    data=st.one_of(st.binary(max_size=300), st.binary(min_size=65530, max_size=65535)),
    ne=st.one_of(st.none(), st.integers(1, 65536)),
    extended=st.booleans(),
)


@settings(max_examples=300)
@given(apdus)
def test_parse_encode_round_trip(apdu: CommandApdu) -> None:
    assert CommandApdu.parse(apdu.encode()) == apdu


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_parse_either_rejects_or_reencodes_identically(raw: bytes) -> None:
    try:
        apdu = CommandApdu.parse(raw)
    except MalformedApduError:
        return
    assert apdu.encode() == raw


@pytest.mark.parametrize(
    ("ins", "p1", "p2", "expected"),
    [
        (0x20, 0x00, 0x80, ApduClass.PIN),  # VERIFY
        (0x21, 0x00, 0x80, ApduClass.PIN),
        (0x24, 0x00, 0x80, ApduClass.PIN),  # CHANGE REFERENCE DATA
        (0x25, 0x00, 0x80, ApduClass.PIN),
        (0x2C, 0x00, 0x80, ApduClass.PIN),  # RESET RETRY COUNTER
        (0x2D, 0x00, 0x80, ApduClass.PIN),
        (0x2A, 0x9E, 0x9A, ApduClass.PRIVATE_KEY),  # PSO compute digital signature
        (0x2A, 0x80, 0x86, ApduClass.PRIVATE_KEY),  # PSO decipher
        (0x2A, 0x90, 0xA0, ApduClass.OTHER),  # PSO hash: no private key
        (0x88, 0x00, 0x00, ApduClass.PRIVATE_KEY),  # INTERNAL AUTHENTICATE
        (0x87, 0x07, 0x9A, ApduClass.PRIVATE_KEY),  # GENERAL AUTHENTICATE
        (0x47, 0x00, 0x9A, ApduClass.MANAGEMENT),  # GENERATE ASYMMETRIC KEY PAIR
        (0xDA, 0x00, 0x00, ApduClass.MANAGEMENT),  # PUT DATA
        (0xDB, 0x3F, 0xFF, ApduClass.MANAGEMENT),
        (0xE4, 0x00, 0x00, ApduClass.MANAGEMENT),  # DELETE FILE
        (0xA4, 0x04, 0x00, ApduClass.OTHER),  # SELECT
        (0xCB, 0x3F, 0xFF, ApduClass.OTHER),  # GET DATA
        (0xC0, 0x00, 0x00, ApduClass.OTHER),  # GET RESPONSE
    ],
)
def test_classify(ins: int, p1: int, p2: int, expected: ApduClass) -> None:
    assert classify(CommandApdu(0x00, ins, p1, p2)) is expected


def test_classify_ignores_chaining_class_byte() -> None:
    assert classify(CommandApdu(0x10, 0x20, 0x00, 0x80, data=b"1234")) is ApduClass.PIN


CANARY_PIN = b"739164"


@pytest.mark.parametrize(
    "raw",
    [
        bytes.fromhex("00 20 00 80 08") + CANARY_PIN + b"\xff\xff",
        bytes.fromhex("00 24 00 80 10") + CANARY_PIN + b"\xff\xff" + CANARY_PIN + b"\xff\xff",
        bytes.fromhex("00 2C 00 80 10") + b"12345678" + CANARY_PIN + b"\xff\xff",
        bytes.fromhex("10 20 00 80 06") + CANARY_PIN,  # chained chunk
        bytes.fromhex("00 20 00 80 09") + CANARY_PIN,  # malformed: lc too large
        bytes.fromhex("00 20 00 80") + CANARY_PIN,  # malformed, no lc
        bytes.fromhex("80 21 00 80 06") + CANARY_PIN,  # proprietary class
    ],
)
def test_redact_never_shows_pin_data(raw: bytes) -> None:
    text = redact(raw)
    for rendering in (CANARY_PIN.hex(), CANARY_PIN.hex(" ")):
        assert rendering not in text.lower()
    assert CANARY_PIN.decode() not in text
    assert "redacted" in text


def test_redact_renders_verify_header_and_length() -> None:
    assert redact(bytes.fromhex("00 20 00 80 08") + CANARY_PIN + b"\xff\xff") == (
        "00 20 00 80 Lc=08 <8 bytes redacted>"
    )


def test_redact_shows_the_data_of_reading_commands_truncated() -> None:
    text = redact(bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00"))
    assert text == "00 A4 04 00 Lc=09 A0 00 00 03 08 00 00 10 00 Le=256"
    assert (
        redact(bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 05 00")) == "00 CB 3F FF Lc=05 5C 03 5F C1 05 Le=256"
    )
    assert redact(bytes.fromhex("00 B1 00 00 04 54 02 01 00 00")).startswith("00 B1 00 00 Lc=04 54 02 01 00")
    long = redact(bytes.fromhex("00 CB 3F FF 20") + bytes(range(32)))
    assert long.endswith("0F ...(+16)")


def test_is_chained_reads_b5_in_every_class_byte() -> None:
    # ISO 7816-4 §5.4.1: first interindustry (with SM 0C and channel 03 bits), further, proprietary.
    assert [c for c in (0x00, 0x0C, 0x03, 0x40, 0x6F, 0x80) if is_chained(c)] == []
    assert all(is_chained(c) for c in (0x10, 0x1F, 0x50, 0x7F, 0x90, 0xFF))


CANARY_KEY = bytes.fromhex("C0FFEE5EC2E7A11CE0")


@pytest.mark.parametrize(
    "raw",
    [
        # ENVELOPE (ISO 7816-4 §11.7.1) carrying a VERIFY with the PIN, short and in two links.
        pytest.param(
            bytes.fromhex("00 C2 00 00 0D 00 20 00 80 08") + CANARY_PIN + b"\xff\xff", id="envelope-verify"
        ),
        pytest.param(bytes.fromhex("10 C2 00 00 07 00 20 00 80 08") + CANARY_PIN[:2], id="envelope-chained"),
        pytest.param(bytes.fromhex("00 C3 00 00 06") + CANARY_PIN, id="envelope-c3"),
        pytest.param(
            bytes.fromhex("00 DB 3F FF 0E 5C 03 5F C1 05 53 07") + CANARY_KEY[:7], id="put-data-piv"
        ),  # PUT DATA
        pytest.param(
            bytes.fromhex("00 DA 00 C5 09") + CANARY_KEY, id="put-data-openpgp"
        ),  # PUT DATA (OpenPGP)
        pytest.param(
            bytes.fromhex("00 87 03 9B 0D 7C 0B 82 09") + CANARY_KEY, id="general-auth-9b"
        ),  # GENERAL AUTHENTICATE, admin key
        pytest.param(
            bytes.fromhex("00 86 00 00 09") + CANARY_KEY, id="internal-auth"
        ),  # INTERNAL AUTHENTICATE
        pytest.param(
            bytes.fromhex("00 2A 9E 9A 09") + CANARY_KEY, id="pso-sign"
        ),  # PSO: COMPUTE DIGITAL SIGNATURE
        pytest.param(
            bytes.fromhex("00 FE 07 9A 0B 01 09") + CANARY_KEY, id="yubikey-import-key"
        ),  # YubiKey PIV import key
        pytest.param(
            bytes.fromhex("00 FF FF FF 0C 03 9B 09") + CANARY_KEY[:9], id="yubikey-set-mgmt-key"
        ),  # YubiKey set management key
        pytest.param(bytes.fromhex("80 D8 00 81 09") + CANARY_KEY, id="gp-put-key"),  # GlobalPlatform PUT KEY
        pytest.param(
            bytes.fromhex("80 CB 3F FF 09") + CANARY_KEY, id="proprietary-get-data"
        ),  # GET DATA under a proprietary class
        pytest.param(
            bytes.fromhex("0C A4 04 00 09") + CANARY_KEY, id="sm-select"
        ),  # SELECT under secure messaging
        pytest.param(
            bytes.fromhex("6C CB 3F FF 09") + CANARY_KEY, id="sm-further-get-data"
        ),  # GET DATA, further class with secure messaging
        pytest.param(
            bytes.fromhex("00 47 00 9A 09") + CANARY_KEY, id="generate"
        ),  # GENERATE ASYMMETRIC KEY PAIR
        pytest.param(
            bytes.fromhex("00 E6 00 00 09") + CANARY_KEY, id="unknown-ins"
        ),  # unknown to the allow list
    ],
)
def test_redact_hides_the_data_of_every_command_outside_the_allow_list(raw: bytes) -> None:
    text = redact(raw)
    for secret in (CANARY_PIN, CANARY_KEY[:4], CANARY_KEY[4:]):
        assert secret.hex() not in text.lower().replace(" ", "")
    assert CANARY_PIN.decode() not in text
    assert "redacted" in text
    assert text.startswith(raw[:4].hex(" ").upper())  # the header still tells what it was


@given(st.binary(max_size=300))
def test_redact_never_raises(raw: bytes) -> None:
    assert isinstance(redact(raw), str)


def test_response_parse_and_encode() -> None:
    r = ResponseApdu.parse(bytes.fromhex("7C 02 82 00 90 00"))
    assert r == ResponseApdu(bytes.fromhex("7C 02 82 00"), 0x90, 0x00)
    assert r.sw == 0x9000
    assert r.encode() == bytes.fromhex("7C 02 82 00 90 00")
    with pytest.raises(MalformedApduError):
        ResponseApdu.parse(b"\x90")


@given(st.binary(max_size=300), st.integers(0, 255), st.integers(0, 255))
def test_response_round_trip(data: bytes, sw1: int, sw2: int) -> None:
    r = ResponseApdu(data, sw1, sw2)
    assert ResponseApdu.parse(r.encode()) == r


def test_retries_left_reads_63cx_only() -> None:
    assert retries_left(0x63C2) == 2
    assert retries_left(0x63C0) == 0
    assert retries_left(0x9000) is None
    assert retries_left(0x6983) is None
    assert retries_left(0x6300) is None


def test_describe_sw() -> None:
    assert "2 tries left" in describe_sw(0x63C2)
    assert describe_sw(0x6983) == "6983: authentication method blocked"
    assert "256 more bytes" in describe_sw(0x6100)
    assert "unknown" in describe_sw(0x6123 + 0x0A00)
