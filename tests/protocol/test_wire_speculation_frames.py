"""protocol/wire.py and the three binary speculation frames of version 2 (issue 17): a bad field
or a bad payload is reported as the wire's own error, naming the message or frame type."""

from __future__ import annotations

import re

import pytest

from protocol._framing import MAX_CCID_MESSAGE, MIN_CCID_MESSAGE
from protocol.errors import LocalProtocolError, MalformedFrameError
from protocol.wire import (
    FrameType,
    LeaseExchange,
    Prefetched,
    SpeculationPaths,
    decode_message,
    encode_message,
    frame_type_of,
)


def exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


def test_each_speculation_message_travels_in_its_own_frame_type() -> None:
    assert frame_type_of(LeaseExchange) is FrameType.LEASE_EXCHANGE
    assert frame_type_of(Prefetched) is FrameType.PREFETCHED
    assert frame_type_of(SpeculationPaths) is FrameType.SPECULATION_PATHS


def test_a_speculation_message_with_a_bad_field_is_a_local_protocol_error_naming_it() -> None:
    msg = LeaseExchange(token_id=1, deferred=(), message=bytes(MIN_CCID_MESSAGE - 1))
    text = f"LeaseExchange: message: a CCID message of {MIN_CCID_MESSAGE}..{MAX_CCID_MESSAGE} bytes expected"
    with pytest.raises(LocalProtocolError, match=exactly(text)):
        encode_message(msg)
    with pytest.raises(
        LocalProtocolError, match=exactly("Prefetched: epoch: expected an integer 0..4294967295, got -1")
    ):
        encode_message(Prefetched(token_id=1, epoch=-1, steps=()))


@pytest.mark.parametrize(
    ("ftype", "name"),
    [
        (FrameType.LEASE_EXCHANGE, "lease_exchange"),
        (FrameType.PREFETCHED, "prefetched"),
        (FrameType.SPECULATION_PATHS, "speculation_paths"),
    ],
)
def test_a_malformed_speculation_payload_is_a_malformed_frame_naming_its_type(
    ftype: FrameType, name: str
) -> None:
    with pytest.raises(
        MalformedFrameError, match=exactly(f"{name}: payload of 1 bytes is shorter than its fixed fields")
    ):
        decode_message(ftype, b"\x00")


def test_a_speculation_frame_decodes_to_its_message() -> None:
    msg = Prefetched(token_id=3, epoch=4, steps=((b"\x00\xc0\x00\x00\x02", b"\x01\x02\x90\x00"),))
    frame = encode_message(msg)
    assert frame[0] == FrameType.PREFETCHED
    assert decode_message(FrameType.PREFETCHED, frame[6:]) == msg
