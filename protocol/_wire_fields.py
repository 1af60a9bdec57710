"""Field kinds of the bridge control messages and their strict validation (docs/protocol.md §3).

Each field of a control message has a `Kind`. The same checks run in both directions: on
`send` a bad value is our bug (the caller turns the `ValueError` into `LocalProtocolError`), on
receive it is the peer's (`MalformedFrameError`). Error texts name the value but never echo a
string's content: an admin argument could hold something secret.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum, StrEnum
from typing import Final

from protocol.errors import CloseCode
from protocol.vocabulary import ErrorCode, LeaseEndReason, RefusalReason

MAX_STRING_CHARS: Final = 1024
"""Longest string field (names, reasons, messages), in characters."""
MAX_ATR_BYTES: Final = 33
"""ISO 7816-3 §8.2.1: an ATR is at most 33 bytes."""
MAX_HEARTBEAT_INTERVAL: Final = 3600.0
"""Longest heartbeat interval a server may announce, in seconds."""
MAX_JSON_DEPTH: Final = 4
"""Deepest nesting of an admin `args`/`result` object (the object itself is depth 1)."""
MAX_JSON_NODES: Final = 256
MAX_DOCUMENT_DEPTH: Final = 8
"""Deepest nesting of an admin `result` (status: server > tokens > token > queue > waiter)."""
MAX_DOCUMENT_NODES: Final = 50_000
"""Most values (keys not counted) in one admin `args`/`result` object, the object included."""

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


class Kind(Enum):
    """What a control-message field holds on the wire (JSON type in brackets)."""

    VERSION = "version"  # [number] u16
    U16 = "u16"  # [number] token ids
    U32 = "u32"  # [number] epochs, queue positions, admin request ids
    U64 = "u64"  # [number] ping nonces
    OPT_U16 = "opt_u16"  # [number|null]
    TEXT = "text"  # [string] <= MAX_STRING_CHARS, valid Unicode (no lone surrogates)
    BOOL = "bool"  # [true|false]
    ATR = "atr"  # [string] lowercase hex of 0..33 bytes
    INTERVAL = "interval"  # [number] seconds, 0 < x <= MAX_HEARTBEAT_INTERVAL
    CLOSE_CODE = "close_code"  # [number] a CloseCode value
    ERROR_CODE = "error_code"  # [string] a word: ErrorCode (protocol/vocabulary.py)
    REFUSAL_REASON = "refusal_reason"  # [string] a word: RefusalReason
    LEASE_END_REASON = "lease_end_reason"  # [string] a word: LeaseEndReason
    OBJECT = "object"  # [object] bounded JSON object (admin args)
    DOCUMENT = "document"  # [object] larger bounded JSON object (admin result)


def _show(value: object) -> str:
    """A short repr of a peer-supplied value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_in(value: object, high: int) -> int:
    # bool is an int subclass, but `true` is not a number on the wire.
    if type(value) is not int or not 0 <= value <= high:
        raise ValueError(f"expected an integer 0..{high}, got {_show(value)}")
    return value


def _text(value: object) -> str:
    # isinstance, not type(): StrEnum members (wire.ErrorCode, wire.LeaseEndReason) are strings.
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_STRING_CHARS:
        raise ValueError(f"string of {len(value)} characters exceeds {MAX_STRING_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string is not valid unicode (lone surrogate)") from None
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError(f"expected a boolean, got {_show(value)}")
    return value


def _atr(value: object) -> bytes:
    if type(value) is not bytes:
        raise ValueError(f"expected bytes, got {type(value).__name__}")
    if len(value) > MAX_ATR_BYTES:
        raise ValueError(f"atr of {len(value)} bytes exceeds {MAX_ATR_BYTES}")
    return value


def _interval(value: object) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"expected a number of seconds, got {_show(value)}")
    seconds = float(value)  # type: ignore[arg-type]  # int or float, checked above
    if not (math.isfinite(seconds) and 0.0 < seconds <= MAX_HEARTBEAT_INTERVAL):
        raise ValueError(f"interval {_show(value)} is not in (0, {MAX_HEARTBEAT_INTERVAL}]")
    return seconds


def _close_code(value: object) -> CloseCode:
    if type(value) is not int and not isinstance(value, CloseCode):
        raise ValueError(f"expected a close code, got {_show(value)}")
    try:
        return CloseCode(value)
    except ValueError:
        raise ValueError(f"unknown close code {_show(value)}") from None


def _opt_u16(value: object) -> int | None:
    return None if value is None else _int_in(value, _U16)


def _object(value: object) -> dict[str, object]:
    if type(value) is not dict:
        raise ValueError(f"expected an object, got {type(value).__name__}")
    _walk_json(value, depth=1, budget=[MAX_JSON_NODES], max_depth=MAX_JSON_DEPTH)
    return value


