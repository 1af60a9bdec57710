"""Fault injection and evidence recording for the simulated token.

Both objects are shared between the thread that drives the simulated USB device (the
server's pyusb worker thread) and the test harness, which arms faults and reads evidence
from another thread. Every read-and-clear ("take") and every counter update therefore
happens under a lock; plain attribute assignment from the harness is atomic under the GIL.

Faults (one-shot unless said otherwise):
- ``stall_next``: the next bulk transfer on the CCID interface fails with EPIPE and its
  command (if it was a write) is dropped, as a halted endpoint would.
- ``delay_next_s``: the next command's answer is held this many seconds; meanwhile the
  device sends CCID time-extension frames (CCID 1.1 §6.2.7, bStatus 0x80).
- ``malformed_next``: the next response is truncated by one byte, so its dwLength lies.
- ``wrong_seq_next``: a stray copy of the next response with another bSeq is sent first,
  as a stale frame from an earlier command would be (libccid drops such frames, §1.3).
- ``t1_resynch_next``: TPDU T=1 tokens only: the card runs the next command, then sends
  S(RESYNCH request) instead of its answer, as a card that lost track of the link would; the
  host resynchs without knowing whether the command ran (a PIN must not be sent again, P2).
- ``slow_sign_s`` (persistent): every GENERAL AUTHENTICATE takes this long, announced
  with time extensions (and with S(WTX) on TPDU tokens when ``wtx_blocks`` is set).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Final, NamedTuple

# Bounded so a long soak test cannot grow the evidence list without limit.
MAX_APDU_RECORDS: Final = 10_000

# CCID 1.1 §6.2.7: bError of a time-extension frame multiplies the host's read timeout.
DEFAULT_WTX_MULTIPLIER: Final = 2


class Faults:
    """Armed faults of one simulated token; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stall_next = False
        self.delay_next_s = 0.0
        self.malformed_next = False
        self.wrong_seq_next = False
        self.t1_resynch_next = False
        self.slow_sign_s = 0.0
        self.wtx_blocks = False
        self.wtx_multiplier = DEFAULT_WTX_MULTIPLIER

    def take_stall(self) -> bool:
        with self._lock:
            armed, self.stall_next = self.stall_next, False
            return armed

    def take_delay(self) -> float:
        with self._lock:
            delay, self.delay_next_s = self.delay_next_s, 0.0
            return max(0.0, float(delay))

    def take_malformed(self) -> bool:
        with self._lock:
            armed, self.malformed_next = self.malformed_next, False
            return armed

    def take_wrong_seq(self) -> bool:
        with self._lock:
            armed, self.wrong_seq_next = self.wrong_seq_next, False
            return armed

    def take_t1_resynch(self) -> bool:
        with self._lock:
            armed, self.t1_resynch_next = self.t1_resynch_next, False
            return armed

    def clear(self) -> None:
        """Disarm everything (the persistent slow signature included)."""
        with self._lock:
            self.stall_next = False
            self.delay_next_s = 0.0
            self.malformed_next = False
            self.wrong_seq_next = False
            self.t1_resynch_next = False
            self.slow_sign_s = 0.0
            self.wtx_blocks = False


class ApduRecord(NamedTuple):
    """One command APDU as the card saw it, with the lease epoch the harness had set."""

    epoch: int | None
    ins: int
    cla: int


@dataclass
class EvidenceCounters:
    """A consistent snapshot of the counters (see `Evidence.snapshot`)."""

    power_ons: int = 0
    power_offs: int = 0
    warm_resets: int = 0
    pin_attempts: int = 0
    signatures: int = 0
    apdus: int = 0


# ISO 7816-4: VERIFY; NIST SP 800-73-4 §3.2.4: GENERAL AUTHENTICATE.
_INS_VERIFY: Final = 0x20
_INS_GENERAL_AUTHENTICATE: Final = 0x87
# ISO 7816-4 §5.1.1: CLA bit 5 set = command chaining, "more to come".
_CLA_CHAINING: Final = 0x10


def _has_command_data(apdu: bytes) -> bool:
    # ISO 7816-4 §5.1: case 1 is 4 bytes, case 2 short is 5, case 2 extended is 7 with a
    # 00 marker; anything longer carries Lc and data.
    return len(apdu) >= 6 and not (len(apdu) == 7 and apdu[4] == 0)


class Evidence:
    """What the card saw: APDUs with the epoch that sent them, power cycles, PINs, signatures."""

    def __init__(self, *, max_records: int = MAX_APDU_RECORDS) -> None:
        self._lock = threading.Lock()
        self._records: deque[ApduRecord] = deque(maxlen=max_records)
        self._counters = EvidenceCounters()
        # One ordered log of what the card saw: ("apdu", epoch, ins), ("power_on", epoch, warm),
        # ("power_off", epoch, 0) -- proves leases never overlapped and the card was reset between.
        self._events: deque[tuple[str, int | None, int]] = deque(maxlen=max_records)
        self._epoch: int | None = None  # the epoch of the last APDU, stamped on power events

    def record_apdu(self, apdu: bytes, epoch: int | None) -> None:
        if len(apdu) < 4:
            return
        cla, ins = apdu[0], apdu[1]
        with self._lock:
            self._records.append(ApduRecord(epoch, ins, cla))
            self._events.append(("apdu", epoch, ins))
            self._epoch = epoch
            self._counters.apdus += 1
            if ins == _INS_VERIFY and _has_command_data(apdu):
                self._counters.pin_attempts += 1
            # Only the last link of an ISO-chained command is one signature.
            if ins == _INS_GENERAL_AUTHENTICATE and not cla & _CLA_CHAINING:
                self._counters.signatures += 1

    def record_power_on(self, *, warm: bool) -> None:
        with self._lock:
            self._counters.power_ons += 1
            self._events.append(("power_on", self._epoch, int(warm)))
            if warm:
                self._counters.warm_resets += 1

    def record_power_off(self) -> None:
        with self._lock:
            self._counters.power_offs += 1
            self._events.append(("power_off", self._epoch, 0))

    @property
    def apdus(self) -> list[ApduRecord]:
        with self._lock:
            return list(self._records)

    @property
    def events(self) -> list[tuple[str, int | None, int]]:
        """The ordered log: ("apdu", epoch, ins) / ("power_on", last epoch, warm) / ("power_off", ...)."""
        with self._lock:
            return list(self._events)

    def epochs(self) -> list[int | None]:
        """The epoch of every recorded APDU, in order (for exclusivity checks)."""
        return [r.epoch for r in self.apdus]

    def snapshot(self) -> EvidenceCounters:
        with self._lock:
            c = self._counters
            return EvidenceCounters(
                c.power_ons, c.power_offs, c.warm_resets, c.pin_attempts, c.signatures, c.apdus
            )

    @property
    def power_ons(self) -> int:
        return self.snapshot().power_ons

    @property
    def power_offs(self) -> int:
        return self.snapshot().power_offs

    @property
    def warm_resets(self) -> int:
        return self.snapshot().warm_resets

    @property
    def pin_attempts(self) -> int:
        return self.snapshot().pin_attempts

    @property
    def signatures(self) -> int:
        return self.snapshot().signatures

    @property
    def apdu_count(self) -> int:
        return self.snapshot().apdus

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._events.clear()
            self._counters = EvidenceCounters()
