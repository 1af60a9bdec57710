"""`tokenbridge audit verify FILE [--anchor FILE | --expect-seq N --expect-hash H] [--key FILE] [--json]`.

Exit codes: 0 the chain verifies, 1 BROKEN (a break, cut or edit was found), 2 it could not be
checked (FILE, one of its rotations, the anchor or the key cannot be read; bad options).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from bridge_server.guard.audit_chain import VerifyResult, load_key, read_anchor, rotated_files, verify_set
from bridge_server.guard.state_files import open_read

EXIT_OK, EXIT_BROKEN, EXIT_CANNOT_READ = 0, 1, 2


def add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="check the audit log's hash chain")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    verify = asub.add_parser(
        "verify",
        help="verify FILE (and its rotated FILE.1, FILE.2 ...) as one chain; name the first break "
        "(exit 0 ok, 1 broken, 2 cannot read FILE, anchor or key)",
    )
    verify.add_argument("file", type=Path, help="the server's audit log (config audit.path)")
    verify.add_argument(
        "--anchor", type=Path, help="the head the server recorded (FILE.anchor): detects a cut or edited tail"
    )
    verify.add_argument(
        "--expect-seq", type=int, help="expected last seq (from an `audit.anchored` log line)"
    )
    verify.add_argument("--expect-hash", help="expected hash of that entry (the same log line's `head`)")
    verify.add_argument(
        "--key", type=Path, help="the server's audit key (FILE.key): detects a recomputed chain"
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")


def _expected(args: Any) -> tuple[int, str] | None:
    """Raises ValueError for an unreadable anchor or half of --expect-seq/--expect-hash."""
    if args.anchor is not None:
        anchor = read_anchor(args.anchor)
        if anchor is None:
            raise ValueError(f"the anchor file {args.anchor} does not exist")
        return anchor
    if (args.expect_seq is None) != (args.expect_hash is None):
        raise ValueError("--expect-seq and --expect-hash go together")
    return None if args.expect_seq is None else (args.expect_seq, args.expect_hash)


def _check_readable(log: Path) -> None:
    """Raises ValueError naming the first of the log's files that cannot be opened."""
    for path in rotated_files(log):
        try:
            os.close(open_read(path))
        except OSError as exc:
            raise ValueError(
                f"cannot read {path}: {exc.strerror or exc}; check the path (server.yaml audit.path) "
                "and run as a user that can read it"
            ) from exc


def run_audit(args: Any) -> int:
    try:
        expect = _expected(args)
        key = None if args.key is None else load_key(args.key)
        if args.key is not None and key is None:
            raise ValueError(f"the key file {args.key} does not exist")
        _check_readable(args.file)
    except (OSError, ValueError) as exc:
        print(f"tokenbridge audit verify: {exc}", file=sys.stderr)
        return EXIT_CANNOT_READ
    result = verify_set(args.file, key=key, expect=expect)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(_describe(args.file, result))
    return EXIT_OK if result.ok else EXIT_BROKEN


def _describe(path: Path, result: VerifyResult) -> str:
    checks = ["MACs checked" if result.keyed else "MACs not checked (no --key)"]
    checks.append("matches the anchor" if result.anchored else "no anchor given (a cut tail would pass)")
    if result.ok:
        files = f" in {len(result.files)} files from seq {result.first_seq}" if len(result.files) > 1 else ""
        return (
            f"{path}: ok, {result.entries} entries{files}, last seq {result.last_seq}, "
            f"head {result.head}; {', '.join(checks[:2])}"
        )
    where = f"{result.file} line {result.line}: " if result.line is not None else ""
    return (
        f"{path}: BROKEN at {where}{result.problem}\n"
        f"  {result.entries} entries verified before it; the last good entry has seq {result.last_seq}"
    )
