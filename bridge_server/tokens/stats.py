"""Per-token counters the token task feeds and `status` and `/metrics` read (plain sync bookkeeping).

Kept apart from the metrics endpoint so the token manager depends on its counters only, not on
the code that renders them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Final

_INS_GENERAL_AUTHENTICATE: Final = 0x87
_CLA_CHAINING: Final = 0x10


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class TokenStats:
    """Per-token counters: leases, waits, holds, APDUs, private-key operations (signatures)."""

    def __init__(self) -> None:
        self.leases_total = 0
        self.lease_ends: Counter[str] = Counter()
        self.apdus_total = 0
        self.signatures_total = 0
        self.wait_seconds_sum = 0.0
        self.hold_seconds_sum = 0.0
        self.holds = 0
        self.round_trips_total = 0  # client messages waited on, over all ended leases (issue 17)
        self._day = _today()
        self._signatures_day = 0
        self._queued_at: dict[int, float] = {}

    def requested(self, conn_id: int, now: float) -> None:
        self._queued_at.setdefault(conn_id, now)

    def queued_since(self, conn_id: int) -> float | None:
        return self._queued_at.get(conn_id)

    def granted(self, conn_id: int, now: float) -> None:
        self.leases_total += 1
        self.wait_seconds_sum += max(0.0, now - self._queued_at.pop(conn_id, now))

    def forget(self, conn_id: int) -> None:
        self._queued_at.pop(conn_id, None)

    def ended(self, held_s: float, reason: str) -> None:
        self.lease_ends[reason] += 1
        self.hold_seconds_sum += held_s
        self.holds += 1

    def apdu(self, command: bytes, response: bytes, *, today: dt.date | None = None) -> None:
        """Count one exchanged APDU; a successful last-link GENERAL AUTHENTICATE is a signature."""
        self.apdus_total += 1
        if len(command) < 4 or command[1] != _INS_GENERAL_AUTHENTICATE or command[0] & _CLA_CHAINING:
            return
        if response[-2:] != b"\x90\x00":
            return
        self.signatures_total += 1
        day = today or _today()
        if day != self._day:
            self._day, self._signatures_day = day, 0
        self._signatures_day += 1

    def signatures_today(self, *, today: dt.date | None = None) -> int:
        return self._signatures_day if (today or _today()) == self._day else 0
