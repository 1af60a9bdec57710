"""Lease epochs that never repeat, across restarts too.

Every lease carries an epoch and frames from an old epoch are refused (DESIGN §4), which only
protects anyone if an epoch is never handed out twice. The LeaseBook counts up from a first
epoch; this store makes the first epoch after a restart larger than any epoch handed out
before it, by persisting a high-water mark in blocks: before the book hands out an epoch at or
beyond the mark, the mark moves `BLOCK` ahead and is written whole (`state_files.write_whole`).
One write per `BLOCK` leases, and a crash at any point loses at most the rest of a block.

A failed write (a full disk) does not stop the server: the mark is kept in memory, `problem`
says why (status, metrics, `epochs.save_failed` in the log) and every later raise tries the
write again. Until it succeeds, a restart falls back on the last saved mark and the wall clock
(as without a state location, below).

Without a state location (neither `pin_guard.state` nor `audit.path` configured) epochs start
from wall-clock seconds, which repeats only if a server handed out more than one lease per
second of uptime before a restart; the server says so in its log at start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import structlog

from bridge_server.guard.state_files import read_bytes, write_whole
from bridge_server.tokens.leases import EPOCH_MAX, initial_epoch

log = structlog.get_logger(__name__)

BLOCK: Final = 1024


class EpochStore:
    """Per-token high-water marks in one small JSON file (or memory only when `path` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._marks: dict[str, int] = {}
        self.problem = ""  # why the last write failed; "" when the file holds the marks
        raw = None if path is None else read_bytes(path)
        if raw is not None:
            data = json.loads(raw)
            self._marks = {str(k): int(v) for k, v in data.get("high_water", {}).items()}

    def status(self) -> dict[str, object]:
        return {"path": None if self.path is None else str(self.path), "problem": self.problem}

    def first_epoch(self, token: str, wall_time: float) -> int:
        """Where `token`'s epochs start now: past every epoch it may have handed out before."""
        first = max(initial_epoch(wall_time), self._marks.get(token, 0))
        if first > EPOCH_MAX - BLOCK:  # u32 exhausted (not in this universe's lifetime): wrap once
            first = 1
        self._raise(token, first)
        return first

    def note_granted(self, token: str, epoch: int) -> None:
        """Called before an epoch reaches a client; persists a new mark when the block is used up."""
        if epoch >= self._marks.get(token, 0) - 1:
            self._raise(token, epoch + 1)

    def _raise(self, token: str, epoch: int) -> None:
        self._marks[token] = min(EPOCH_MAX, epoch + BLOCK)
        if self.path is None:
            return
        try:
            write_whole(self.path, json.dumps({"high_water": self._marks}).encode())
        except OSError as exc:
            if not self.problem:
                log.error("epochs.save_failed", path=str(self.path), reason=str(exc))
            self.problem = f"cannot save the lease epochs to {self.path}: {exc.strerror or exc}"
            return
        if self.problem:
            log.warning("epochs.saved", path=str(self.path), reason="the epoch file is writable again")
        self.problem = ""


def epoch_state_path(guard_state: Path | None) -> Path | None:
    """`epochs.json` beside the PIN guard's state (same folder, same backups)."""
    return None if guard_state is None else guard_state.with_name("epochs.json")
