"""Bridge frames and message payloads (protocol/wire.py, docs/protocol.md §2, §3, §8)."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA
from protocol.errors import CloseCode, LocalProtocolError, MalformedFrameError, RemoteProtocolError
from protocol.vocabulary import ErrorCode, LeaseEndReason, RefusalReason
from protocol.wire import (
    _CONTROL,
    MAX_CCID_PAYLOAD,
    MAX_CONTROL_PAYLOAD,
    MESSAGE_TYPES,
    AdminRequest,
    AdminResponse,
    CcidFrame,
    ClientHello,
    ConnectionClosed,
    ErrorMessage,
    Frame,
    FrameDecoder,
    FrameType,
    Goodbye,
    LeaseEnded,
    LeaseExchange,
    LeaseGranted,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    Message,
    Ping,
    Pong,
    Prefetched,
    Refused,
    SpeculationPaths,
    TokenStatus,
    Welcome,
    decode_message,
    encode_message,
)

ATR_5100 = bytes.fromhex("3BD518008131FE7D8073C82110F4")

# docs/protocol.md §8, computed by hand: the JSON text written out, its length counted, and the
# header filled in from that length. Spaces separate header, prefix and CCID fields only.
VECTORS: list[tuple[Message, str]] = [
    (
        Welcome(version=2, server="tokenhost", identity="build-vm-01", heartbeat_interval=10.0),
        "01 00 00000055 7b2276657273696f6e223a322c22736572766572223a22746f6b656e686f7374222c226964656e74"
        "697479223a226275696c642d766d2d3031222c226865617274626561745f696e74657276616c223a31302e307d",
    ),
    (
        Refused(
            version=2,
            code=CloseCode.NOT_AUTHORIZED,
            reason="not_allowed",
            message="build-vm-09 may not connect",
        ),
        "02 00 00000055 7b2276657273696f6e223a322c22636f6465223a342c22726561736f6e223a226e6f745f616c6c6f"
        "776564222c226d657373616765223a226275696c642d766d2d3039206d6179206e6f7420636f6e6e656374227d",
    ),
    (
        ClientHello(version=2, software="tokenbridge-client/0.1.0"),
        "03 00 00000033 7b2276657273696f6e223a322c22736f667477617265223a22746f6b656e6272696467652d636c69"
        "656e742f302e312e30227d",
    ),
    (
        TokenStatus(token_id=1, name="codesign", present=True, allowed=True, atr=ATR_5100, state="free"),
        "10 00 00000072 7b22746f6b656e5f6964223a312c226e616d65223a22636f64657369676e222c2270726573656e74"
        "223a747275652c22616c6c6f776564223a747275652c22617472223a223362643531383030383133316665376438"
        "3037336338323131306634222c227374617465223a2266726565227d",
    ),
    (LeaseRequest(token_id=1), "20 00 0000000e 7b22746f6b656e5f6964223a317d"),
    (
        LeaseQueued(token_id=1, position=2),
        "21 00 0000001b 7b22746f6b656e5f6964223a312c22706f736974696f6e223a327d",
    ),
    (
        LeaseGranted(token_id=1, epoch=7, atr=ATR_5100),
        "22 00 0000003d 7b22746f6b656e5f6964223a312c2265706f6368223a372c22617472223a22336264353138303038"
        "31333166653764383037336338323131306634227d",
    ),
    (LeaseRelease(token_id=1, epoch=7), "23 00 00000018 7b22746f6b656e5f6964223a312c2265706f6368223a377d"),
    (
        LeaseEnded(token_id=1, epoch=7, reason="released"),
        "24 00 0000002c 7b22746f6b656e5f6964223a312c2265706f6368223a372c22726561736f6e223a2272656c656173"
        "6564227d",
    ),
    (
        CcidFrame(token_id=1, epoch=7, message=bytes.fromhex("62000000000000000000")),
        "30 00 00000010 0001 00000007 62000000000000000000",
    ),
    (
        CcidFrame(token_id=1, epoch=7, message=bytes.fromhex("800e0000000000000000") + ATR_5100),
        "30 00 0000001e 0001 00000007 800e0000000000000000 3bd518008131fe7d8073c82110f4",
    ),
    (
        CcidFrame(token_id=1, epoch=7, message=bytes.fromhex("6f0a0000000003000000 00a4040005a000000308")),
        "30 00 0000001a 0001 00000007 6f0a0000000003000000 00a4040005a000000308",
    ),
    (
        CcidFrame(token_id=1, epoch=7, message=bytes.fromhex("80020000000003000000 9000")),
        "30 00 00000012 0001 00000007 80020000000003000000 9000",
    ),
    (CcidFrame(token_id=1, epoch=7, message=b"\x50\x03"), "30 00 00000008 0001 00000007 5003"),
    (Ping(nonce=42), "40 00 0000000c 7b226e6f6e6365223a34327d"),
    (Pong(nonce=42), "41 00 0000000c 7b226e6f6e6365223a34327d"),
    (
        ErrorMessage(code="stale_epoch", message="epoch 6 is not the current lease", token_id=1),
        "50 00 00000050 7b22636f6465223a227374616c655f65706f6368222c226d657373616765223a2265706f6368203620"
        "6973206e6f74207468652063757272656e74206c65617365222c22746f6b656e5f6964223a317d",
    ),
    (
        AdminRequest(request_id=5, action="status", args={}),
        "60 00 0000002c 7b22726571756573745f6964223a352c22616374696f6e223a22737461747573222c2261726773223a"
        "7b7d7d",
    ),
    (
        AdminResponse(request_id=5, ok=True, result={"leases": 0}, error=""),
        "61 00 0000003b 7b22726571756573745f6964223a352c226f6b223a747275652c22726573756c74223a7b226c656173"
        "6573223a307d2c226572726f72223a22227d",
    ),
    (
        LeaseExchange(
            token_id=1,
            deferred=((bytes.fromhex("00a4040005a000000308"), bytes.fromhex("9000")),),
            message=bytes.fromhex("62000000000001000000"),
        ),
        "25 00 00000022 0001 0001 0000000a 00a4040005a000000308 00000002 9000 62000000000001000000",
    ),
    (
        Prefetched(token_id=1, epoch=7, steps=((bytes.fromhex("00c0000002"), bytes.fromhex("01029000")),)),
        "31 00 00000019 0001 00000007 0001 00000005 00c0000002 00000004 01029000",
    ),
    (
        SpeculationPaths(
            token_id=1, paths=(((bytes.fromhex("00a4040005a000000308"), bytes.fromhex("9000")),),)
        ),
        "11 00 0000001a 0001 0001 0001 0000000a 00a4040005a000000308 00000002 9000",
    ),
    (
        Goodbye(code=CloseCode.NORMAL, reason="client stopping"),
        "7f 00 00000025 7b22636f6465223a302c22726561736f6e223a22636c69656e742073746f7070696e67227d",
    ),
]
ALL_WIRE = b"".join(bytes.fromhex(h) for _, h in VECTORS)


def drain(decoder: FrameDecoder) -> list[Message]:
    out: list[Message] = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        assert isinstance(frame, Frame)
        out.append(decode_message(frame.frame_type, frame.payload))
    return out


def header(frame_type: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">BBI", frame_type, flags, length)


def control_frame(frame_type: FrameType, json_text: str | bytes) -> bytes:
    payload = json_text.encode() if isinstance(json_text, str) else json_text
    return header(frame_type, len(payload)) + payload


def decode_one(wire: bytes) -> Message:
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    [msg] = drain(decoder)
    return msg


# --- vectors ---------------------------------------------------------------------------------


def test_vectors_cover_every_frame_type() -> None:
    assert {bytes.fromhex(h)[0] for _, h in VECTORS} == {int(t) for t in FrameType}


@pytest.mark.parametrize(("msg", "wire_hex"), VECTORS)
def test_encode_message_matches_hand_computed_vector(msg: Message, wire_hex: str) -> None:
    assert encode_message(msg) == bytes.fromhex(wire_hex)


@pytest.mark.parametrize(("msg", "wire_hex"), VECTORS)
def test_decoder_reads_hand_computed_vector(msg: Message, wire_hex: str) -> None:
    assert decode_one(bytes.fromhex(wire_hex)) == msg


def test_decoder_splits_the_vector_stream_at_every_byte_boundary() -> None:
    expected = [msg for msg, _ in VECTORS]
    for split in range(1, len(ALL_WIRE)):
        decoder = FrameDecoder()
        decoder.receive_data(ALL_WIRE[:split])
        got = drain(decoder)
        decoder.receive_data(ALL_WIRE[split:])
        got += drain(decoder)
        assert got == expected, split
        assert decoder.buffered == 0


def test_decoder_fed_one_byte_at_a_time_returns_need_data_until_each_frame_is_whole() -> None:
    wire = bytes.fromhex(VECTORS[0][1])
    decoder = FrameDecoder()
    for byte in wire[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(wire[-1:])
    assert drain(decoder) == [VECTORS[0][0]]


def test_schema_table_names_exactly_each_dataclass_field_in_order() -> None:
    for cls, (_, schema) in _CONTROL.items():
        assert tuple(f.name for f in dataclasses.fields(cls)) == tuple(name for name, _ in schema)
    assert set(MESSAGE_TYPES) == set(_CONTROL) | {CcidFrame, LeaseExchange, Prefetched, SpeculationPaths}


def test_message_classes_are_frozen_slotted_and_keyword_only() -> None:
    msg = Ping(nonce=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.nonce = 2  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")
    with pytest.raises(TypeError):
        Ping(1)  # type: ignore[call-arg]


# --- header checks happen before the payload is buffered --------------------------------------


@pytest.mark.parametrize(
    ("head", "close_code"),
    [
        (header(0x99, 0), CloseCode.PROTOCOL_ERROR),
        (header(0x00, 0), CloseCode.PROTOCOL_ERROR),
        (header(FrameType.PING, 12, flags=0x01), CloseCode.PROTOCOL_ERROR),
        (header(FrameType.PING, 12, flags=0x80), CloseCode.PROTOCOL_ERROR),
        (header(FrameType.PING, MAX_CONTROL_PAYLOAD + 1), CloseCode.FRAME_TOO_LARGE),
        (header(FrameType.ADMIN_RESPONSE, 0xFFFF_FFFF), CloseCode.FRAME_TOO_LARGE),
        (header(FrameType.CCID, MAX_CCID_PAYLOAD + 1), CloseCode.FRAME_TOO_LARGE),
    ],
)
def test_decoder_rejects_bad_header_before_buffering_payload(head: bytes, close_code: CloseCode) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(head)  # only the 6 header bytes: no payload has been sent at all
    with pytest.raises(MalformedFrameError) as info:
        decoder.next_frame()
    assert info.value.close_code is close_code
    assert decoder.buffered == 6


def test_hand_computed_refused_headers_from_the_docs_are_refused() -> None:
    for head, code in [
        ("99 00 00000000", CloseCode.PROTOCOL_ERROR),
        ("40 01 0000000c", CloseCode.PROTOCOL_ERROR),
        ("40 00 00004001", CloseCode.FRAME_TOO_LARGE),
        ("30 00 0001001b", CloseCode.FRAME_TOO_LARGE),
    ]:
        decoder = FrameDecoder()
        decoder.receive_data(bytes.fromhex(head))
        with pytest.raises(MalformedFrameError) as info:
            decoder.next_frame()
        assert info.value.close_code is code


def test_decoder_accepts_lengths_exactly_at_the_maximum() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(header(FrameType.CCID, MAX_CCID_PAYLOAD))
    assert decoder.next_frame() is NEED_DATA
    decoder = FrameDecoder()
    decoder.receive_data(header(FrameType.PING, MAX_CONTROL_PAYLOAD))
    assert decoder.next_frame() is NEED_DATA


def test_decoder_honours_smaller_configured_limits() -> None:
    decoder = FrameDecoder(max_control_payload=100, max_ccid_payload=300)
    decoder.receive_data(header(FrameType.CCID, 301))
    with pytest.raises(MalformedFrameError, match="301"):
        decoder.next_frame()
    decoder = FrameDecoder(max_control_payload=100, max_ccid_payload=300)
    decoder.receive_data(header(FrameType.WELCOME, 101))
    with pytest.raises(MalformedFrameError, match="101"):
        decoder.next_frame()


def test_decoder_reports_eof_inside_a_frame_as_remote_error() -> None:
    wire = bytes.fromhex(VECTORS[4][1])
    for cut in range(1, len(wire)):
        decoder = FrameDecoder()
        decoder.receive_data(wire[:cut])
        assert decoder.next_frame() is NEED_DATA
        decoder.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="eof"):
            decoder.next_frame()


def test_decoder_returns_connection_closed_after_the_last_frame_and_keeps_returning_it() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(bytes.fromhex(VECTORS[4][1]))
    decoder.receive_data(b"")  # EOF may be fed while a whole frame still waits
    assert isinstance(decoder.next_frame(), Frame)
    assert decoder.next_frame() == ConnectionClosed()
    assert decoder.next_frame() == ConnectionClosed()


def test_decoder_refuses_data_after_eof() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after eof"):
        decoder.receive_data(b"\x40")


def test_decoder_refuses_more_data_while_a_whole_frame_waits_to_be_pulled() -> None:
    """The buffer holds at most one incomplete frame plus the chunk being fed."""
    decoder = FrameDecoder()
    decoder.receive_data(bytes.fromhex(VECTORS[4][1]))
    with pytest.raises(LocalProtocolError, match="NEED_DATA"):
        decoder.receive_data(b"\x40")
    decoder = FrameDecoder()
    decoder.receive_data(header(0x99, 0))
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"\x40")


# --- payload validation -----------------------------------------------------------------------


BAD_CONTROL_PAYLOADS: list[tuple[FrameType, str | bytes]] = [
    (FrameType.PING, b""),
    (FrameType.PING, b"\xff\xfe"),  # not UTF-8
    (FrameType.PING, b"\xef\xbb\xbf{}"),  # BOM
    (FrameType.PING, "[42]"),
    (FrameType.PING, "42"),
    (FrameType.PING, '{"nonce":42'),
    (FrameType.PING, "{}"),  # missing key
    (FrameType.PING, '{"nonce":42,"extra":1}'),  # unknown key
    (FrameType.PING, '{"nonce":1,"nonce":2}'),  # duplicate key
    (FrameType.PING, '{"nonce":-1}'),
    (FrameType.PING, '{"nonce":18446744073709551616}'),  # 2**64
    (FrameType.PING, '{"nonce":1.0}'),
    (FrameType.PING, '{"nonce":true}'),
    (FrameType.PING, '{"nonce":"1"}'),
    (FrameType.PING, '{"nonce":NaN}'),
    (FrameType.PING, "[" * 5000 + "]" * 5000),
    (FrameType.LEASE_REQUEST, '{"token_id":65536}'),
    (FrameType.LEASE_REQUEST, '{"token_id":null}'),
    (FrameType.LEASE_QUEUED, '{"token_id":1,"position":-1}'),
    (FrameType.LEASE_RELEASE, '{"token_id":1,"epoch":4294967296}'),
    (FrameType.LEASE_GRANTED, '{"token_id":1,"epoch":7,"atr":"3BD5"}'),  # uppercase hex
    (FrameType.LEASE_GRANTED, '{"token_id":1,"epoch":7,"atr":"3bd"}'),  # odd length
    (FrameType.LEASE_GRANTED, '{"token_id":1,"epoch":7,"atr":"3b d5"}'),
    (FrameType.LEASE_GRANTED, '{"token_id":1,"epoch":7,"atr":"' + "00" * 34 + '"}'),
    (FrameType.LEASE_GRANTED, '{"token_id":1,"epoch":7,"atr":[59]}'),
    (FrameType.CLIENT_HELLO, '{"version":1,"software":"' + "x" * 1025 + '"}'),
    (FrameType.CLIENT_HELLO, '{"version":1,"software":"\\ud800"}'),  # lone surrogate
    (FrameType.CLIENT_HELLO, '{"version":65536,"software":""}'),
    (FrameType.TOKEN_STATUS, '{"token_id":1,"name":"a","present":1,"allowed":true,"atr":"","state":""}'),
    (FrameType.WELCOME, '{"version":1,"server":"s","identity":"i","heartbeat_interval":0}'),
    (FrameType.WELCOME, '{"version":1,"server":"s","identity":"i","heartbeat_interval":-5.0}'),
    (FrameType.WELCOME, '{"version":1,"server":"s","identity":"i","heartbeat_interval":1e400}'),
    (FrameType.WELCOME, '{"version":1,"server":"s","identity":"i","heartbeat_interval":Infinity}'),
    (FrameType.WELCOME, '{"version":1,"server":"s","identity":"i","heartbeat_interval":"10"}'),
    (FrameType.GOODBYE, '{"code":99,"reason":""}'),
    (FrameType.GOODBYE, '{"code":"normal","reason":""}'),
    (FrameType.ERROR, '{"code":"x","message":"y"}'),  # token_id is required even when null
    (FrameType.ADMIN_REQUEST, '{"request_id":1,"action":"a","args":[]}'),
    (FrameType.ADMIN_REQUEST, '{"request_id":1,"action":"a","args":{"a":{"b":{"c":{"d":[1]}}}}}'),
    (FrameType.ADMIN_REQUEST, '{"request_id":1,"action":"a","args":{"a":[' + ",".join(["1"] * 300) + "]}}"),
    (FrameType.ADMIN_REQUEST, '{"request_id":1,"action":"a","args":{"a":9223372036854775808}}'),
    (FrameType.ADMIN_REQUEST, '{"request_id":1,"action":"a","args":{"' + "k" * 1025 + '":1}}'),
]


@pytest.mark.parametrize(("frame_type", "payload"), BAD_CONTROL_PAYLOADS)
def test_decode_message_rejects_malformed_control_payload(
    frame_type: FrameType, payload: str | bytes
) -> None:
    raw = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(MalformedFrameError) as info:
        decode_message(frame_type, raw)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR


def test_decode_message_accepts_the_deepest_allowed_admin_object_and_integer_interval() -> None:
    msg = decode_message(
        FrameType.ADMIN_REQUEST, b'{"request_id":1,"action":"a","args":{"a":{"b":{"c":[1]}}}}'
    )
    assert msg == AdminRequest(request_id=1, action="a", args={"a": {"b": {"c": [1]}}})
    welcome = decode_message(
        FrameType.WELCOME, b'{"version":1,"server":"","identity":"","heartbeat_interval":5}'
    )
    assert isinstance(welcome, Welcome)
    assert type(welcome.heartbeat_interval) is float


def test_decode_message_accepts_whitespace_and_any_key_order() -> None:
    msg = decode_message(FrameType.LEASE_QUEUED, b' { "position" : 3 ,\n "token_id" : 2 } ')
    assert msg == LeaseQueued(token_id=2, position=3)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "0001",
        "0001 00000007",
        "0001 00000007 620000000000000000",  # 9-byte CCID message
        "0001 00000007 50",  # 1-byte interrupt message
    ],
)
def test_decode_message_rejects_short_ccid_payload(payload: str) -> None:
    with pytest.raises(MalformedFrameError):
        decode_message(FrameType.CCID, bytes.fromhex(payload))


def test_decode_message_accepts_ccid_payload_of_exactly_the_maximum() -> None:
    payload = bytes(6) + b"\x80" + bytes(MAX_CCID_PAYLOAD - 7)
    msg = decode_message(FrameType.CCID, payload)
    assert isinstance(msg, CcidFrame)
    assert len(msg.message) == 10 + 65546


# --- encoding refuses what decoding would refuse -----------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        LeaseRequest(token_id=-1),
        LeaseRequest(token_id=65536),
        LeaseRequest(token_id=True),
        LeaseQueued(token_id=1, position=-1),
        LeaseRelease(token_id=1, epoch=2**32),
        Ping(nonce=2**64),
        LeaseGranted(token_id=1, epoch=1, atr=bytes(34)),
        LeaseGranted(token_id=1, epoch=1, atr="3b"),  # type: ignore[arg-type]
        ClientHello(version=1, software="x" * 1025),
        ClientHello(version=1, software="\ud800"),
        Welcome(version=1, server="", identity="", heartbeat_interval=float("nan")),
        Goodbye(code=42, reason=""),  # type: ignore[arg-type]
        AdminRequest(request_id=1, action="a", args={"t": (1, 2)}),
        AdminRequest(request_id=1, action="a", args={1: 2}),  # type: ignore[dict-item]
        AdminResponse(request_id=1, ok=True, result={"a": float("inf")}),
        ErrorMessage(code="bad_ccid", message="y", token_id=70000),
        ErrorMessage(code="queue_full", message="y"),  # not a word of ErrorCode
        LeaseEnded(token_id=1, epoch=1, reason="lost"),
        Refused(version=1, code=CloseCode.NORMAL, reason="version", message=""),
        CcidFrame(token_id=1, epoch=1, message=bytes(9)),
        CcidFrame(token_id=1, epoch=1, message=bytes(10 + 65547)),
        CcidFrame(token_id=70000, epoch=1, message=bytes(10)),
        CcidFrame(token_id=1, epoch=-1, message=bytes(10)),
        CcidFrame(token_id=1, epoch=1, message=bytearray(10)),  # type: ignore[arg-type]
        "not a message",
    ],
)
def test_encode_message_refuses_out_of_range_fields(msg: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(msg)


def test_encode_message_refuses_control_payload_over_the_limit() -> None:
    big = AdminRequest(request_id=1, action="a", args={str(i): "x" * 1000 for i in range(20)})
    with pytest.raises(LocalProtocolError, match="exceeds 16384"):
        encode_message(big)


def test_encode_message_writes_error_token_id_null_and_close_code_as_number() -> None:
    assert encode_message(ErrorMessage(code="bad_ccid", message="b")).endswith(b',"token_id":null}')
    assert encode_message(Goodbye(code=CloseCode.REVOKED, reason="")) == control_frame(
        FrameType.GOODBYE, '{"code":9,"reason":""}'
    )


# --- Hypothesis: round trips and any chunking -------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=40)
atr = st.binary(max_size=33)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3)


json_object = st.dictionaries(text, json_leaf | _containers(json_leaf | _containers(json_leaf)), max_size=4)
steps = st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=40)), max_size=4).map(tuple)
ccid_message = st.binary(min_size=10, max_size=300) | st.sampled_from([b"\x50\x03", b"\x51\x00\x01\x02"])

MESSAGES: dict[type[Any], st.SearchStrategy[Any]] = {
    Welcome: st.builds(
        Welcome,
        version=u16,
        server=text,
        identity=text,
        heartbeat_interval=st.floats(min_value=1e-6, max_value=3600.0),
    ),
    Refused: st.builds(
        Refused,
        version=u16,
        code=st.sampled_from(CloseCode),
        reason=st.sampled_from(RefusalReason),
        message=text,
    ),
    ClientHello: st.builds(ClientHello, version=u16, software=text),
    TokenStatus: st.builds(
        TokenStatus,
        token_id=u16,
        name=text,
        present=st.booleans(),
        allowed=st.booleans(),
        atr=atr,
        state=text,
    ),
    LeaseRequest: st.builds(LeaseRequest, token_id=u16),
    LeaseQueued: st.builds(LeaseQueued, token_id=u16, position=u32),
    LeaseGranted: st.builds(LeaseGranted, token_id=u16, epoch=u32, atr=atr),
    LeaseRelease: st.builds(LeaseRelease, token_id=u16, epoch=u32),
    LeaseEnded: st.builds(LeaseEnded, token_id=u16, epoch=u32, reason=st.sampled_from(LeaseEndReason)),
    CcidFrame: st.builds(CcidFrame, token_id=u16, epoch=u32, message=ccid_message),
    Ping: st.builds(Ping, nonce=u64),
    Pong: st.builds(Pong, nonce=u64),
    ErrorMessage: st.builds(
        ErrorMessage, code=st.sampled_from(ErrorCode), message=text, token_id=st.none() | u16
    ),
    AdminRequest: st.builds(AdminRequest, request_id=u32, action=text, args=json_object),
    AdminResponse: st.builds(AdminResponse, request_id=u32, ok=st.booleans(), result=json_object, error=text),
    Goodbye: st.builds(Goodbye, code=st.sampled_from(CloseCode), reason=text),
    LeaseExchange: st.builds(
        LeaseExchange, token_id=u16, deferred=steps, message=st.binary(min_size=10, max_size=300)
    ),
    Prefetched: st.builds(Prefetched, token_id=u16, epoch=u32, steps=steps),
    SpeculationPaths: st.builds(SpeculationPaths, token_id=u16, paths=st.lists(steps, max_size=3).map(tuple)),
}
any_message = st.one_of(*MESSAGES.values())


def test_strategies_cover_every_message_type() -> None:
    assert set(MESSAGES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
@settings(max_examples=60)
@given(data=st.data())
def test_decode_of_encode_is_identity_for_every_message_type(cls: type[Any], data: st.DataObject) -> None:
    msg = data.draw(MESSAGES[cls])
    assert decode_one(encode_message(msg)) == msg


@settings(max_examples=150)
@given(msgs=st.lists(any_message, max_size=8), chunks=st.lists(st.integers(1, 400), min_size=1))
def test_decoder_returns_the_same_messages_whatever_the_chunking(
    msgs: list[Message], chunks: list[int]
) -> None:
    wire = b"".join(encode_message(m) for m in msgs)
    decoder = FrameDecoder()
    got: list[Message] = []
    pos, i = 0, 0
    while pos < len(wire):
        size = chunks[i % len(chunks)]
        decoder.receive_data(wire[pos : pos + size])
        pos, i = pos + size, i + 1
        got += drain(decoder)
    decoder.receive_data(b"")
    assert decoder.next_frame() == ConnectionClosed()
    assert got == msgs


@settings(max_examples=200)
@given(garbage=st.binary(min_size=1, max_size=64))
def test_decoder_meets_garbage_with_need_data_frames_or_remote_errors_only(garbage: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(garbage)
    try:
        for _ in range(len(garbage) + 1):
            frame = decoder.next_frame()
            if frame is NEED_DATA:
                break
            assert isinstance(frame, Frame)
            decode_message(frame.frame_type, frame.payload)
    except RemoteProtocolError:
        pass


def _nested(depth: int) -> dict[str, object]:
    doc: dict[str, object] = {"leaf": 1}
    for _ in range(depth - 1):
        doc = {"x": doc}
    return doc


def test_admin_response_carries_a_large_status_document() -> None:
    """An admin result the size of `status` with 400 clients fits the admin response frame."""
    clients = [
        {"identity": f"build-vm-{i:03d}", "peer": f"10.0.0.{i % 250}:5{i:04d}", "rtt_ms": 0.4}
        for i in range(400)
    ]
    doc = {
        "server": {"version": "0.1.0"},
        "tokens": [{"name": "codesign", "queue": [{"identity": "a"}]}],
        "clients": clients,
    }
    msg = AdminResponse(request_id=7, ok=True, result=doc, error="")
    data = encode_message(msg)
    assert len(data) > MAX_CONTROL_PAYLOAD
    decoder = FrameDecoder()
    decoder.receive_data(data)
    frame = decoder.next_frame()
    assert decode_message(frame.frame_type, frame.payload) == msg


def test_admin_response_document_deeper_than_its_bound_is_refused() -> None:
    encode_message(AdminResponse(request_id=1, ok=True, result=_nested(8), error=""))
    with pytest.raises(LocalProtocolError, match="depth 8"):
        encode_message(AdminResponse(request_id=1, ok=True, result=_nested(9), error=""))


def test_admin_request_args_keep_the_small_bound() -> None:
    with pytest.raises(LocalProtocolError, match="depth"):
        encode_message(AdminRequest(request_id=1, action="status", args=_nested(5)))


def test_admin_response_header_over_one_mebibyte_is_refused_before_buffering() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(bytes([FrameType.ADMIN_RESPONSE, 0]) + ((1 << 20) + 1).to_bytes(4, "big"))
    with pytest.raises(MalformedFrameError, match="exceeds"):
        decoder.next_frame()
