"""How tokens, ATRs and durations are shown to people: one vocabulary for every place that shows
them (the server's status document and table, the client's status and its table, both
daemons' systemd `STATUS=` lines, and the informational `TokenStatus.state` on the wire).

- A token's state is a `TokenState` word: `idle` (present, nobody holds the lease), `leased`,
  `guarded` (the PIN guard refuses PIN commands), `locked` (the card reports its PIN blocked),
  `absent`. There is no `free`.
- An ATR is upper-case hex without separators, `3BD518008131FE7D8073C82110F4` (what
  `opensc-tool --atr` prints without the colons): one string to copy, compare and grep.
- A duration a person reads is `format_duration`: `42s`, `5m02s`, `1h02m`, `3d04h`. Durations in
  JSON documents stay numbers of seconds in fields named `*_s` (milliseconds in `*_ms`).

Pure (no I/O); `tests/protocol/test_display.py` holds the words and formats.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TokenState", "format_atr", "format_duration"]


class TokenState(StrEnum):
    """What a token is doing, in precedence order: absent > locked > guarded > leased > idle."""

    IDLE = "idle"
    LEASED = "leased"
    GUARDED = "guarded"
    LOCKED = "locked"
    ABSENT = "absent"

    @classmethod
    def of(cls, *, present: bool, leased: bool, guarded: bool = False, locked: bool = False) -> TokenState:
        if not present:
            return cls.ABSENT
        if locked:
            return cls.LOCKED
        if guarded:
            return cls.GUARDED
        return cls.LEASED if leased else cls.IDLE


def format_atr(atr: bytes) -> str:
    """`3BD518...`: upper-case hex, no separators; "" for no ATR."""
    return atr.hex().upper()


def format_duration(seconds: float | None) -> str:
    """`42s`, `5m02s`, `1h02m`, `3d04h` (truncated to the unit shown); `-` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
