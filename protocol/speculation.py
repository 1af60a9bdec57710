"""Verified speculation: the pure rules and codecs that cut a signature's round trips (issue 17).

Theory of operation
-------------------
A signing process reads the card afresh every time: SELECT, discovery, CHUID, certificates,
GET RESPONSE chains. Those answers do not change between two signatures, and on a real
network each costs a round trip. Two mechanisms remove them, neither of which ever lets a
wrong answer stand:

1. **GET RESPONSE prefetch (within a lease).** When the card answers an APDU with `61xx`, the
   server sends the GET RESPONSE the application would send next (`00 C0 00 00 xx`, ISO 7816-4
   §7.6.1: Le = SW2, 00 meaning 256) and repeats while the card answers `61xx`, then hands the
   client the whole chain as `Prefetched` steps. The client answers the application's GET
   RESPONSEs from them when they are byte for byte the commands the server sent; an application
   that sends anything else sees the card removed (it would otherwise talk to a card whose
   chain is already consumed).
2. **Taught paths (across leases).** The server records, per token, the command → response
   steps the card gave from its power-on (the grant's cold reset) up to, not including, the
   first command that is not a plain read (`speculable_command`): VERIFY and everything after
   it, GET CHALLENGE, crypto, management. What it records is therefore what any client allowed
   on the token reads without a PIN. It teaches the paths to the token's allowed clients
   (`SpeculationPaths`). A client without a lease whose application follows a taught path
   answers from it and defers the real exchanges; at the first APDU it cannot answer it sends
   `LeaseExchange`: the lease request, the deferred steps with the answers it already gave, and
   the live command. The server replays the deferred commands on the freshly reset card, in
   order, through the same guard, policy and audit path, and compares each answer with the
   promised one; a single difference ends the lease as `card_changed` and the client shows
   the card removed.

This module holds what both daemons share: the command classifier, the GET RESPONSE rule, the
binary codec of step lists (`pack_steps`/`unpack_steps`), the path merge the server keeps
(`merge_path`) and the trie the client walks (`PathTrie`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from protocol._framing import MAX_CCID_MESSAGE, MAX_SPECULATION_PAYLOAD, MIN_CCID_MESSAGE
from protocol.apdu import CommandApdu
from protocol.errors import MalformedApduError

__all__ = [
    "MAX_PATHS",
    "MAX_SPECULATION_PAYLOAD",
    "MAX_STEPS",
    "MAX_STEPS_BYTES",
    "MAX_STEP_BYTES",
    "SPECULABLE_INS",
    "LeaseExchange",
    "PathTrie",
    "Prefetched",
    "SpeculationPaths",
    "Step",
    "decode_payload",
    "encode_payload",
    "get_response_for",
    "merge_path",
    "pack_steps",
    "paths_size",
    "speculable_command",
    "unpack_steps",
]

Step: TypeAlias = tuple[bytes, bytes]
"""One exchange at the card: (command APDU, response APDU including its status word)."""

MAX_STEPS: Final = 512
"""Most steps in one list (a taught path, a deferred batch, a prefetched chain)."""
MAX_STEP_BYTES: Final = 65546 + 10
"""Longest command or response in a step: an extended APDU (CCID abData bound)."""
MAX_STEPS_BYTES: Final = 256 * 1024
"""Most APDU bytes in one step list, and in all the paths of one `SpeculationPaths`."""
MAX_PATHS: Final = 16
"""Most taught paths per token (one per signing tool and card layout is plenty)."""

# ISO 7816-4 §5.1: read-only instructions whose answer depends only on the card's content and
# the commands since power-on. SELECT, READ BINARY (both), READ RECORD (both), GET DATA (both),
# GET RESPONSE. Nothing else is ever answered speculatively.
SPECULABLE_INS: Final = frozenset({0xA4, 0xB0, 0xB1, 0xB2, 0xB3, 0xCA, 0xCB, 0xC0})
_INS_GET_RESPONSE: Final = 0xC0
_MAX_SHORT_NE: Final = 256
_MAX_EXTENDED_NE: Final = 65536
_LEN: Final = struct.Struct(">I")
_COUNT: Final = struct.Struct(">H")


def speculable_command(apdu: bytes) -> bool:
    """True for a plain interindustry read (`SPECULABLE_INS`) in the basic channel, no chaining,
    no secure messaging: CLA exactly 00 (ISO 7816-4 §5.4.1). Everything else ends a path."""
    return len(apdu) >= 4 and apdu[0] == 0x00 and apdu[1] in SPECULABLE_INS


def get_response_for(command: bytes, response: bytes) -> bytes | None:
    """The GET RESPONSE an application sends after `response`, or None if it sends none.

    ISO 7816-4 §5.1.3: SW1 = 61 means SW2 more bytes (00: 256 or more) wait for GET RESPONSE
    with Le = SW2 (OpenSC's `sc_get_response`). Only when the application wants them: the
    command asked for as much as it could (Le 256, or 65536 extended) or was itself a GET
    RESPONSE. A read with a small Le (OpenSC's PIV driver reads an object's first 8 bytes to
    learn its length, gets 61xx, and then reads the whole object afresh) is left alone, or the
    card would spend time on a chain nobody reads. Basic channel without secure messaging only
    (CLA 00, or 10 on the last-but-one link of a chain), as `iso7816_get_response` sends CLA 00.
    """
    if len(response) < 2 or response[-2] != 0x61 or len(command) < 4 or command[0] not in (0x00, 0x10):
        return None
    if command[1] != _INS_GET_RESPONSE:
        try:
            ne = CommandApdu.parse(command).ne
        except MalformedApduError:
            return None
        if ne not in (_MAX_SHORT_NE, _MAX_EXTENDED_NE):
            return None
    return bytes((0x00, _INS_GET_RESPONSE, 0x00, 0x00, response[-1]))


def pack_steps(steps: Sequence[Step]) -> bytes:
    """`count:u16` then per step `len:u32 command len:u32 response` (docs/protocol.md §5.4).

    Raises ValueError beyond `MAX_STEPS`, `MAX_STEP_BYTES` or `MAX_STEPS_BYTES`.
    """
    if len(steps) > MAX_STEPS:
        raise ValueError(f"{len(steps)} steps exceed {MAX_STEPS}")
    parts = [_COUNT.pack(len(steps))]
    total = 0
    for command, response in steps:
        for blob in (command, response):
            if type(blob) is not bytes or len(blob) > MAX_STEP_BYTES:
                raise ValueError(f"a step holds {type(blob).__name__} or more than {MAX_STEP_BYTES} bytes")
            total += len(blob)
            parts += (_LEN.pack(len(blob)), blob)
    if total > MAX_STEPS_BYTES:
        raise ValueError(f"steps of {total} bytes exceed {MAX_STEPS_BYTES}")
    return b"".join(parts)


def unpack_steps(buf: bytes, offset: int = 0) -> tuple[list[Step], int]:
    """Decode what `pack_steps` wrote at `offset`; return the steps and the offset after them.

    Raises ValueError on a truncated buffer or any bound `pack_steps` enforces.
    """
    count, offset = _read(_COUNT, buf, offset)
    if count > MAX_STEPS:
        raise ValueError(f"{count} steps exceed {MAX_STEPS}")
    steps: list[Step] = []
    total = 0
    for _ in range(count):
        blobs = []
        for _half in range(2):
            length, offset = _read(_LEN, buf, offset)
            if length > MAX_STEP_BYTES or offset + length > len(buf):
                raise ValueError(f"a step of {length} bytes is too long or truncated")
            total += length
            if total > MAX_STEPS_BYTES:
                raise ValueError(f"steps exceed {MAX_STEPS_BYTES} bytes")
            blobs.append(bytes(buf[offset : offset + length]))
            offset += length
        steps.append((blobs[0], blobs[1]))
    return steps, offset


def _read(fmt: struct.Struct, buf: bytes, offset: int) -> tuple[int, int]:
    if offset + fmt.size > len(buf):
        raise ValueError("truncated step list")
    (value,) = fmt.unpack_from(buf, offset)
    return int(value), offset + fmt.size


def paths_size(paths: Iterable[Sequence[Step]]) -> int:
    """APDU bytes in `paths` (the bound `MAX_STEPS_BYTES` applies to this)."""
    return sum(len(c) + len(r) for path in paths for c, r in path)


def _conflicts(a: Sequence[Step], b: Sequence[Step]) -> bool:
    """Same commands from power-on, then the same command with another answer: the card differs."""
    for (cmd_a, resp_a), (cmd_b, resp_b) in zip(a, b, strict=False):
        if cmd_a != cmd_b:
            return False
        if resp_a != resp_b:
            return True
    return False


def _is_prefix(short: Sequence[Step], long: Sequence[Step]) -> bool:
    return len(short) <= len(long) and tuple(long[: len(short)]) == tuple(short)


def merge_path(
    paths: Sequence[tuple[Step, ...]], new: tuple[Step, ...]
) -> tuple[list[tuple[Step, ...]], bool]:
    """The paths to keep after recording `new`, and whether an old one contradicted it.

    A contradiction (same commands, another answer) means the card's content changed: every
    old path goes, only `new` stays. A path that is a prefix of another adds nothing. The newest
    path comes first; beyond `MAX_PATHS` or `MAX_STEPS_BYTES` the oldest are dropped.
    """
    if not new:
        return list(paths), False
    if any(_conflicts(old, new) for old in paths):
        return [new], True
    if any(_is_prefix(new, old) for old in paths):
        return list(paths), False
    kept = [new, *(old for old in paths if not _is_prefix(old, new))][:MAX_PATHS]
    while len(kept) > 1 and paths_size(kept) > MAX_STEPS_BYTES:
        kept.pop()
    return kept, False


class PathTrie:
    """The client's view of the taught paths: which answer follows which commands from power-on.

    `answer(position, command)` gives the next position and the taught response, or None when
    the command leaves every path. Positions are opaque ints; `ROOT` is the card just reset.
    """

    ROOT: Final = 0

    def __init__(self, paths: Iterable[Sequence[Step]] = ()) -> None:
        self._edges: dict[tuple[int, bytes], tuple[int, bytes]] = {}
        self._nodes = 1
        for path in paths:
            self._add(path)

    def __len__(self) -> int:
        """Number of taught steps (trie edges)."""
        return len(self._edges)

    def _add(self, path: Sequence[Step]) -> None:
        node = self.ROOT
        for command, response in path:
            edge = self._edges.get((node, command))
            if edge is None:
                edge = self._edges[(node, command)] = (self._nodes, response)
                self._nodes += 1
            elif edge[1] != response:
                return  # a contradicting path (the server never sends one): keep the first answer
            node = edge[0]

    def answer(self, position: int, command: bytes) -> tuple[int, bytes] | None:
        return self._edges.get((position, command))


# -- the three binary messages (docs/protocol.md §5.4); protocol.wire frames them ---------------

assert (
    MAX_STEPS_BYTES + MAX_PATHS * (_COUNT.size + 8 * MAX_STEPS) + 8 + MAX_CCID_MESSAGE
    == MAX_SPECULATION_PAYLOAD
)
_TOKEN: Final = struct.Struct(">H")
_TOKEN_EPOCH: Final = struct.Struct(">HI")


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseExchange:
    """C→S: request the lease; once granted, replay `deferred` and then run `message` (CCID)."""

    token_id: int
    deferred: tuple[Step, ...]
    message: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Prefetched:
    """S→C: the GET RESPONSE chain the server already ran after the CCID answer that follows."""

    token_id: int
    epoch: int
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeculationPaths:
    """S→C: the paths from power-on a client may answer from while it holds no lease."""

    token_id: int
    paths: tuple[tuple[Step, ...], ...]


SpeculationMessage: TypeAlias = LeaseExchange | Prefetched | SpeculationPaths


def _check_int(name: str, value: object, high: int) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise ValueError(f"{name}: expected an integer 0..{high}, got {value!r}")
    return value


def encode_payload(msg: SpeculationMessage) -> bytes:
    """The payload of `msg`'s frame. Raises ValueError on a field out of its bounds."""
    token = _check_int("token_id", msg.token_id, 0xFFFF)
    if isinstance(msg, LeaseExchange):
        if type(msg.message) is not bytes or not MIN_CCID_MESSAGE <= len(msg.message) <= MAX_CCID_MESSAGE:
            raise ValueError(
                f"message: a CCID message of {MIN_CCID_MESSAGE}..{MAX_CCID_MESSAGE} bytes expected"
            )
        return _TOKEN.pack(token) + pack_steps(msg.deferred) + msg.message
    if isinstance(msg, Prefetched):
        epoch = _check_int("epoch", msg.epoch, 0xFFFF_FFFF)
        return _TOKEN_EPOCH.pack(token, epoch) + pack_steps(msg.steps)
    if len(msg.paths) > MAX_PATHS or paths_size(msg.paths) > MAX_STEPS_BYTES:
        raise ValueError(f"paths: more than {MAX_PATHS} paths or {MAX_STEPS_BYTES} bytes")
    return b"".join([_TOKEN.pack(token), _COUNT.pack(len(msg.paths)), *(pack_steps(p) for p in msg.paths)])


def decode_payload(cls: type[SpeculationMessage], payload: bytes) -> SpeculationMessage:
    """Decode a payload `encode_payload` wrote for a `cls`. Raises ValueError if malformed."""
    fixed = {LeaseExchange: 2, Prefetched: 6, SpeculationPaths: 4}[cls]
    if len(payload) < fixed:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than its fixed fields")
    if cls is LeaseExchange:
        (token,) = _TOKEN.unpack_from(payload)
        steps, offset = unpack_steps(payload, fixed)
        message = bytes(payload[offset:])
        if not MIN_CCID_MESSAGE <= len(message) <= MAX_CCID_MESSAGE:
            raise ValueError(f"message of {len(message)} bytes is not a CCID message")
        return LeaseExchange(token_id=token, deferred=tuple(steps), message=message)
    if cls is Prefetched:
        token, epoch = _TOKEN_EPOCH.unpack_from(payload)
        steps, offset = unpack_steps(payload, fixed)
        _at_end(payload, offset)
        return Prefetched(token_id=token, epoch=epoch, steps=tuple(steps))
    token, count = struct.unpack_from(">HH", payload)
    if count > MAX_PATHS:
        raise ValueError(f"{count} paths exceed {MAX_PATHS}")
    paths: list[tuple[Step, ...]] = []
    offset = fixed
    for _ in range(count):
        path, offset = unpack_steps(payload, offset)
        paths.append(tuple(path))
    _at_end(payload, offset)
    if paths_size(paths) > MAX_STEPS_BYTES:
        raise ValueError(f"paths exceed {MAX_STEPS_BYTES} bytes")
    return SpeculationPaths(token_id=token, paths=tuple(paths))


def _at_end(payload: bytes, offset: int) -> None:
    if offset != len(payload):
        raise ValueError(f"{len(payload) - offset} bytes after the last step")