def _document(value: object) -> dict[str, object]:
    if type(value) is not dict:
        raise ValueError(f"expected an object, got {type(value).__name__}")
    _walk_json(value, depth=1, budget=[MAX_DOCUMENT_NODES], max_depth=MAX_DOCUMENT_DEPTH)
    return value


def _walk_json(value: object, *, depth: int, budget: list[int], max_depth: int) -> None:
    """Check one JSON value of an admin object: bounded depth, size, strings and numbers."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("object has too many values")
    if value is None or type(value) is bool:
        return
    if type(value) is int:
        if not _I64_MIN <= value <= _I64_MAX:
            raise ValueError(f"integer {value} is outside the signed 64-bit range")
    elif type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"number {value!r} is not finite")
    elif type(value) is str:
        _text(value)
    elif isinstance(value, list | dict):
        if depth > max_depth:
            raise ValueError(f"object nesting exceeds depth {max_depth}")
        if isinstance(value, dict):
            for key in value:
                _text(key)
        for item in value.values() if isinstance(value, dict) else value:
            _walk_json(item, depth=depth + 1, budget=budget, max_depth=max_depth)
    else:
        raise ValueError(f"{type(value).__name__} is not a JSON value")


_CHECKS: Final[dict[Kind, Callable[[object], object]]] = {
    Kind.VERSION: lambda v: _int_in(v, _U16),
    Kind.U16: lambda v: _int_in(v, _U16),
    Kind.U32: lambda v: _int_in(v, _U32),
    Kind.U64: lambda v: _int_in(v, _U64),
    Kind.OPT_U16: _opt_u16,
    Kind.TEXT: _text,
    Kind.BOOL: _bool,
    Kind.ATR: _atr,
    Kind.INTERVAL: _interval,
    Kind.CLOSE_CODE: _close_code,
    Kind.OBJECT: _object,
    Kind.DOCUMENT: _document,
}


def check(kind: Kind, value: object) -> object:
    """Validate a Python-side field value; return it normalised. Raises ValueError."""
    return _CHECKS[kind](value)


# Word fields: `text` on the wire, drawn from a closed vocabulary (protocol/vocabulary.py).
_WORDS: Final[dict[Kind, type[StrEnum]]] = {
    Kind.ERROR_CODE: ErrorCode,
    Kind.REFUSAL_REASON: RefusalReason,
    Kind.LEASE_END_REASON: LeaseEndReason,
}
_CHECKS.update(dict.fromkeys(_WORDS, _text))


def _send_word(vocabulary: type[StrEnum], value: object) -> str:
    """A sender speaks only the vocabulary: a member, or the exact text of one."""
    try:
        return str(vocabulary(_text(value)))
    except ValueError:
        raise ValueError(
            f"{_show(value)} is not a {vocabulary.__name__}; add it to protocol/vocabulary.py "
            "and docs/protocol.md before sending it"
        ) from None


def _received_word(vocabulary: type[StrEnum], raw: object) -> str:
    """A receiver accepts any word (a newer peer may know more): a member if we know it."""
    text = _text(raw)
    try:
        return vocabulary(text)
    except ValueError:
        return text


def to_json(kind: Kind, value: object) -> object:
    """Validate a Python-side value and return its JSON form. Raises ValueError."""
    if kind in _WORDS:
        return _send_word(_WORDS[kind], value)
    value = check(kind, value)
    if kind is Kind.ATR:
        return value.hex()  # type: ignore[attr-defined]  # _atr returned bytes
    if kind is Kind.CLOSE_CODE:
        return int(value)  # type: ignore[call-overload]  # _close_code returned a CloseCode
    return value


def from_json(kind: Kind, raw: object) -> object:
    """Convert and validate a JSON value received from the peer. Raises ValueError."""
    if kind in _WORDS:
        return _received_word(_WORDS[kind], raw)
    if kind is Kind.ATR:
        raw = _unhex(raw)
    return check(kind, raw)


def _unhex(raw: object) -> bytes:
    # bytes.fromhex also accepts spaces and uppercase; the wire form is one canonical spelling.
    if type(raw) is not str:
        raise ValueError(f"expected a hex string, got {type(raw).__name__}")
    if len(raw) > 2 * MAX_ATR_BYTES:
        raise ValueError(f"hex string of {len(raw)} characters exceeds {2 * MAX_ATR_BYTES}")
    if len(raw) % 2 or not _HEX_DIGITS.issuperset(raw):
        raise ValueError(f"{_show(raw)} is not lowercase hex of whole bytes")
    return bytes.fromhex(raw)
