"""Tamper-evident audit log (DESIGN §4): hash-chained, MACed JSON lines, appended, fsynced, anchored.

The line format, the key, the anchor and the checks are in `audit_chain` (docs/guardrails.md).

Writing: `append` is sync and thread-safe (one `threading.Lock`): it opens the file with
O_APPEND (never through a symbolic link), writes the whole line, fsyncs and closes, so a
rotated or replaced file is noticed at once and a partial write is cut back. The async side
calls `record`, which runs `append` in a worker thread behind one `CapacityLimiter(1)`: an
fsync costs milliseconds on a real disk and must not stall every session's APDUs (measured in
docs/guardrails.md). Audit events are per connection, lease, PIN attempt or refusal, never per
APDU.

Opening (the first write): the key is read or made (`<log>.key`, 0600), the head is read from
the file's tail and compared with the anchor (`<log>.anchor`). A file that ends before the
anchor's seq, or whose entry at that seq has another hash, was cut or edited while the server
was stopped: the server does not continue it silently. It logs `audit.truncated` at ERROR,
sets `truncated` in its status and writes an `audit.truncated` entry (the anchor's and the
file's seq and hash) as the next line, then continues the chain from what the file holds, so
the gap is recorded, MACed, in the log itself (docs/ops.md).

Anchoring: after each batch of lines the anchor file is replaced (`write_whole`, without the
folder fsync: a lost rename brings back an older, shorter anchor, which never raises a false
alarm). The head also goes to the service log as `audit.anchored` at start, every
`ANCHOR_LOG_EVERY` entries and at shutdown (`log_anchor`), for `verify --expect-seq/--expect-hash`.

Rotation: before a line would take the file past `max_bytes`, `<log>` becomes `<log>.1` (the
older files move up, the one past `keep` is deleted first, which frees space on a full disk)
and the new file starts with an `audit.rotated` entry chained to the old file's last line.

Failure: if a line (or the anchor) cannot be written, the log becomes unavailable
(`available`, `problem`); the entry waits in a bounded in-memory queue and new leases are
refused by the token tasks (`audit_unavailable`). Every later `append`/`retry` (the token tasks
retry once a second and on every lease request) first tries to write the waiting entries, in
order, so the chain has no hole and service resumes by itself once the file is writable again.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from bridge_server.guard.audit_chain import (
    ZERO_HASH,
    anchor_path,
    key_path,
    line_hash,
    load_key,
    read_anchor,
    seal,
)
from bridge_server.guard.audit_chain import (
    verify_file as verify_file,  # the one-file check, kept importable here
)
from bridge_server.guard.state_files import fsync_folder, open_append, open_read, write_all, write_whole

log = structlog.get_logger(__name__)

MAX_PENDING: Final = 10_000  # entries kept in memory while the file is unwritable
ANCHOR_LOG_EVERY: Final = 100  # entries between `audit.anchored` lines in the service log
_TAIL_BYTES: Final = 65536
_SCALARS: Final = (str, int, float, bool, type(None))


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _clean(value: Any) -> Any:
    """Audit values are text, numbers or lists/dicts of them; bytes never go in (no payloads)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    raise TypeError(f"audit field of type {type(value).__name__} is not allowed (text and numbers only)")


@dataclass(slots=True)
class _Pending:
    event: str
    ts: float
    fields: dict[str, Any]


