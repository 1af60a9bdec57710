"""How much repetition a client gets before it costs the server (issue 13 item 3).

Theory of operation
-------------------
Two things a connected, allowed client can repeat as fast as its link allows: a `LeaseRequest`
while it already holds or waits for the lease (the answer is always `already_leased`), and a
command the policy or the PIN guard refuses. Neither may cost an audit write each time (an
fsync per frame stalls every token's audit and fills the disk) nor go on for ever.

- `RateMeter`: a token bucket per client identity (so reconnecting does not refill it). Each
  repetition takes one token; the bucket refills at `rate_per_s` up to `burst`. An empty bucket
  means the client keeps at it: the token task disconnects it with
  `Goodbye(TOO_MANY_REQUESTS)` and one `connection.ejected` audit line.
- `RefusalDigest`: per lease, the first `REFUSALS_AUDITED_PER_LEASE` refusals are audited one
  by one (`command.refused`); the rest are only counted, by reason and INS, and written as one
  `command.refused_summary` line when the lease ends or `SUMMARY_INTERVAL_S` after the last
  summary, whichever is first.

- `PenaltyBox`: an ejected identity's new connections are refused (`Refused(TOO_MANY_REQUESTS)`
  right after the handshake) for `PENALTY_S`; only the first refusal of each ban is audited. A
  flooder that reconnects at once otherwise gets a fresh session (and its audit lines) each time.

Duplicate lease requests are never audited (`lease.requested` is written once per request that
changes the queue). Pure and synchronous: `now` is passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

REFUSALS_AUDITED_PER_LEASE: Final = 20
PENALTY_S: Final = 30.0  # an ejected identity's new connections are refused this long
SUMMARY_INTERVAL_S: Final = 60.0
MAX_INS_IN_SUMMARY: Final = 16  # distinct INS bytes named in one summary line
# A client never needs to repeat a LeaseRequest; a burst allows for a retry after a hiccup.
DUPLICATE_REQUESTS = {"rate_per_s": 1.0, "burst": 10.0}
# Refusals happen in normal use (a middleware probing for objects); floods do not.
REFUSED_COMMANDS = {"rate_per_s": 20.0, "burst": 200.0}


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


class RateMeter:
    """Token buckets by client identity. See the module docstring."""

    def __init__(self, *, rate_per_s: float, burst: float) -> None:
        if not (rate_per_s > 0 and burst >= 1):
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}  # bounded: only allowed identities get here

    def take(self, who: str, now: float) -> bool:
        """One repetition by `who`; False when it is over the limit (the bucket is empty)."""
        bucket = self._buckets.setdefault(who, _Bucket(self.burst, now))
        bucket.level = min(self.burst, bucket.level + (now - bucket.at) * self.rate_per_s)
        bucket.at = now
        if bucket.level < 1:
            return False
        bucket.level -= 1
        return True


@dataclass(slots=True)
class RefusalDigest:
    """One lease's refusals: which to audit one by one, and the count of the rest."""

    audited: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    ins: Counter[str] = field(default_factory=Counter)
    last_summary_at: float | None = None  # the first counted refusal starts the interval

    def note(self, reason: str, ins: int, now: float) -> bool:
        """A refusal; True when it is to be audited one by one."""
        if self.audited < REFUSALS_AUDITED_PER_LEASE:
            self.audited += 1
            return True
        if self.last_summary_at is None:
            self.last_summary_at = now
        self.reasons[reason] += 1
        self.ins[f"{ins:02X}"] += 1
        return False

    def summary_due(self, now: float) -> bool:
        last = self.last_summary_at
        return bool(self.reasons) and last is not None and now >= last + SUMMARY_INTERVAL_S

    def take_summary(self, now: float) -> dict[str, object] | None:
        """The fields of a `command.refused_summary` line (None when nothing was counted)."""
        self.last_summary_at = now
        if not self.reasons:
            return None
        fields: dict[str, object] = {
            "count": self.reasons.total(),
            "reasons": dict(self.reasons),
            "ins": dict(self.ins.most_common(MAX_INS_IN_SUMMARY)),
        }
        self.reasons.clear()
        self.ins.clear()
        return fields


class PenaltyBox:
    """Identities ejected for flooding, and until when. See the module docstring."""

    def __init__(self, penalty_s: float = PENALTY_S) -> None:
        self.penalty_s = penalty_s
        self._until: dict[str, float] = {}  # bounded: only allowed identities are ever ejected
        self._reported: set[str] = set()

    def ban(self, who: str, now: float) -> None:
        self._until[who] = now + self.penalty_s
        self._reported.discard(who)

    def remaining(self, who: str, now: float) -> float | None:
        """Seconds left of `who`'s ban, or None when it may connect."""
        until = self._until.get(who)
        if until is None or now >= until:
            return None
        return until - now

    def first_refusal(self, who: str) -> bool:
        """True once per ban: the refusal that is audited and logged."""
        if who in self._reported:
            return False
        self._reported.add(who)
        return True
