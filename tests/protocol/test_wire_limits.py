"""The wire codec at its exact limits, and what its errors tell an operator (protocol/wire.py).

A value at the very edge of its range (docs/protocol.md §2) must pass and one step past it must
not: a limit that is off by one either refuses a legal frame from a peer or sends one the peer
will refuse. The error texts are what an operator reads in a log when a peer (or our own code)
breaks the protocol: they name the frame type, the field, the value and the bound.
Sizes below are counted by hand from the compact JSON and the binary layout of §2.
"""

from __future__ import annotations

import struct

import pytest

from protocol.errors import CloseCode, LocalProtocolError, MalformedFrameError
from protocol.wire import (
    AdminResponse,
    CcidFrame,
    ClientHello,
    FrameType,
    LeaseRequest,
    Ping,
    decode_message,
    encode_message,
)

SLOT_STATUS = bytes.fromhex("81000000000000000000")  # RDR_to_PC_SlotStatus: the 10-byte CCID header
NOTIFY_SLOT_CHANGE = bytes.fromhex("5003")  # CCID §6.3.1, one slot
HARDWARE_ERROR = bytes.fromhex("51000001")  # CCID §6.3.2: bMessageType bSlot bSeq bHardwareErrorCode


def _local_error(msg: object, **limits: int) -> str:
    with pytest.raises(LocalProtocolError) as info:
        encode_message(msg, **limits)  # type: ignore[arg-type]  # also non-messages, on purpose
    return str(info.value)


def _remote_error(frame_type: FrameType, payload: bytes) -> str:
    with pytest.raises(MalformedFrameError) as info:
        decode_message(frame_type, payload)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    return str(info.value)


# --- payload limits: the limit itself is allowed ------------------------------------------------


def test_a_control_payload_of_exactly_the_configured_limit_is_sent_and_one_byte_more_is_refused() -> None:
    ping = Ping(nonce=42)  # {"nonce":42}: 12 bytes
    assert encode_message(ping, max_control_payload=12) == bytes.fromhex("40 00 0000000c") + b'{"nonce":42}'
    assert _local_error(ping, max_control_payload=11) == "ping payload of 12 bytes exceeds 11"


def test_a_ccid_payload_of_exactly_the_configured_limit_is_sent_and_one_byte_more_is_refused() -> None:
    frame = CcidFrame(token_id=1, epoch=7, message=SLOT_STATUS)  # 6-byte prefix + 10: 16 bytes
    assert (
        encode_message(frame, max_ccid_payload=16)
        == bytes.fromhex("3000 00000010 0001 00000007") + SLOT_STATUS
    )
    assert _local_error(frame, max_ccid_payload=15) == "ccid payload of 16 bytes exceeds 15"


def test_an_admin_response_is_not_held_to_a_smaller_control_limit() -> None:
    answer = AdminResponse(request_id=1, ok=True, result={})  # 49 bytes, far below 1 MiB
    assert len(encode_message(answer, max_control_payload=16)) == 6 + 49
    assert _local_error(Ping(nonce=1), max_control_payload=10) == "ping payload of 11 bytes exceeds 10"


def test_an_admin_response_without_an_error_text_carries_an_empty_one() -> None:
    answer = AdminResponse(request_id=1, ok=True, result={})
    assert encode_message(answer).endswith(b',"error":""}')


# --- the CCID data frame: its binary fields across their whole range ----------------------------


@pytest.mark.parametrize(("token_id", "epoch"), [(0, 0), (0xFFFF, 0xFFFF_FFFF)])
def test_ccid_token_id_and_epoch_travel_at_both_ends_of_their_range(token_id: int, epoch: int) -> None:
    frame = CcidFrame(token_id=token_id, epoch=epoch, message=SLOT_STATUS)
    data = encode_message(frame)
    assert data[6:12] == struct.pack(">HI", token_id, epoch)  # big-endian u16, u32 (§2.2)
    assert decode_message(FrameType.CCID, data[6:]) == frame


@pytest.mark.parametrize(
    ("token_id", "epoch", "error"),
    [
        (0x1_0000, 0, "ccid.token_id: expected an integer 0..65535, got 65536"),
        (-1, 0, "ccid.token_id: expected an integer 0..65535, got -1"),
        (True, 0, "ccid.token_id: expected an integer 0..65535, got True"),
        (0, 0x1_0000_0000, "ccid.epoch: expected an integer 0..4294967295, got 4294967296"),
        (0, -1, "ccid.epoch: expected an integer 0..4294967295, got -1"),
        (0, 7.0, "ccid.epoch: expected an integer 0..4294967295, got 7.0"),
    ],
)
def test_a_ccid_token_id_or_epoch_out_of_range_is_refused_naming_field_and_range(
    token_id: int, epoch: int, error: str
) -> None:
    assert _local_error(CcidFrame(token_id=token_id, epoch=epoch, message=SLOT_STATUS)) == error