class AuditLog:
    """The server's audit log; `AuditLog(None)` records nothing and is always available."""

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Callable[[], float] = time.time,
        use_thread: bool = True,
        max_bytes: int | None = None,
        keep: int = 8,
    ) -> None:
        """`use_thread=False` writes inline (tests with `wait_all_tasks_blocked`, which a thread defeats).

        `max_bytes`: rotate before the file grows past it (None: never); `keep`: rotated files kept.
        """
        self.path = path
        self._clock = clock
        self._use_thread = use_thread
        self._max_bytes = max_bytes
        self._keep = keep
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._pending: deque[_Pending] = deque()
        self._dropped = 0
        self._seq: int | None = None  # None until the head is read
        self._prev = ZERO_HASH
        self._key: bytes | None = None
        self._anchored = (0, ZERO_HASH)  # what the anchor file holds
        self._logged_seq = 0  # the head last written to the service log
        self.problem = ""
        self.written = 0
        self.truncated = False  # the file was cut or edited behind the anchor (see the docstring)
        self.rotations = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def available(self) -> bool:
        return not self.problem

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "available": self.available,
            "problem": self.problem,
            "pending": len(self._pending),
            "seq": self._seq or 0,
            "head": self._prev,
            "truncated": self.truncated,
            "rotations": self.rotations,
        }

    def log_anchor(self) -> None:
        """The head to the service log (`audit.anchored`): at start, periodically, at shutdown."""
        if self.path is None or self._seq is None:
            return
        self._logged_seq = self._seq
        log.info("audit.anchored", path=str(self.path), seq=self._seq, head=self._prev)

    # -- writing -------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> bool:
        """Record `event` now (sync, thread-safe); False when it is queued because the file is unwritable."""
        entry = _Pending(event, self._clock(), {k: _clean(v) for k, v in fields.items()})
        if self.path is None:
            return True
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._dropped += 1
            else:
                self._pending.append(entry)
            return self._flush()

    async def record(self, event: str, **fields: Any) -> bool:
        """`append` in a worker thread (one at a time, in call order)."""
        if self.path is None:
            return True
        if not self._use_thread:
            return self.append(event, **fields)
        return await trio.to_thread.run_sync(lambda: self.append(event, **fields), limiter=self._limiter)

    def retry(self) -> bool:
        """Try to write what is waiting; True when the log is available afterwards."""
        if self.path is None or (self.available and not self._pending):
            return True
        with self._lock:
            return self._flush()

    async def aretry(self) -> bool:
        if self.available and not self._pending:
            return True
        if not self._use_thread:
            return self.retry()
        return await trio.to_thread.run_sync(self.retry, limiter=self._limiter)

    def _flush(self) -> bool:
        assert self.path is not None
        was_available = self.available
        try:
            if self._seq is None:
                self._open_chain()
            if self._dropped:
                self._pending.appendleft(
                    _Pending("audit.entries_dropped", self._clock(), {"count": self._dropped})
                )
                self._dropped = 0
            while self._pending:
                self._write(self._pending[0])
                self._pending.popleft()
            self._save_anchor()
        except (OSError, ValueError) as exc:
            self.problem = f"cannot write the audit log {self.path}: {getattr(exc, 'strerror', None) or exc}"
            if was_available:
                log.error("audit.unavailable", path=str(self.path), reason=self.problem)
            return False
        if not was_available:
            log.warning("audit.resumed", path=str(self.path), reason="the audit log is writable again")
        self.problem = ""
        return True

    def _open_chain(self) -> None:
        """Key, head, and the head compared with the anchor (see the docstring)."""
        assert self.path is not None
        self._key = _key(key_path(self.path))
        newest = self.path
        if _size(self.path) == 0 and _size(self._numbered(1)) > 0:
            newest = self._numbered(1)  # stopped between a rotation and the new file's first line
        seq, head = read_head(newest)
        anchor = read_anchor(anchor_path(self.path))
        self._anchored = anchor_seq, anchor_head = anchor or (0, ZERO_HASH)
        problem = None if anchor is None else _behind_anchor(newest, anchor, seq, head)
        self._seq, self._prev = seq, head
        if problem is not None:
            self.truncated = True
            fields = {
                "anchor_seq": anchor_seq,
                "anchor_head": anchor_head,
                "found_seq": seq,
                "found_head": head,
            }
            log.error("audit.truncated", path=str(self.path), reason=problem, **fields)
            self._pending.appendleft(
                _Pending("audit.truncated", self._clock(), {"reason": problem, **fields})
            )
        self.log_anchor()

    def _numbered(self, n: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.name}.{n}")

    def _line(self, entry: _Pending) -> bytes:
        assert self._seq is not None
        doc: dict[str, Any] = {"seq": self._seq + 1, "ts": _iso(entry.ts), "event": entry.event}
        doc.update((k, v) for k, v in entry.fields.items() if k not in ("seq", "ts", "event", "prev", "mac"))
        doc["prev"] = self._prev
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
        return seal(body, self._key) + b"\n"

    def _write(self, entry: _Pending) -> None:
        assert self.path is not None
        line = self._line(entry)
        size = _size(self.path)
        if self._max_bytes is not None and size and size + len(line) > self._max_bytes:
            self._rotate()
            line = self._line(entry)
        self._append(line)

    def _rotate(self) -> None:
        """`<log>` -> `<log>.1` ... (the oldest past `keep` goes first), then an `audit.rotated` line."""
        assert self.path is not None
        self._numbered(self._keep).unlink(missing_ok=True)
        for n in range(self._keep, 0, -1):
            try:
                os.replace(self._numbered(n - 1) if n > 1 else self.path, self._numbered(n))
            except FileNotFoundError:
                continue
        fsync_folder(self.path.parent)
        self.rotations += 1
        log.info("audit.rotated", path=str(self.path), seq=self._seq, keep=self._keep)
        marker = _Pending("audit.rotated", self._clock(), {"previous": self._numbered(1).name})
        self._append(self._line(marker))

    def _append(self, line: bytes) -> None:
        assert self.path is not None
        assert self._seq is not None
        fd = open_append(self.path)
        try:
            size = os.fstat(fd).st_size
            try:
                write_all(fd, line)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # never leave half a line behind
                raise
        finally:
            os.close(fd)
        self._seq += 1
        self._prev = line_hash(line)
        self.written += 1

    def _save_anchor(self) -> None:
        assert self.path is not None
        assert self._seq is not None
        head = (self._seq, self._prev)
        if head == self._anchored:
            return
        doc = {"seq": self._seq, "head": self._prev, "file": self.path.name}
        write_whole(anchor_path(self.path), json.dumps(doc).encode(), sync_folder=False)
        self._anchored = head
        if self._seq - self._logged_seq >= ANCHOR_LOG_EVERY:
            self.log_anchor()


def _size(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _key(path: Path) -> bytes:
    """The audit key, made at first start (0600, never through a link)."""
    key = load_key(path)
    if key is None:
        key = secrets.token_bytes(32)
        write_whole(path, key.hex().encode() + b"\n", mode=0o600)
        log.info("audit.key_created", path=str(path))
    return key


def _behind_anchor(path: Path, anchor: tuple[int, str], seq: int, head: str) -> str | None:
    """Why the file at `path` (head `seq`, `head`) does not reach the anchor; None when it does."""
    anchor_seq, anchor_head = anchor
    if seq < anchor_seq:
        return f"the log ends at seq {seq} but the anchor says {anchor_seq}: entries were cut"
    if seq == anchor_seq and head != anchor_head:
        return f"entry {seq} does not match the anchor's hash: the last entry was edited"
    if seq > anchor_seq and _hash_of(path, anchor_seq) not in (None, anchor_head):
        return f"entry {anchor_seq} does not match the anchor's hash: it was edited"
    return None


def _hash_of(path: Path, seq: int) -> str | None:
    """The hash of entry `seq` if it is in the file's tail (None when not found there)."""
    for line in _tail(path):
        try:
            if json.loads(line)["seq"] == seq:
                return line_hash(line)
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _tail(path: Path) -> list[bytes]:
    """The complete lines in the last `_TAIL_BYTES` of `path` (none for a missing file)."""
    try:
        with os.fdopen(open_read(path), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
    except FileNotFoundError:
        return []
    return [ln for ln in tail.split(b"\n") if ln]


def read_head(path: Path) -> tuple[int, str]:
    """(last seq, hash of the last line) of an existing log; (0, zeros) for a new one."""
    lines = _tail(path)
    if not lines:
        return 0, ZERO_HASH
    last = lines[-1]
    for candidate in reversed(lines):
        try:
            seq = json.loads(candidate)["seq"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(seq, int):
            # A damaged last line keeps its place in the chain; `verify` will name it.
            return seq + (0 if candidate == last else 1), line_hash(last)
    raise ValueError(f"{path} does not end with audit entries; move it aside to start a new log")
