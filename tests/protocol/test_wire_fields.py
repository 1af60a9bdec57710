"""Control-message fields (docs/protocol.md §3): every bound exactly at its edge, in both directions.

A field check that is off by one lets a peer send what the other side cannot hold (an epoch
past u32, a 34-byte ATR) or refuses a legal value; an error text that echoes a string would
leak an admin argument into a log.
"""

from __future__ import annotations

import math

import pytest

from protocol._wire_fields import (
    MAX_ATR_BYTES,
    MAX_DOCUMENT_DEPTH,
    MAX_DOCUMENT_NODES,
    MAX_HEARTBEAT_INTERVAL,
    MAX_JSON_DEPTH,
    MAX_JSON_NODES,
    MAX_STRING_CHARS,
    Kind,
    check,
    from_json,
    to_json,
)
from protocol.errors import CloseCode
from protocol.wire import ErrorCode

HIGHS = {Kind.VERSION: 0xFFFF, Kind.U16: 0xFFFF, Kind.U32: 0xFFFF_FFFF, Kind.U64: 0xFFFF_FFFF_FFFF_FFFF}


@pytest.mark.parametrize("kind", list(HIGHS), ids=lambda k: k.value)
def test_unsigned_fields_take_zero_to_their_maximum_and_nothing_else(kind: Kind) -> None:
    high = HIGHS[kind]
    assert check(kind, 0) == 0
    assert from_json(kind, high) == high
    for bad in (-1, high + 1):
        with pytest.raises(ValueError, match=rf"^expected an integer 0\.\.{high}, got {bad}$"):
            check(kind, bad)
    for not_a_number in (True, 1.0, "1", None):
        with pytest.raises(ValueError, match="expected an integer"):
            from_json(kind, not_a_number)


def test_an_optional_u16_is_null_or_a_u16() -> None:
    assert check(Kind.OPT_U16, None) is None
    assert check(Kind.OPT_U16, 0xFFFF) == 0xFFFF
    with pytest.raises(ValueError, match=r"0\.\.65535, got 65536"):
        check(Kind.OPT_U16, 0x10000)


def test_text_is_at_most_1024_characters_and_the_error_never_echoes_it() -> None:
    assert check(Kind.TEXT, "x" * MAX_STRING_CHARS) == "x" * MAX_STRING_CHARS
    secret = "hunter2-" * 200
    with pytest.raises(ValueError, match=r"^string of 1600 characters exceeds 1024$") as err:
        check(Kind.TEXT, secret)
    assert "hunter2" not in str(err.value)
    assert check(Kind.TEXT, ErrorCode.LEASE_REQUIRED) == "lease_required"  # a StrEnum is a string
    with pytest.raises(ValueError, match=r"^string is not valid unicode \(lone surrogate\)$"):
        check(Kind.TEXT, "a\udc80")
    with pytest.raises(ValueError, match=r"^expected a string, got int$"):
        check(Kind.TEXT, 5)


def test_a_boolean_is_true_or_false_only() -> None:
    assert check(Kind.BOOL, False) is False
    with pytest.raises(ValueError, match=r"^expected a boolean, got 1$"):
        check(Kind.BOOL, 1)


def test_an_atr_is_at_most_33_bytes_and_travels_as_lowercase_hex() -> None:
    atr = bytes(range(0xDF, 0xDF + MAX_ATR_BYTES))
    assert to_json(Kind.ATR, atr) == atr.hex()
    assert from_json(Kind.ATR, atr.hex()) == atr
    assert from_json(Kind.ATR, "") == b""
    with pytest.raises(ValueError, match=r"^atr of 34 bytes exceeds 33$"):
        to_json(Kind.ATR, bytes(34))
    with pytest.raises(ValueError, match=r"^expected bytes, got bytearray$"):
        to_json(Kind.ATR, bytearray(2))
    with pytest.raises(ValueError, match=r"^hex string of 68 characters exceeds 66$"):
        from_json(Kind.ATR, "00" * 34)
    for bad in ("3B8", "3B", "3b 8f", "zz", "0x3b", "0X3b"):  # odd, uppercase, spaced, not hex, a prefix
        with pytest.raises(ValueError, match=r"is not lowercase hex of whole bytes$"):
            from_json(Kind.ATR, bad)
    with pytest.raises(ValueError, match=r"^expected a hex string, got list$"):
        from_json(Kind.ATR, [0x3B])


