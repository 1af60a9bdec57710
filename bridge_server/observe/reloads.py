"""The outcome of the last reload of one kind (config, TLS files), for metrics and status.

A leaf module: the reloaders (`bridge_server.service`, `bridge_server.net.reload`) record into
it, `observe/metrics.py` reads it. The start counts as the first successful load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReloadOutcome:
    """`ok`: whether the last attempt succeeded; `success_at`: wall time of the last success."""

    success_at: float
    ok: bool = True
    attempts: int = 0

    def record(self, ok: bool, wall: float) -> None:
        self.attempts += 1
        self.ok = ok
        if ok:
            self.success_at = wall