def test_a_ccid_message_that_is_not_bytes_is_refused_naming_its_type() -> None:
    frame = CcidFrame(token_id=1, epoch=1, message=bytearray(SLOT_STATUS))  # type: ignore[arg-type]
    assert _local_error(frame) == "ccid.message: expected bytes, got bytearray"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (bytes(9), "ccid.message: message of 9 bytes is outside 10..65556"),
        (bytes(10 + 65547), "ccid.message: message of 65557 bytes is outside 10..65556"),
        (b"\x50", "ccid.message: message of 1 bytes is outside 2..65556"),
        (b"\x52\x00", "ccid.message: message of 2 bytes is outside 10..65556"),  # not an interrupt type
    ],
)
def test_a_ccid_message_of_impossible_size_is_refused_with_the_allowed_range(
    message: bytes, error: str
) -> None:
    assert _local_error(CcidFrame(token_id=1, epoch=1, message=message)) == error


@pytest.mark.parametrize(
    "message", [NOTIFY_SLOT_CHANGE, HARDWARE_ERROR, b"\x51\x00"], ids=["50", "51", "51-short"]
)
def test_both_interrupt_messages_may_be_shorter_than_a_bulk_header(message: bytes) -> None:
    frame = CcidFrame(token_id=3, epoch=4, message=message)
    assert decode_message(FrameType.CCID, encode_message(frame)[6:]) == frame


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (bytes(5), "ccid: payload of 5 bytes is shorter than its prefix"),
        (bytes(6), "ccid: message of 0 bytes is outside 10..65556"),
        (bytes(6) + bytes(9), "ccid: message of 9 bytes is outside 10..65556"),
        (bytes(6) + b"\x50", "ccid: message of 1 bytes is outside 2..65556"),
    ],
)
def test_a_received_ccid_payload_too_short_says_whether_prefix_or_message_is_short(
    payload: bytes, error: str
) -> None:
    assert _remote_error(FrameType.CCID, payload) == error


def test_a_received_ccid_frame_keeps_exactly_the_bytes_after_the_prefix() -> None:
    payload = bytes.fromhex("0102 0a0b0c0d") + SLOT_STATUS
    assert decode_message(FrameType.CCID, payload) == CcidFrame(
        token_id=0x0102, epoch=0x0A0B0C0D, message=SLOT_STATUS
    )


# --- control frames: canonical form and error texts ----------------------------------------------


def test_non_ascii_text_is_sent_as_utf8_not_as_json_escapes() -> None:
    """docs/protocol.md §2.1: the canonical form is compact UTF-8 JSON."""
    data = encode_message(ClientHello(version=1, software="signtool-Ünïcödé/1"))
    assert data[6:] == '{"version":1,"software":"signtool-Ünïcödé/1"}'.encode()
    assert b"\\u" not in data


def test_something_that_is_not_a_bridge_message_is_refused_by_its_type_name() -> None:
    assert _local_error("not a message") == "not a bridge message: str"
    assert _local_error(Ping) == "not a bridge message: type"


def test_a_field_out_of_range_is_refused_naming_the_frame_and_the_field_both_ways() -> None:
    assert _local_error(LeaseRequest(token_id=65536)) == (
        "lease_request.token_id: expected an integer 0..65535, got 65536"
    )
    assert _remote_error(FrameType.LEASE_REQUEST, b'{"token_id":65536}') == (
        "lease_request.token_id: expected an integer 0..65535, got 65536"
    )


def test_wrong_keys_are_refused_listing_the_missing_and_the_unknown_ones() -> None:
    assert _remote_error(FrameType.LEASE_RELEASE, b'{"token_id":1,"lease":2,"a":3}') == (
        "lease_release: missing keys ['epoch'], unknown keys ['a', 'lease']"
    )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_non_json_number_constant_is_refused_by_name_before_any_field_check(constant: str) -> None:
    error = _remote_error(
        FrameType.ADMIN_REQUEST, f'{{"request_id":1,"action":"a","args":{{"x":{constant}}}}}'.encode()
    )
    assert error == f"admin_request: payload is not UTF-8 JSON: {constant} is not allowed"


def test_a_duplicate_key_is_refused_as_such() -> None:
    error = _remote_error(FrameType.PING, b'{"nonce":1,"nonce":1}')
    assert error == "ping: payload is not UTF-8 JSON: duplicate key in object"


def test_a_payload_that_is_not_utf8_json_says_so_with_the_parser_reason() -> None:
    assert _remote_error(FrameType.PONG, b"\xff").startswith("pong: payload is not UTF-8 JSON: 'utf-8' codec")
    assert _remote_error(FrameType.PONG, b"{").startswith("pong: payload is not UTF-8 JSON: Expecting")


def test_a_json_payload_that_is_not_an_object_names_what_it_is() -> None:
    assert _remote_error(FrameType.GOODBYE, b"[1]") == "goodbye: payload is a JSON list, not an object"
    assert _remote_error(FrameType.GOODBYE, b'"x"') == "goodbye: payload is a JSON str, not an object"
