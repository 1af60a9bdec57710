"""Who may hold a place in the TLS handshake, before anyone is authenticated (issue 13 item 2).

Theory of operation
-------------------
Before its handshake a peer is nobody: a socket that says nothing costs the attacker one fd and
must not cost an allowed client its connection. A `HandshakeBook` (pure, `now` passed in) keeps
every accepted connection that has not finished its handshake, in one of three stages:

- `HELLO`: reading the first TLS record (the ClientHello), under a short first-flight deadline;
- `QUEUED`: the ClientHello is in, waiting for one of the `max_handshakes` slots;
- `HANDSHAKE`: holding a slot, the expensive part (signatures, certificate checks) running.

`HELLO` and `QUEUED` connections are *waiting*: at most `max_waiting` of them in total and
`max_waiting_per_source` per source address. An arrival over either bound does not get
refused: it evicts the oldest waiting connection of the same source (per-source bound) or of the
source with the most waiting connections (total bound), preferring `HELLO` over `QUEUED`, so a
flood of silent or dribbling sockets churns through itself while a client that sends its
ClientHello at once moves on to a slot. A silent flood never reaches a slot.

A `HANDSHAKE` slot is taken over from the oldest holder once that holder has had it for
`evict_after_s` (a real client needs a few round trips, not seconds), so peers that send a whole
ClientHello and then stall cannot hold the slots for the handshake timeout either.

Sessions (after the handshake) are counted elsewhere (`max_connections`); nothing here waits.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import Final

TLS_HANDSHAKE_RECORD: Final = 0x16  # RFC 8446 §5.1 ContentType.handshake
TLS_RECORD_HEADER: Final = 5  # type (1), legacy_record_version (2), length (2)
MAX_FIRST_RECORD: Final = 2**14 + 256  # RFC 8446 §5.1: a plaintext record is at most 2^14 bytes


def first_record_size(head: bytes) -> int | None:
    """Bytes to read before the TLS library gets the connection: the whole first record.

    None while the header is incomplete; `len(head)` (hand over now, the TLS library reports
    it) when the bytes are not a plausible TLS handshake record.
    """
    if head[:1] and head[0] != TLS_HANDSHAKE_RECORD:
        return len(head)
    if len(head) < TLS_RECORD_HEADER:
        return None
    length = int.from_bytes(head[3:5], "big")
    if length > MAX_FIRST_RECORD:
        return len(head)
    return TLS_RECORD_HEADER + length


class Stage(enum.Enum):
    HELLO = "hello"
    QUEUED = "queued"
    HANDSHAKE = "handshake"


@dataclass(slots=True)
class _Pending:
    source: str
    stage: Stage
    since: float  # arrival, then the moment the slot was taken


@dataclass(frozen=True, slots=True)
class SlotAnswer:
    granted: bool
    evicted: tuple[int, ...] = ()
    retry_at: float | None = None  # not granted: when a slot holder becomes evictable


class HandshakeBook:
    """Pending handshakes by key (a connection number). See the module docstring.

    Every operation is O(1) in the number of pending connections (O(sources) when the total
    bound evicts): a flood makes the server accept and evict at the attacker's pace, so each
    step must stay cheap.
    """

    def __init__(
        self, *, max_waiting: int, max_waiting_per_source: int, max_handshakes: int, evict_after_s: float
    ) -> None:
        if min(max_waiting, max_waiting_per_source, max_handshakes) < 1:
            raise ValueError("handshake bounds must be at least 1")
        self.max_waiting = max_waiting
        self.max_waiting_per_source = max_waiting_per_source
        self.max_handshakes = max_handshakes
        self.evict_after_s = evict_after_s
        self._pending: dict[int, _Pending] = {}
        # Waiting keys per source and stage, oldest first (dicts keep insertion order).
        self._waiting: dict[tuple[str, Stage], dict[int, None]] = {}
        self._per_source: Counter[str] = Counter()
        self._holders: dict[int, None] = {}  # HANDSHAKE keys, oldest slot first
        self.evictions = 0

    @property
    def waiting(self) -> int:
        return self._per_source.total()

    @property
    def handshaking(self) -> int:
        return len(self._holders)

    def arrive(self, key: int, source: str, now: float) -> tuple[int, ...]:
        """A connection was accepted; the keys it evicts (their owners must close them)."""
        self._pending[key] = _Pending(source, Stage.HELLO, now)
        self._add_waiting(key, source, Stage.HELLO)
        evicted: list[int] = []
        while (victim := self._waiting_victim(source)) is not None:
            evicted.append(victim)
            self._evict(victim)
        return tuple(evicted)

    def hello_received(self, key: int) -> None:
        pending = self._pending.get(key)
        if pending is not None and pending.stage is Stage.HELLO:
            self._remove_waiting(key, pending)
            pending.stage = Stage.QUEUED
            self._add_waiting(key, pending.source, Stage.QUEUED)

    def want_slot(self, key: int, now: float) -> SlotAnswer:
        """A `QUEUED` connection asks for a handshake slot (again after `retry_at` or a leave)."""
        pending = self._pending.get(key)
        if pending is None:
            return SlotAnswer(granted=False)  # evicted meanwhile
        evicted: tuple[int, ...] = ()
        if len(self._holders) >= self.max_handshakes:
            oldest_key = next(iter(self._holders))
            evictable_at = self._pending[oldest_key].since + self.evict_after_s
            if now < evictable_at:
                return SlotAnswer(granted=False, retry_at=evictable_at)
            self._evict(oldest_key)
            evicted = (oldest_key,)
        self._remove_waiting(key, pending)
        pending.stage, pending.since = Stage.HANDSHAKE, now
        self._holders[key] = None
        return SlotAnswer(granted=True, evicted=evicted)

    def leave(self, key: int) -> bool:
        """The handshake ended (done, failed or evicted); True when it freed a slot."""
        pending = self._pending.pop(key, None)
        if pending is None:
            return False
        self._forget(key, pending)
        return pending.stage is Stage.HANDSHAKE

    def __contains__(self, key: int) -> bool:
        return key in self._pending

    def _evict(self, key: int) -> None:
        self._forget(key, self._pending.pop(key))
        self.evictions += 1

    def _forget(self, key: int, pending: _Pending) -> None:
        if pending.stage is Stage.HANDSHAKE:
            del self._holders[key]
        else:
            self._remove_waiting(key, pending)

    def _add_waiting(self, key: int, source: str, stage: Stage) -> None:
        self._waiting.setdefault((source, stage), {})[key] = None
        self._per_source[source] += 1

    def _remove_waiting(self, key: int, pending: _Pending) -> None:
        keys = self._waiting[(pending.source, pending.stage)]
        del keys[key]
        if not keys:
            del self._waiting[(pending.source, pending.stage)]
        self._per_source[pending.source] -= 1
        if not self._per_source[pending.source]:
            del self._per_source[pending.source]

    def _waiting_victim(self, source: str) -> int | None:
        if self._per_source[source] > self.max_waiting_per_source:
            victim_source = source
        elif self.waiting > self.max_waiting:
            victim_source = self._per_source.most_common(1)[0][0]
        else:
            return None
        # Oldest first, HELLO before QUEUED: a ClientHello that arrived is worth keeping.
        for stage in (Stage.HELLO, Stage.QUEUED):
            keys = self._waiting.get((victim_source, stage))
            if keys:
                return next(iter(keys))
        raise AssertionError("a source over its bound has no waiting connection")  # unreachable