def test_a_heartbeat_interval_is_positive_finite_and_at_most_an_hour() -> None:
    assert check(Kind.INTERVAL, MAX_HEARTBEAT_INTERVAL) == 3600.0
    assert check(Kind.INTERVAL, 5) == 5.0 and type(check(Kind.INTERVAL, 5)) is float
    assert check(Kind.INTERVAL, 1e-9) == 1e-9
    for bad in (0, -1.0, math.nextafter(3600.0, math.inf), math.inf, math.nan):
        with pytest.raises(ValueError, match=r"is not in \(0, 3600\.0\]$"):
            check(Kind.INTERVAL, bad)
    with pytest.raises(ValueError, match=r"^expected a number of seconds, got True$"):
        check(Kind.INTERVAL, True)


def test_a_close_code_is_one_the_protocol_defines() -> None:
    assert check(Kind.CLOSE_CODE, 9) is CloseCode.REVOKED
    assert to_json(Kind.CLOSE_CODE, CloseCode.REVOKED) == 9 and type(to_json(Kind.CLOSE_CODE, 9)) is int
    with pytest.raises(ValueError, match=r"^unknown close code 99$"):
        check(Kind.CLOSE_CODE, 99)
    with pytest.raises(ValueError, match=r"^expected a close code, got True$"):
        check(Kind.CLOSE_CODE, True)


def test_a_long_peer_value_is_shortened_in_the_error() -> None:
    with pytest.raises(ValueError) as err:
        check(Kind.U16, [0] * 100)
    assert str(err.value) == "expected an integer 0..65535, got " + repr([0] * 100)[:37] + "..."
    with pytest.raises(ValueError) as exact:
        check(Kind.U16, "x" * 38)  # repr is exactly 40 characters: shown whole
    assert str(exact.value).endswith(repr("x" * 38))
    with pytest.raises(ValueError) as longer:
        check(Kind.U16, "x" * 39)  # repr is 41 characters: cut to 40
    assert str(longer.value).endswith(repr("x" * 39)[:37] + "...")


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    ("kind", "depth", "nodes"),
    # docs/protocol.md: `AdminRequest.args` to depth 4 and 256 values, `AdminResponse.result` to 8 and 50,000.
    [(Kind.OBJECT, 4, 256), (Kind.DOCUMENT, 8, 50_000)],
    ids=["object", "document"],
)
def test_admin_objects_are_bounded_in_depth_and_size_exactly(kind: Kind, depth: int, nodes: int) -> None:
    assert (MAX_JSON_DEPTH, MAX_JSON_NODES, MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_NODES) == (4, 256, 8, 50_000)
    assert check(kind, _nested(depth)) == _nested(depth)
    with pytest.raises(ValueError, match=rf"^object nesting exceeds depth {depth}$"):
        check(kind, _nested(depth + 1))
    assert check(kind, {"a": [None] * (nodes - 2)})  # the object, the list and its items
    with pytest.raises(ValueError, match=r"^object has too many values$"):
        check(kind, {"a": [None] * (nodes - 1)})
    with pytest.raises(ValueError, match=r"^expected an object, got list$"):
        check(kind, [])


def test_admin_object_values_are_json_values_within_bounds() -> None:
    fine = {"i": [-(2**63), 2**63 - 1], "f": 1.5, "s": "x", "b": True, "n": None}
    assert check(Kind.OBJECT, fine) == fine
    with pytest.raises(ValueError, match=r"^integer 9223372036854775808 is outside the signed 64-bit range$"):
        check(Kind.OBJECT, {"i": 2**63})
    with pytest.raises(ValueError, match="outside the signed 64-bit range"):
        check(Kind.OBJECT, {"i": -(2**63) - 1})
    with pytest.raises(ValueError, match=r"^number inf is not finite$"):
        check(Kind.OBJECT, {"f": math.inf})
    with pytest.raises(ValueError, match=r"^tuple is not a JSON value$"):
        check(Kind.OBJECT, {"t": (1, 2)})
    with pytest.raises(ValueError, match="exceeds 1024"):
        check(Kind.OBJECT, {"k" * 1025: 1})  # keys are strings with the same bound
    with pytest.raises(ValueError, match="exceeds 1024"):
        check(Kind.OBJECT, {"k": ["v" * 1025]})
