"""The audit log's line format, its key and anchor files, and the chain check behind `audit verify`.

Format (docs/guardrails.md): one JSON object per line, ASCII, keys in this order:

    {"seq": 7, "ts": "...", "event": "lease.granted", ...fields..., "prev": "<64 hex>", "mac": "<64 hex>"}

`seq` counts from 1 without gaps; `prev` is the SHA-256 of the previous line's bytes (without
its newline), 64 zeros on the first line. `mac` is HMAC-SHA256, under the server's key
(`<log>.key`, 0600, made at first start), of the line without its `,"mac":"..."` part: anyone
can recompute `prev` after deleting a line, only the key holder can recompute `mac`.

What the chain alone shows: an edited line (the next `prev` no longer matches), a deleted line
(a gap in `seq`), reordered lines, a cut last line (no newline). What it cannot show is a cut
tail, an edited last line or an emptied file: for those the server keeps the head, `seq` and
hash of the last line, in `<log>.anchor` (and logs it as `audit.anchored`), and `verify` checks
the file against that expected head.

Rotation (`audit.max_bytes`, `audit.keep`): the log is renamed `<log>.1` (older ones move to
`.2` ...), and the new file starts with an `audit.rotated` entry whose `prev` is the hash of the
old file's last line, so `verify` walks `<log>.N ... <log>.1, <log>` as one chain. The oldest
kept file starts either at seq 1 or with an `audit.rotated` entry (what came before it was
rotated away).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bridge_server.guard.state_files import open_read, read_bytes

ZERO_HASH: Final = "0" * 64
_MAC_SUFFIX: Final = re.compile(rb',"mac":"([0-9a-f]{64})"\}$')


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def mac_of(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def seal(body: bytes, key: bytes | None) -> bytes:
    """The line for a JSON object `body` (ending in `}`), with its MAC when there is a key."""
    if key is None:
        return body
    return body[:-1] + b',"mac":"' + mac_of(key, body).encode() + b'"}'


def mac_ok(line: bytes, key: bytes) -> bool:
    match = _MAC_SUFFIX.search(line)
    if match is None:
        return False
    body = line[: match.start()] + b"}"
    return hmac.compare_digest(match.group(1).decode(), mac_of(key, body))


def key_path(log: Path) -> Path:
    return log.with_name(log.name + ".key")


def anchor_path(log: Path) -> Path:
    return log.with_name(log.name + ".anchor")


def load_key(path: Path) -> bytes | None:
    """The key in `path` (hex), None when there is none. Raises ValueError for a bad or exposed key."""
    raw = read_bytes(path)
    if raw is None:
        return None
    if os.stat(path, follow_symlinks=False).st_mode & 0o077:
        raise ValueError(f"the audit key {path} can be read by others; run `chmod 600 {path}`")
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except ValueError:
        raise ValueError(f"{path} does not hold an audit key (64 hex digits)") from None
    if len(key) < 16:
        raise ValueError(f"{path} holds a key too short for an audit MAC")
    return key


def read_anchor(path: Path) -> tuple[int, str] | None:
    """(seq, head) from an anchor file, None when there is none. Raises ValueError for a bad one."""
    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        seq, head = doc["seq"], doc["head"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not an audit anchor") from None
    if not isinstance(seq, int) or not isinstance(head, str):
        raise ValueError(f"{path} is not an audit anchor")
    return seq, head


def rotated_files(log: Path) -> list[Path]:
    """`<log>.N ... <log>.1, <log>`: the kept files, oldest first (the current one when it exists)."""
    pattern = re.compile(re.escape(log.name) + r"\.([0-9]+)$")
    numbered = []
    if log.parent.is_dir():
        for entry in log.parent.iterdir():
            match = pattern.match(entry.name)
            if match:
                numbered.append((int(match.group(1)), entry))
    files = [p for _n, p in sorted(numbered, reverse=True)]
    return [*files, log] if log.exists() or not files else files


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    entries: int
    line: int | None = None  # first broken line (1-based, in `file`)
    problem: str = ""
    head: str = ZERO_HASH  # hash of the last good line
    last_seq: int = 0
    file: str | None = None  # where the break is
    files: tuple[str, ...] = ()
    first_seq: int = 0  # the oldest kept entry (> 1 after rotation)
    rotations: int = 0
    keyed: bool = False  # MACs checked
    anchored: bool = False  # compared with an expected head

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "entries": self.entries, "line": self.line, "problem": self.problem,
            "head": self.head, "last_seq": self.last_seq, "file": self.file, "files": list(self.files),
            "first_seq": self.first_seq, "rotations": self.rotations, "keyed": self.keyed,
            "anchored": self.anchored,
        }  # fmt: skip


def _parse_entry(body: bytes) -> tuple[int, str, str] | None:
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
    return doc["seq"], doc["prev"], str(doc.get("event", ""))


@dataclass
class ChainWalk:
    """Walks lines (over one or more files) and stops at the first break; `finish` checks the anchor."""

    key: bytes | None = None
    expect: tuple[int, str] | None = None
    prev_hash: str = ZERO_HASH
    prev_seq: int = 0
    count: int = 0
    first_seq: int = 0
    rotations: int = 0
    files: list[str] = field(default_factory=list)
    _before: tuple[str, int] = (ZERO_HASH, 0)
    _at_expected: str | None = None

    def result(self, **kw: Any) -> VerifyResult:
        base: dict[str, Any] = {
            "entries": self.count, "head": self.prev_hash, "last_seq": self.prev_seq,
            "files": tuple(self.files), "first_seq": self.first_seq, "rotations": self.rotations,
            "keyed": self.key is not None, "anchored": self.expect is not None,
        }  # fmt: skip
        return VerifyResult(**{**base, **kw})

    def broken(self, file: str, line: int, problem: str, *, previous: bool = False) -> VerifyResult:
        if previous:  # the previous line is the broken one: it does not count as verified
            head, seq = self._before
            return self.result(ok=False, entries=self.count - 1, line=line, problem=problem, file=file,
                               head=head, last_seq=seq)  # fmt: skip
        return self.result(ok=False, line=line, problem=problem, file=file)

    def feed(self, file: str, number: int, raw: bytes) -> VerifyResult | None:
        """One line (with its newline); a VerifyResult when it breaks the chain."""
        if not raw.endswith(b"\n"):
            return self.broken(
                file, number, "the last line is cut off (truncated file or an interrupted write)"
            )
        entry = _parse_entry(raw[:-1])
        if entry is None:
            return self.broken(file, number, "not a valid audit entry (edited or damaged)")
        seq, prev, event = entry
        if self.count == 0 and seq > 1 and event == "audit.rotated":
            self.prev_hash, self.prev_seq = prev, seq - 1  # older entries were rotated away
        if self.key is not None and not mac_ok(raw[:-1], self.key):
            return self.broken(
                file,
                number,
                "its MAC does not match: the line was written or rewritten without the server's key",
            )
        problem = self._link_problem(number, seq, prev)
        if problem is not None:
            return self.broken(file, *problem[:2], previous=problem[2])
        self.first_seq = self.first_seq or seq
        self.rotations += event == "audit.rotated"
        self._before = (self.prev_hash, self.prev_seq)
        self.prev_hash, self.prev_seq, self.count = line_hash(raw), seq, self.count + 1
        if self.expect is not None and seq == self.expect[0]:
            self._at_expected = self.prev_hash
        return None

    def _link_problem(self, number: int, seq: int, prev: str) -> tuple[int, str, bool] | None:
        if seq > self.prev_seq + 1:
            gap = f"{self.prev_seq + 1}" if seq == self.prev_seq + 2 else f"{self.prev_seq + 1}..{seq - 1}"
            return number, f"entry {gap} is missing before this line (deleted or moved)", False
        if seq <= self.prev_seq:
            return (
                number,
                f"sequence goes back from {self.prev_seq} to {seq} (lines reordered or copied)",
                False,
            )
        if prev != self.prev_hash and self.count == 0:
            return (
                1,
                "the first line does not start a chain (its prev is not zeros): edited, or lines cut",
                False,
            )
        if prev != self.prev_hash:
            if number == 1:
                return (
                    1,
                    "this file does not continue the previous file's chain (a line was edited or cut)",
                    False,
                )
            return (
                number - 1,
                f"line {number - 1} does not match the hash recorded in line {number} (edited)",
                True,
            )
        return None

    def finish(self, file: str | None) -> VerifyResult:
        if self.expect is not None:
            seq, head = self.expect
            if self.prev_seq < seq:
                return self.result(ok=False, file=file, problem=(
                    f"truncated: the log ends at seq {self.prev_seq} but the anchor says seq {seq} "
                    f"(entries {self.prev_seq + 1}..{seq} are missing: cut tail or emptied file)"
                ))  # fmt: skip
            if self._at_expected is not None and self._at_expected != head:
                return self.result(ok=False, file=file, problem=(
                    f"entry {seq} does not match the anchor's hash {head} (edited after it was written)"
                ))  # fmt: skip
        return self.result(ok=True, file=file)


def verify_lines(lines: Iterable[bytes], *, key: bytes | None = None, name: str = "") -> VerifyResult:
    """Check the chain of `lines` (each with its newline); stops at the first break."""
    walk = ChainWalk(key=key)
    for number, raw in enumerate(lines, start=1):
        broken = walk.feed(name, number, raw)
        if broken is not None:
            return broken
    return walk.finish(name or None)


def verify_set(log: Path, *, key: bytes | None = None, expect: tuple[int, str] | None = None) -> VerifyResult:
    """Verify `log` and its rotated files as one chain, against `key` and the expected head."""
    walk = ChainWalk(key=key, expect=expect)
    files = rotated_files(log)
    walk.files = [str(p) for p in files]
    for path in files:
        try:
            with os.fdopen(open_read(path), "rb") as fh:
                for number, raw in enumerate(fh, start=1):
                    broken = walk.feed(str(path), number, raw)
                    if broken is not None:
                        return broken
        except OSError as exc:
            return walk.result(ok=False, file=str(path), problem=f"cannot read {path}: {exc.strerror or exc}")
    return walk.finish(str(log))


def verify_file(path: Path) -> VerifyResult:
    """The chain of one file, without key or anchor."""
    try:
        with os.fdopen(open_read(path), "rb") as fh:
            return verify_lines(fh, name=str(path))
    except OSError as exc:
        return VerifyResult(False, 0, None, f"cannot read {path}: {exc.strerror or exc}")
