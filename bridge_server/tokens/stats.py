"""Per-token counters the token task feeds and `status` and `/metrics` read (plain sync bookkeeping).

Kept apart from the metrics endpoint so the token manager depends on its counters only, not on
the code that renders them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Final

from protocol.runtime.metrics import HOLD_BUCKETS_S, WAIT_BUCKETS_S, DurationHistogram

_CLA_CHAINING: Final = 0x10
# Private-key operations that count as a signature when the card answers 9000 on the last link:
# PIV GENERAL AUTHENTICATE (SP 800-73-4 part 2 §3.2.4, INS 87, any P1P2), and ISO 7816-8 §11
# PERFORM SECURITY OPERATION: COMPUTE DIGITAL SIGNATURE (INS 2A, P1P2 9E9A), which CardOS,
# SafeNet eToken, Starcos and other PKCS#15 cards use.
_INS_GENERAL_AUTHENTICATE: Final = 0x87
_INS_PSO: Final = 0x2A
_PSO_COMPUTE_DIGITAL_SIGNATURE: Final = b"\x9e\x9a"


def is_signature(command: bytes, response: bytes) -> bool:
    """Whether this exchange was a successful, last-link private-key signing operation."""
    if len(command) < 4 or command[0] & _CLA_CHAINING or response[-2:] != b"\x90\x00":
        return False
    ins = command[1]
    return ins == _INS_GENERAL_AUTHENTICATE or (
        ins == _INS_PSO and command[2:4] == _PSO_COMPUTE_DIGITAL_SIGNATURE
    )


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class TokenStats:
    """Per-token counters: leases, waits, holds, APDUs, private-key operations (signatures)."""

    def __init__(self) -> None:
        self.leases_total = 0
        self.lease_ends: Counter[str] = Counter()
        self.apdus_total = 0
        self.signatures_total = 0
        self.wait_seconds = DurationHistogram(WAIT_BUCKETS_S)  # requested -> granted
        self.hold_seconds = DurationHistogram(HOLD_BUCKETS_S)  # granted -> ended
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
        self.wait_seconds.observe(now - self._queued_at.pop(conn_id, now))

    def forget(self, conn_id: int) -> None:
        self._queued_at.pop(conn_id, None)

    def ended(self, held_s: float, reason: str) -> None:
        self.lease_ends[reason] += 1
        self.hold_seconds.observe(held_s)

    def apdu(self, command: bytes, response: bytes, *, today: dt.date | None = None) -> None:
        """Count one exchanged APDU, and a signature when it was one (`is_signature`)."""
        self.apdus_total += 1
        if not is_signature(command, response):
            return
        self.signatures_total += 1
        day = today or _today()
        if day != self._day:
            self._day, self._signatures_day = day, 0
        self._signatures_day += 1

    def signatures_today(self, *, today: dt.date | None = None) -> int:
        return self._signatures_day if (today or _today()) == self._day else 0
