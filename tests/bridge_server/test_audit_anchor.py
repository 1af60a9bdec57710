"""The audit log's anchor and key (issue 13 item 10): a cut, edited or recomputed tail is detected.

Without an anchor, removing the last lines, editing the last line, emptying the file, or deleting a
line and recomputing the chain all verified "ok". The server now keeps the head (seq, hash) in
`<log>.anchor`, MACs every line with the key in `<log>.key`, compares the file with the anchor at
start, and `tokenbridge audit verify` checks against an expected head and the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import structlog

from bridge_admin.cli import main as tokenbridge
from bridge_server.guard.audit import AuditLog

WALL = 1_700_000_000.0


def write_log(path: Path, n: int = 5) -> list[bytes]:
    log = AuditLog(path, clock=lambda: WALL)
    for i in range(n):
        assert log.append("lease.granted", token="codesign", client_id=f"vm{i}")
    return path.read_bytes().splitlines(keepends=True)


def anchor_of(path: Path) -> Path:
    return path.with_name(path.name + ".anchor")


def key_of(path: Path) -> Path:
    return path.with_name(path.name + ".key")


def verify(path: Path, *extra: str) -> int:
    return tokenbridge(["audit", "verify", str(path), *extra])


def test_the_server_keeps_the_head_and_a_private_key_beside_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    anchor = json.loads(anchor_of(path).read_text())
    assert anchor["seq"] == 5
    assert anchor["head"] == hashlib.sha256(lines[-1].rstrip(b"\n")).hexdigest()
    assert key_of(path).stat().st_mode & 0o777 == 0o600
    assert all(b'"mac":"' in line for line in lines)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda lines: lines[:-2], id="last-lines-removed"),
        pytest.param(lambda lines: [*lines[:-1], lines[-1].replace(b"vm4", b"vm7")], id="last-line-edited"),
        pytest.param(lambda lines: [], id="emptied"),
    ],
)
def test_verify_against_the_anchor_reports_a_cut_or_edited_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: object
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    path.write_bytes(b"".join(tamper(lines)))  # type: ignore[operator]
    assert verify(path) == 0  # the chain alone cannot tell
    capsys.readouterr()
    assert verify(path, "--anchor", str(anchor_of(path))) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out
    assert "anchor" in out


def test_verify_against_an_expected_head_from_the_service_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    head = hashlib.sha256(lines[-1].rstrip(b"\n")).hexdigest()
    assert verify(path, "--expect-seq", "5", "--expect-hash", head) == 0
    capsys.readouterr()
    path.write_bytes(b"".join(lines[:3]))
    assert verify(path, "--expect-seq", "5", "--expect-hash", head, "--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert "truncated" in doc["problem"]


def _recompute(lines: list[bytes]) -> list[bytes]:
    """What a forger without the key does: renumber and re-hash the chain (MACs left as they were)."""
    out: list[bytes] = []
    prev = "0" * 64
    for seq, raw in enumerate(lines, start=1):
        doc = json.loads(raw)
        doc["seq"], doc["prev"] = seq, prev
        line = json.dumps(doc, separators=(",", ":")).encode()
        prev = hashlib.sha256(line).hexdigest()
        out.append(line + b"\n")
    return out


def test_a_recomputed_chain_fails_verification_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    assert verify(path, "--key", str(key_of(path))) == 0
    capsys.readouterr()
    path.write_bytes(b"".join(_recompute(lines[:2] + lines[3:])))  # line 3 deleted, chain redone
    assert verify(path) == 0  # the unkeyed chain is consistent again
    capsys.readouterr()
    assert verify(path, "--key", str(key_of(path))) == 1
    out = capsys.readouterr().out
    assert "line 3" in out
    assert "MAC" in out


def test_after_a_tail_cut_the_server_records_the_gap_instead_of_continuing_silently(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    path.write_bytes(b"".join(lines[:2]))  # cut while the server was stopped
    with structlog.testing.capture_logs() as logs:
        log = AuditLog(path, clock=lambda: WALL)
        assert log.append("server.started", tokens=["codesign"])
    events = [json.loads(x) for x in path.read_text().splitlines()]
    truncated = events[2]
    assert truncated["event"] == "audit.truncated"
    assert (truncated["anchor_seq"], truncated["found_seq"]) == (5, 2)
    assert events[3]["event"] == "server.started"
    assert log.status()["truncated"] is True
    assert any(e["event"] == "audit.truncated" and e["log_level"] == "error" for e in logs)
    assert verify(path, "--anchor", str(anchor_of(path)), "--key", str(key_of(path))) == 0


def test_the_head_goes_to_the_service_log_at_start_and_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    with structlog.testing.capture_logs() as logs:
        log = AuditLog(path, clock=lambda: WALL)
        log.append("server.started", tokens=["codesign"])
        log.log_anchor()  # the server calls this periodically and at shutdown
    anchored = [e for e in logs if e["event"] == "audit.anchored"]
    assert anchored[-1]["seq"] == 4
    assert anchored[-1]["head"] == json.loads(anchor_of(path).read_text())["head"]
