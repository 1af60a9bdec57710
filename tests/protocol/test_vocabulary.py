"""The wire's machine words: docs/protocol.md's tables against the enums, and the codec's rule
(a sender speaks only the vocabulary, a receiver accepts unknown words)."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path

import pytest

from protocol.errors import CloseCode, LocalProtocolError
from protocol.vocabulary import WORD_ENUMS, ErrorCode, LeaseEndReason, RefusalReason
from protocol.wire import (
    PROTOCOL_VERSION,
    ErrorMessage,
    FrameType,
    LeaseEnded,
    Refused,
    decode_message,
    encode_message,
    frame_header,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _table_after(heading: str, column: int = 0) -> list[str]:
    """The backticked words in `column` of the first table after `heading` in docs/protocol.md."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    words: list[str] = []
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            in_table = True
            cell = line.strip("|").split("|")[column].strip()
            match = re.fullmatch(r"`([a-z_A-Z]+)`", cell)
            if match:
                words.append(match.group(1))
        elif in_table:
            break
    assert words, f"no table after {heading!r} in {DOC}"
    return words


DOC_TABLES: list[tuple[type[Enum], str, int]] = [
    (ErrorCode, "## 6. Heartbeats and errors", 0),
    (RefusalReason, "### 4.2 Refusal reasons", 0),
    (LeaseEndReason, "### 5.3 How a lease ends", 0),
    (CloseCode, "## 7. Close codes", 1),
]


@pytest.mark.parametrize(("enum", "heading", "column"), DOC_TABLES, ids=lambda v: getattr(v, "__name__", ""))
def test_the_docs_table_lists_exactly_the_enum_members(enum: type[Enum], heading: str, column: int) -> None:
    documented = _table_after(heading, column)
    spelled = [m.name if enum is CloseCode else m.value for m in enum]
    assert len(documented) == len(set(documented)), f"a word is listed twice under {heading!r}"
    missing = sorted(set(spelled) - set(documented))
    stale = sorted(set(documented) - set(spelled))
    assert (missing, stale) == ([], []), f"{heading}: undocumented {missing}, never sent {stale}"


def test_every_word_enum_has_a_docs_table() -> None:
    assert set(WORD_ENUMS) == {enum for enum, _, _ in DOC_TABLES if enum is not CloseCode}


def _control(ftype: FrameType, obj: dict[str, object]) -> tuple[FrameType, bytes]:
    payload = json.dumps(obj).encode()
    assert frame_header(ftype, len(payload))  # a well-formed frame
    return ftype, payload


UNKNOWN_WORDS = [
    (_control(FrameType.ERROR, {"code": "queue_full", "message": "m", "token_id": None}), "code"),
    (_control(FrameType.LEASE_ENDED, {"token_id": 1, "epoch": 2, "reason": "solar_flare"}), "reason"),
    (_control(FrameType.REFUSED, {"version": 1, "code": 4, "reason": "expired", "message": "m"}), "reason"),
]


@pytest.mark.parametrize(("frame", "field"), UNKNOWN_WORDS)
def test_a_receiver_accepts_a_word_it_does_not_know_as_plain_text(
    frame: tuple[FrameType, bytes], field: str
) -> None:
    msg = decode_message(*frame)
    value = getattr(msg, field)
    assert value == json.loads(frame[1])[field]
    assert type(value) is str  # not a member: the receiver must not mistake it for a known word


def test_a_receiver_gets_the_enum_member_for_a_known_word() -> None:
    msg = decode_message(*_control(FrameType.ERROR, {"code": "stale_epoch", "message": "m", "token_id": 3}))
    assert isinstance(msg, ErrorMessage)
    assert msg.code is ErrorCode.STALE_EPOCH
    ended = decode_message(*_control(FrameType.LEASE_ENDED, {"token_id": 1, "epoch": 2, "reason": "revoked"}))
    assert isinstance(ended, LeaseEnded)
    assert ended.reason is LeaseEndReason.REVOKED


@pytest.mark.parametrize(
    "msg",
    [
        ErrorMessage(code="queue_full", message="m"),
        ErrorMessage(code="STALE_EPOCH", message="m"),
        ErrorMessage(code=LeaseEndReason.REVOKED, message="m"),  # a word of another field
        LeaseEnded(token_id=1, epoch=2, reason="solar_flare"),
        Refused(version=PROTOCOL_VERSION, code=CloseCode.NOT_AUTHORIZED, reason="nope", message="m"),
    ],
)
def test_a_sender_can_only_send_words_of_the_vocabulary(msg: object) -> None:
    with pytest.raises(LocalProtocolError, match=r"protocol/vocabulary\.py"):
        encode_message(msg)  # type: ignore[arg-type]


@pytest.mark.parametrize("enum", WORD_ENUMS)
def test_every_member_round_trips_as_its_member(enum: type[Enum]) -> None:
    for member in enum:
        if enum is ErrorCode:
            msg: object = ErrorMessage(code=member, message="m")  # type: ignore[arg-type]
        elif enum is LeaseEndReason:
            msg = LeaseEnded(token_id=0, epoch=1, reason=member)  # type: ignore[arg-type]
        else:
            msg = Refused(version=1, code=CloseCode.NORMAL, reason=member, message="m")  # type: ignore[arg-type]
        frame = encode_message(msg)  # type: ignore[arg-type]
        decoded = decode_message(FrameType(frame[0]), frame[6:])
        assert decoded == msg
        assert getattr(decoded, "code" if enum is ErrorCode else "reason") is member
