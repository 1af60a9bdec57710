"""Reconnect schedule: capped exponential backoff with full jitter (pure, sync-testable)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays before reconnect attempts: initial, x2 each failure, capped, with jitter.

    Jitter spreads a fleet of build VMs that lost the server at the same moment, so they do
    not all knock at once when it comes back. `rng` is injected so tests are exact.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2  # +-20 % of the nominal delay
    rng: random.Random = field(default_factory=random.Random)
    _failures: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        nominal = min(self.max_s, self.initial_s * 2.0**self._failures)
        self._failures = min(self._failures + 1, 62)
        spread = nominal * self.jitter
        return max(0.0, nominal + self.rng.uniform(-spread, spread))

    def reset(self) -> None:
        """A connection succeeded: start from the initial delay next time."""
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures
