"""Tamper-evident audit log (DESIGN §4): hash-chained JSON lines, appended and fsynced.

Format (docs/guardrails.md): one JSON object per line, ASCII, keys in this order:

    {"seq": 7, "ts": "2024-05-01T12:00:00.123Z", "event": "lease.granted", ...fields..., "prev": "<64 hex>"}

`seq` counts from 1 without gaps; `prev` is the SHA-256 of the previous line's bytes (without
its newline), 64 zeros on the first line. `verify_lines` walks the chain and names the first
line that breaks it: an edited line no longer matches the next line's `prev`, a deleted line
leaves a gap in `seq`, reordered lines go back or jump in `seq`, a cut file ends without a
newline. (An unkeyed chain shows edits, not a rewrite of the whole tail: ship the head hash
that `verify` prints elsewhere if that matters.)

Writing: `append` is sync and thread-safe (one `threading.Lock`): it opens the file with
O_APPEND, writes the whole line with one `write`, fsyncs and closes, so a rotated or replaced
file is noticed at once and a partial write is cut back. The async side calls `record`, which
runs `append` in a worker thread behind one `CapacityLimiter(1)`: an fsync costs milliseconds
on a real disk and must not stall every session's APDUs (measured in docs/guardrails.md).
Audit events are per connection, lease, PIN attempt or refusal, never per APDU.

Failure: if a line cannot be written, the log becomes unavailable (`available`, `problem`);
the entry waits in a bounded in-memory queue and new leases are refused by the token tasks
(`audit_unavailable`). Every later `append`/`retry` (the token tasks retry once a second and
on every lease request) first tries to write the waiting entries, in order, so the chain
has no hole and service resumes by itself once the file is writable again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from bridge_server.state_files import open_append, open_read, write_all

log = structlog.get_logger(__name__)

ZERO_HASH: Final = "0" * 64
MAX_PENDING: Final = 10_000  # entries kept in memory while the file is unwritable
_TAIL_BYTES: Final = 65536
_SCALARS: Final = (str, int, float, bool, type(None))


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


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
        self, path: Path | None, *, clock: Callable[[], float] = time.time, use_thread: bool = True
    ) -> None:
        """`use_thread=False` writes inline (tests with `wait_all_tasks_blocked`, which a thread defeats)."""
        self.path = path
        self._clock = clock
        self._use_thread = use_thread
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._pending: deque[_Pending] = deque()
        self._dropped = 0
        self._seq: int | None = None  # None until the head is read
        self._prev = ZERO_HASH
        self.problem = ""
        self.written = 0

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
        }

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
                self._seq, self._prev = read_head(self.path)
            if self._dropped:
                self._pending.appendleft(
                    _Pending("audit.entries_dropped", self._clock(), {"count": self._dropped})
                )
                self._dropped = 0
            while self._pending:
                self._write(self._pending[0])
                self._pending.popleft()
        except (OSError, ValueError) as exc:
            self.problem = f"cannot write the audit log {self.path}: {getattr(exc, 'strerror', None) or exc}"
            if was_available:
                log.error("audit.unavailable", path=str(self.path), reason=self.problem)
            return False
        if not was_available:
            log.warning("audit.resumed", path=str(self.path), reason="the audit log is writable again")
        self.problem = ""
        return True

    def _write(self, entry: _Pending) -> None:
        assert self.path is not None
        assert self._seq is not None
        doc: dict[str, Any] = {"seq": self._seq + 1, "ts": _iso(entry.ts), "event": entry.event}
        doc.update((k, v) for k, v in entry.fields.items() if k not in ("seq", "ts", "event", "prev"))
        doc["prev"] = self._prev
        line = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
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


def read_head(path: Path) -> tuple[int, str]:
    """(last seq, hash of the last line) of an existing log; (0, zeros) for a new one."""
    try:
        with os.fdopen(open_read(path), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
    except FileNotFoundError:
        return 0, ZERO_HASH
    lines = [ln for ln in tail.split(b"\n") if ln]
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


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    line: int | None = None  # first broken line (1-based)
    problem: str = ""
    head: str = ZERO_HASH  # hash of the last good line
    last_seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "line": self.line,
            "problem": self.problem,
            "head": self.head,
            "last_seq": self.last_seq,
        }


def _parse_entry(body: bytes) -> tuple[int, str] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("seq"), int)
        or not isinstance(doc.get("prev"), str)
    ):
        return None
    return doc["seq"], doc["prev"]


def verify_lines(lines: Iterable[bytes]) -> VerifyResult:
    """Check the chain of `lines` (each with its newline); stops at the first break."""
    prev_hash, prev_seq, count = ZERO_HASH, 0, 0
    before = (ZERO_HASH, 0)  # (hash, seq) of the line before the previous one

    def broken(line: int, problem: str) -> VerifyResult:
        if line <= count:  # the previous line is the broken one: it does not count as verified
            return VerifyResult(False, count - 1, line, problem, *before)
        return VerifyResult(False, count, line, problem, prev_hash, prev_seq)

    for number, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            return broken(number, "the last line is cut off (truncated file or an interrupted write)")
        entry = _parse_entry(raw[:-1])
        if entry is None:
            return broken(number, "not a valid audit entry (edited or damaged)")
        seq, prev = entry
        if seq > prev_seq + 1:
            missing = f"{prev_seq + 1}" if seq == prev_seq + 2 else f"{prev_seq + 1}..{seq - 1}"
            return broken(number, f"entry {missing} is missing before this line (deleted or moved)")
        if seq <= prev_seq:
            return broken(number, f"sequence goes back from {prev_seq} to {seq} (lines reordered or copied)")
        if prev != prev_hash and number == 1:
            return broken(
                1, "the first line does not start a chain (its prev is not zeros): edited, or lines cut"
            )
        if prev != prev_hash:
            return broken(
                number - 1, f"line {number - 1} does not match the hash recorded in line {number} (edited)"
            )
        before = (prev_hash, prev_seq)
        prev_hash, prev_seq, count = line_hash(raw), seq, count + 1
    return VerifyResult(True, count, None, "", prev_hash, prev_seq)


def verify_file(path: Path) -> VerifyResult:
    try:
        with open(path, "rb") as fh:
            return verify_lines(fh)
    except OSError as exc:
        return VerifyResult(False, 0, None, f"cannot read {path}: {exc.strerror or exc}")


# -- `tokenbridge audit verify FILE [--json]` -----------------------------------------------------


def add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="check the audit log's hash chain")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    verify = asub.add_parser(
        "verify", help="verify FILE's chain; name the first broken line (exit 0 ok, 1 broken)"
    )
    verify.add_argument("file", type=Path, help="the server's audit log (config audit.path)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")


def run_audit(args: Any) -> int:
    result = verify_file(args.file)
    if args.json:
        print(json.dumps({"file": str(args.file), **result.as_dict()}, indent=2))
    elif result.ok:
        print(f"{args.file}: ok, {result.entries} entries, last seq {result.last_seq}, head {result.head}")
    else:
        where = f"line {result.line}: " if result.line is not None else ""
        print(f"{args.file}: BROKEN at {where}{result.problem}")
        print(f"  {result.entries} entries verified before it; the last good entry has seq {result.last_seq}")
    return 0 if result.ok else 1
