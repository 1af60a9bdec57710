"""The bridge wire format: messages and their frames (DESIGN §3; reference: docs/protocol.md).

Theory of operation: every frame is a 6-byte header `type:u8 flags:u8 length:u32be` and
`length` payload bytes (framing and the header-first `FrameDecoder` are in
`protocol/_framing.py`, re-exported here). Control frames carry one UTF-8 JSON object whose
keys are exactly the fields of the message dataclass; the CCID data frame is binary,
`token_id:u16be epoch:u32be` then one raw CCID message. `encode_message` and `decode_message`
translate between dataclasses and frames with the same strict field checks
(`protocol/_wire_fields.py`) in both directions: a bad value is a `LocalProtocolError` when we
send it and a `MalformedFrameError` when the peer does. The one asymmetry is the machine words
(`protocol/vocabulary.py`): we send only words of the vocabulary, and accept unknown ones.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from protocol._framing import (
    CCID_PREFIX_LEN,
    HEADER_LEN,
    MAX_CCID_MESSAGE,
    MAX_CCID_PAYLOAD,
    MAX_CONTROL_PAYLOAD,
    MIN_CCID_MESSAGE,
    MIN_INTERRUPT_MESSAGE,
    ConnectionClosed,
    Frame,
    FrameDecoder,
    FrameType,
    frame_header,
    max_payload,
)
from protocol._wire_fields import Kind, from_json, to_json
from protocol.errors import CloseCode, LocalProtocolError, MalformedFrameError
from protocol.speculation import LeaseExchange, Prefetched, SpeculationPaths, decode_payload, encode_payload
from protocol.vocabulary import ErrorCode, LeaseEndReason, RefusalReason

__all__ = [
    "CCID_PREFIX_LEN",
    "DEFAULT_PORT",
    "HEADER_LEN",
    "HEARTBEAT_MISSES",
    "MAX_CCID_MESSAGE",
    "MAX_CCID_PAYLOAD",
    "MAX_CONTROL_PAYLOAD",
    "MESSAGE_TYPES",
    "MIN_CCID_MESSAGE",
    "MIN_INTERRUPT_MESSAGE",
    "PROTOCOL_VERSION",
    "AdminRequest",
    "AdminResponse",
    "CcidFrame",
    "ClientHello",
    "ConnectionClosed",
    "ErrorCode",
    "ErrorMessage",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Goodbye",
    "LeaseEndReason",
    "LeaseEnded",
    "LeaseExchange",
    "LeaseGranted",
    "LeaseQueued",
    "LeaseRelease",
    "LeaseRequest",
    "Message",
    "Ping",
    "Pong",
    "Prefetched",
    "RefusalReason",
    "Refused",
    "SpeculationPaths",
    "TokenStatus",
    "Welcome",
    "decode_message",
    "encode_message",
    "frame_header",
    "frame_type_of",
    "max_payload",
]

PROTOCOL_VERSION: Final = 2
"""Major version carried by Welcome, Refused and ClientHello; a peer with another is refused.
2: LeaseExchange, Prefetched and SpeculationPaths (issue 17, docs/protocol.md §5.4)."""
DEFAULT_PORT: Final = 7447
HEARTBEAT_MISSES: Final = 3
"""A peer silent for this many heartbeat intervals is considered dead."""

_CCID_PREFIX: Final = struct.Struct(">HI")


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    version: int
    server: str
    identity: str
    heartbeat_interval: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    version: int
    code: CloseCode
    reason: RefusalReason | str  # a plain str only when received: an unknown word (vocabulary.py)
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    version: int
    software: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenStatus:
    token_id: int
    name: str
    present: bool
    allowed: bool
    atr: bytes
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequest:
    token_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseQueued:
    token_id: int
    position: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseGranted:
    token_id: int
    epoch: int
    atr: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRelease:
    token_id: int
    epoch: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseEnded:
    token_id: int
    epoch: int
    reason: LeaseEndReason | str  # a plain str only when received: an unknown word


@dataclass(frozen=True, slots=True, kw_only=True)
class CcidFrame:
    token_id: int
    epoch: int
    message: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    nonce: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMessage:
    code: ErrorCode | str  # a plain str only when received: an unknown word
    message: str
    token_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminRequest:
    request_id: int
    action: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminResponse:
    request_id: int
    ok: bool
    result: dict[str, Any]
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye:
    code: CloseCode
    reason: str


Message: TypeAlias = (
    Welcome
    | Refused
    | ClientHello
    | TokenStatus
    | LeaseRequest
    | LeaseQueued
    | LeaseGranted
    | LeaseRelease
    | LeaseEnded
    | CcidFrame
    | Ping
    | Pong
    | ErrorMessage
    | AdminRequest
    | AdminResponse
    | Goodbye
    | LeaseExchange
    | Prefetched
    | SpeculationPaths
)

_V, _T, _U16, _U32 = Kind.VERSION, Kind.TEXT, Kind.U16, Kind.U32
# Every control message: its frame type and (field, kind) in dataclass order. CCID is binary.
_CONTROL: Final[dict[type[Message], tuple[FrameType, tuple[tuple[str, Kind], ...]]]] = {
    Welcome: (
        FrameType.WELCOME,
        (("version", _V), ("server", _T), ("identity", _T), ("heartbeat_interval", Kind.INTERVAL)),
    ),
    Refused: (
        FrameType.REFUSED,
        (("version", _V), ("code", Kind.CLOSE_CODE), ("reason", Kind.REFUSAL_REASON), ("message", _T)),
    ),
    ClientHello: (FrameType.CLIENT_HELLO, (("version", _V), ("software", _T))),
    TokenStatus: (
        FrameType.TOKEN_STATUS,
        (
            ("token_id", _U16),
            ("name", _T),
            ("present", Kind.BOOL),
            ("allowed", Kind.BOOL),
            ("atr", Kind.ATR),
            ("state", _T),
        ),
    ),
    LeaseRequest: (FrameType.LEASE_REQUEST, (("token_id", _U16),)),
    LeaseQueued: (FrameType.LEASE_QUEUED, (("token_id", _U16), ("position", _U32))),
    LeaseGranted: (FrameType.LEASE_GRANTED, (("token_id", _U16), ("epoch", _U32), ("atr", Kind.ATR))),
    LeaseRelease: (FrameType.LEASE_RELEASE, (("token_id", _U16), ("epoch", _U32))),
    LeaseEnded: (
        FrameType.LEASE_ENDED,
        (("token_id", _U16), ("epoch", _U32), ("reason", Kind.LEASE_END_REASON)),
    ),
    Ping: (FrameType.PING, (("nonce", Kind.U64),)),
    Pong: (FrameType.PONG, (("nonce", Kind.U64),)),
    ErrorMessage: (FrameType.ERROR, (("code", Kind.ERROR_CODE), ("message", _T), ("token_id", Kind.OPT_U16))),
    AdminRequest: (FrameType.ADMIN_REQUEST, (("request_id", _U32), ("action", _T), ("args", Kind.OBJECT))),
    AdminResponse: (
        FrameType.ADMIN_RESPONSE,
        (("request_id", _U32), ("ok", Kind.BOOL), ("result", Kind.DOCUMENT), ("error", _T)),
    ),
    Goodbye: (FrameType.GOODBYE, (("code", Kind.CLOSE_CODE), ("reason", _T))),
}
_CONTROL_BY_TYPE: Final = {ftype: (cls, schema) for cls, (ftype, schema) in _CONTROL.items()}
# Binary messages of protocol/speculation.py: the frame type carrying each.
_BINARY: Final[dict[type[Message], FrameType]] = {
    LeaseExchange: FrameType.LEASE_EXCHANGE,
    Prefetched: FrameType.PREFETCHED,
    SpeculationPaths: FrameType.SPECULATION_PATHS,
}
_BINARY_BY_TYPE: Final = {ftype: cls for cls, ftype in _BINARY.items()}
MESSAGE_TYPES: Final[tuple[type[Message], ...]] = (*_CONTROL, CcidFrame, *_BINARY)


def frame_type_of(msg_type: type[Message]) -> FrameType:
    """The frame type that carries messages of class `msg_type`."""
    if msg_type in _BINARY:
        return _BINARY[msg_type]
    return FrameType.CCID if msg_type is CcidFrame else _CONTROL[msg_type][0]


def encode_message(
    msg: Message, *, max_control_payload: int = MAX_CONTROL_PAYLOAD, max_ccid_payload: int = MAX_CCID_PAYLOAD
) -> bytes:
    """Encode `msg` as one whole frame (header + payload).

    Raises:
        LocalProtocolError: `msg` is not a bridge message, a field is out of range, or the
            payload exceeds the limit for its frame type.
    """
    if isinstance(msg, CcidFrame):
        payload, limit = _encode_ccid(msg), max_ccid_payload
    elif isinstance(msg, LeaseExchange | Prefetched | SpeculationPaths):
        try:
            payload, limit = encode_payload(msg), max_ccid_payload
        except ValueError as exc:
            raise LocalProtocolError(f"{type(msg).__name__}: {exc}") from None
    elif type(msg) in _CONTROL:
        payload, limit = _encode_control(msg), max_control_payload
    else:
        raise LocalProtocolError(f"not a bridge message: {type(msg).__name__}")
    ftype = frame_type_of(type(msg))
    limit = max_payload(ftype, max_control=max_control_payload, max_ccid=limit)
    if len(payload) > limit:
        raise LocalProtocolError(f"{ftype.name.lower()} payload of {len(payload)} bytes exceeds {limit}")
    return frame_header(ftype, len(payload)) + payload


def _encode_control(msg: Message) -> bytes:
    ftype, schema = _CONTROL[type(msg)]
    obj: dict[str, object] = {}
    for name, kind in schema:
        try:
            obj[name] = to_json(kind, getattr(msg, name))
        except ValueError as exc:
            raise LocalProtocolError(f"{ftype.name.lower()}.{name}: {exc}") from None
    # Compact separators and UTF-8 text: the canonical form shown in docs/protocol.md.
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _encode_ccid(msg: CcidFrame) -> bytes:
    for name, value, high in (("token_id", msg.token_id, 0xFFFF), ("epoch", msg.epoch, 0xFFFF_FFFF)):
        if type(value) is not int or not 0 <= value <= high:
            raise LocalProtocolError(f"ccid.{name}: expected an integer 0..{high}, got {value!r}")
    if type(msg.message) is not bytes:
        raise LocalProtocolError(f"ccid.message: expected bytes, got {type(msg.message).__name__}")
    problem = _ccid_size_problem(msg.message)
    if problem:
        raise LocalProtocolError(f"ccid.message: {problem}")
    return _CCID_PREFIX.pack(msg.token_id, msg.epoch) + msg.message


def decode_message(frame_type: FrameType, payload: bytes) -> Message:
    """Decode one frame's payload into its message.

    Raises:
        MalformedFrameError: bad JSON, wrong/missing/unknown keys, a field out of range, or a
            CCID payload of the wrong size.
    """
    if frame_type is FrameType.CCID:
        return _decode_ccid(payload)
    if frame_type in _BINARY_BY_TYPE:
        try:
            return decode_payload(_BINARY_BY_TYPE[frame_type], payload)  # type: ignore[arg-type]
        except ValueError as exc:
            raise MalformedFrameError(f"{frame_type.name.lower()}: {exc}") from None
    cls, schema = _CONTROL_BY_TYPE[frame_type]
    where = frame_type.name.lower()
    obj = _parse_json_object(payload, where)
    names = [name for name, _ in schema]
    if set(obj) != set(names):
        missing, unknown = sorted(set(names) - set(obj)), sorted(set(obj) - set(names))
        raise MalformedFrameError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    kwargs: dict[str, Any] = {}
    for name, kind in schema:
        try:
            kwargs[name] = from_json(kind, obj[name])
        except ValueError as exc:
            raise MalformedFrameError(f"{where}.{name}: {exc}") from None
    return cls(**kwargs)


def _parse_json_object(payload: bytes, where: str) -> dict[str, object]:
    try:
        obj = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise MalformedFrameError(f"{where}: payload is not UTF-8 JSON: {exc}") from None
    if type(obj) is not dict:
        raise MalformedFrameError(f"{where}: payload is a JSON {type(obj).__name__}, not an object")
    return obj


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")  # NaN, Infinity, -Infinity are not JSON


def _decode_ccid(payload: bytes) -> CcidFrame:
    if len(payload) < CCID_PREFIX_LEN:
        raise MalformedFrameError(f"ccid: payload of {len(payload)} bytes is shorter than its prefix")
    message = bytes(payload[CCID_PREFIX_LEN:])
    problem = _ccid_size_problem(message)
    if problem:
        raise MalformedFrameError(f"ccid: {problem}")
    token_id, epoch = _CCID_PREFIX.unpack_from(payload)
    return CcidFrame(token_id=token_id, epoch=epoch, message=message)


def _ccid_size_problem(message: bytes) -> str:
    """Why `message` cannot be one CCID message, or "" if its size is fine."""
    interrupt = message[:1] in (b"\x50", b"\x51")  # CCID §6.3: NotifySlotChange / HardwareError
    minimum = MIN_INTERRUPT_MESSAGE if interrupt else MIN_CCID_MESSAGE
    if minimum <= len(message) <= MAX_CCID_MESSAGE:
        return ""
    return f"message of {len(message)} bytes is outside {minimum}..{MAX_CCID_MESSAGE}"
