"""Lease policy for one token (DESIGN §4): pure, synchronous, `now` passed in.

Theory of operation
-------------------
A `LeaseBook` owns the answer to "who may talk to this token now". It holds at most one
`Lease` (the holder) and a FIFO of waiters, each with a queue deadline. Every method takes
`now` (trio's clock on the async side, any float in tests) and returns the *events* the
change produced, in order: `Granted`, `Queued` (new or moved position), `Ended` (a lease is
over, with a reason), `Dequeued` (a waiter left the queue without a lease) and `Refusal`
(the request broke a rule; nothing changed). The async token task turns events into wire
messages and card actions; it never decides policy itself.

A holder's lease ends at the earliest of:
- `linger_s` after the holder powered the card off (`note_power_off`), unless a later frame
  from the holder cancels the linger (`note_frame`): clients power off between signing
  steps and should keep the token if they come straight back;
- `idle_timeout_s` after the holder's last CCID frame;
- `max_hold_s` after the grant;
- a release, a disconnect, heartbeat loss, token unplug, revoke or shutdown.
`next_deadline()` tells the async side how long it may sleep; `tick(now)` applies expiries.

Every grant carries an epoch, a u32 that strictly increases per token. Frames carry the
epoch they were sent under, so a frame from an earlier lease (delayed in a buffer, or from
a client that missed its LeaseEnded) is refused rather than run under a newer holder. The
first epoch comes from wall time so a restarted server does not hand out an epoch that a
stale client may still hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from protocol.vocabulary import ErrorCode, LeaseEndReason

EPOCH_MAX: Final = 0xFFFFFFFF  # wire: epoch is u32be


# One vocabulary for the server's bookkeeping and the wire's LeaseEnded.reason.
EndReason = LeaseEndReason


def initial_epoch(wall_time: float) -> int:
    """A lower bound for the first epoch: whole seconds of wall time (bridge_server/tokens/epochs.py adds the
    persisted high-water mark that makes epochs unique across restarts)."""
    return max(1, int(wall_time) & EPOCH_MAX)


@dataclass(frozen=True, slots=True)
class Granted:
    conn_id: int
    identity: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Queued:
    conn_id: int
    position: int  # 1 = next in line


@dataclass(frozen=True, slots=True)
class Ended:
    conn_id: int
    identity: str
    epoch: int
    reason: EndReason
    held_s: float
    apdus: int


@dataclass(frozen=True, slots=True)
class Dequeued:
    conn_id: int
    reason: EndReason


@dataclass(frozen=True, slots=True)
class Refusal:
    conn_id: int
    code: ErrorCode  # the ErrorMessage code the client gets


LeaseEvent = Granted | Queued | Ended | Dequeued | Refusal


@dataclass(slots=True)
class Lease:
    conn_id: int
    identity: str
    epoch: int
    granted_at: float
    last_frame_at: float
    linger_until: float | None = None
    apdus: int = 0


@dataclass(slots=True)
class _Waiter:
    conn_id: int
    identity: str
    deadline: float


class LeaseBook:
    """One token's holder, FIFO queue and deadlines. See the module docstring."""

    def __init__(
        self,
        *,
        linger_s: float,
        idle_timeout_s: float,
        max_hold_s: float,
        first_epoch: int,
        present: bool = True,
    ) -> None:
        if not 1 <= first_epoch <= EPOCH_MAX:
            raise ValueError(f"first_epoch must be 1..{EPOCH_MAX}, not {first_epoch!r}")
        self.set_timeouts(linger_s=linger_s, idle_timeout_s=idle_timeout_s, max_hold_s=max_hold_s)
        self.holder: Lease | None = None
        self.present = present
        self.closed = False
        self._next_epoch = first_epoch
        self._queue: deque[_Waiter] = deque()

    def set_timeouts(self, *, linger_s: float, idle_timeout_s: float, max_hold_s: float) -> None:
        """The lease timings (also at a config reload: they apply from the next deadline check)."""
        self.linger_s = linger_s
        self.idle_timeout_s = idle_timeout_s
        self.max_hold_s = max_hold_s

    # -- queries ---------------------------------------------------------------

    @property
    def waiting(self) -> tuple[int, ...]:
        return tuple(w.conn_id for w in self._queue)

    def knows(self, conn_id: int) -> bool:
        """Whether `conn_id` holds the lease or waits for it (a new request is a duplicate)."""
        held = self.holder is not None and self.holder.conn_id == conn_id
        return held or any(w.conn_id == conn_id for w in self._queue)

    def check_frame(self, conn_id: int, epoch: int) -> ErrorCode | None:
        """None if `conn_id` may send a frame under `epoch`, else the refusal code."""
        if self.holder is None or self.holder.conn_id != conn_id:
            return ErrorCode.LEASE_REQUIRED
        if epoch != self.holder.epoch:
            return ErrorCode.STALE_EPOCH
        return None

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self._queue]
        if self.holder is not None:
            deadlines.append(self._holder_deadline(self.holder)[0])
        return min(deadlines, default=None)

    # -- client actions --------------------------------------------------------

    def request(self, conn_id: int, identity: str, now: float, *, queue_timeout: float) -> list[LeaseEvent]:
        if self.closed:
            return [Refusal(conn_id, ErrorCode.SHUTTING_DOWN)]
        if self.holder is not None and self.holder.conn_id == conn_id:
            return [Refusal(conn_id, ErrorCode.ALREADY_LEASED)]
        if conn_id in self.waiting:
            return [Refusal(conn_id, ErrorCode.ALREADY_LEASED)]
        before = self.waiting
        self._queue.append(_Waiter(conn_id, identity, now + queue_timeout))
        return self._grant_next(now) + self._positions(before)

    def release(self, conn_id: int, epoch: int, now: float) -> list[LeaseEvent]:
        refusal = self.check_frame(conn_id, epoch)
        if refusal is not None:
            return [Refusal(conn_id, refusal)]
        return self.end(now, EndReason.RELEASED)

    def note_frame(self, now: float, *, apdu: bool = False) -> None:
        """The holder sent a frame: it is not idle, and it is not lingering any more."""
        assert self.holder is not None
        self.holder.last_frame_at = now
        self.holder.linger_until = None
        if apdu:
            self.holder.apdus += 1

    def note_power_off(self, now: float) -> None:
        """The holder powered the card off: start the linger (after `note_frame`)."""
        assert self.holder is not None
        self.holder.linger_until = now + self.linger_s

    def drop(self, conn_id: int, now: float, reason: EndReason) -> list[LeaseEvent]:
        """The connection is gone (disconnect, heartbeat loss): free its lease and queue slot."""
        before = self.waiting
        self._queue = deque(w for w in self._queue if w.conn_id != conn_id)
        events: list[LeaseEvent] = []
        if self.holder is not None and self.holder.conn_id == conn_id:
            events += self._end(now, reason)
        return events + self._grant_next(now) + self._positions(before)

    # -- server actions --------------------------------------------------------

    def end(self, now: float, reason: EndReason) -> list[LeaseEvent]:
        """End the current lease (if any) and grant the next waiter."""
        before = self.waiting
        return self._end(now, reason) + self._grant_next(now) + self._positions(before)

    def set_present(self, present: bool, now: float) -> list[LeaseEvent]:
        """The token was unplugged (ends the lease, waiters keep waiting) or came back."""
        self.present = present
        if not present:
            return self._end(now, EndReason.TOKEN_GONE)
        before = self.waiting
        return self._grant_next(now) + self._positions(before)

    def shutdown(self, now: float) -> list[LeaseEvent]:
        """End everything for good: the holder's lease and every waiter; grant nothing more."""
        self.closed = True
        events = self._end(now, EndReason.SHUTDOWN)
        events += [Dequeued(w.conn_id, EndReason.SHUTDOWN) for w in self._queue]
        self._queue.clear()
        return events

    def tick(self, now: float) -> list[LeaseEvent]:
        """Apply every deadline that has passed at `now`."""
        before = self.waiting
        expired = [w for w in self._queue if w.deadline <= now]
        events: list[LeaseEvent] = []
        for w in expired:
            self._queue.remove(w)
            events.append(Dequeued(w.conn_id, EndReason.QUEUE_TIMEOUT))
        if self.holder is not None:
            deadline, reason = self._holder_deadline(self.holder)
            if deadline <= now:
                events += self._end(now, reason)
        return events + self._grant_next(now) + self._positions(before)

    # -- internals -------------------------------------------------------------

    def _holder_deadline(self, lease: Lease) -> tuple[float, EndReason]:
        # On a tie the linger wins: it is the ending the client asked for.
        candidates = [
            (lease.granted_at + self.max_hold_s, 2, EndReason.MAX_HOLD),
            (lease.last_frame_at + self.idle_timeout_s, 1, EndReason.IDLE_TIMEOUT),
        ]
        if lease.linger_until is not None:
            candidates.append((lease.linger_until, 0, EndReason.LINGER_EXPIRED))
        deadline, _, reason = min(candidates)
        return deadline, reason

    def _end(self, now: float, reason: EndReason) -> list[LeaseEvent]:
        lease = self.holder
        if lease is None:
            return []
        self.holder = None
        held_s = now - lease.granted_at
        return [Ended(lease.conn_id, lease.identity, lease.epoch, reason, held_s, lease.apdus)]

    def _grant_next(self, now: float) -> list[LeaseEvent]:
        if self.holder is not None or not self.present or self.closed or not self._queue:
            return []
        waiter = self._queue.popleft()
        epoch = self._next_epoch
        self._next_epoch = epoch + 1 if epoch < EPOCH_MAX else 1
        self.holder = Lease(waiter.conn_id, waiter.identity, epoch, granted_at=now, last_frame_at=now)
        return [Granted(waiter.conn_id, waiter.identity, epoch)]

    def _positions(self, before: tuple[int, ...]) -> list[LeaseEvent]:
        """`Queued` for every waiter that is new or whose position changed since `before`."""
        old = {conn_id: i for i, conn_id in enumerate(before)}
        return [Queued(c, i + 1) for i, c in enumerate(self.waiting) if old.get(c) != i]
