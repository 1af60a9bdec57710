"""Audit rotation by size (issue 13 item 4): `audit: {max_bytes, keep}`; the chain runs across files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge_admin.cli import main as tokenbridge
from bridge_server.config import parse_server_config
from bridge_server.guard.audit import AuditLog
from protocol.errors import ConfigError

WALL = 1_700_000_000.0


def fill(path: Path, n: int, *, max_bytes: int = 2048, keep: int = 2) -> AuditLog:
    log = AuditLog(path, clock=lambda: WALL, max_bytes=max_bytes, keep=keep)
    for i in range(n):
        assert log.append("command.refused", token="codesign", client_id="vm1", ins="DA", n=i)
    return log


def test_the_log_rotates_by_size_and_keeps_only_keep_old_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 200)
    names = sorted(p.name for p in tmp_path.glob("audit.jsonl*"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.anchor", "audit.jsonl.key"]
    for p in (path, tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl.2"):
        assert p.stat().st_size <= 2048


def test_the_chain_continues_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fill(path, 200)
    older = [json.loads(x) for x in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    current = [json.loads(x) for x in path.read_text().splitlines()]
    assert current[0]["event"] == "audit.rotated"
    assert current[0]["seq"] == older[-1]["seq"] + 1
    seqs = [d["seq"] for d in older + current]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_verify_checks_a_rotated_set_as_one_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    log = fill(path, 200)
    capsys.readouterr()
    anchor, key = str(tmp_path / "audit.jsonl.anchor"), str(tmp_path / "audit.jsonl.key")
    assert tokenbridge(["audit", "verify", str(path), "--anchor", anchor, "--key", key, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == [str(tmp_path / f"audit.jsonl{s}") for s in (".2", ".1", "")]
    assert doc["last_seq"] == 200 + log.rotations
    assert doc["first_seq"] > 1  # the oldest entries were rotated away
    rotated = tmp_path / "audit.jsonl.1"
    lines = rotated.read_bytes().splitlines(keepends=True)
    rotated.write_bytes(b"".join(lines[:-1]))  # the last line of a middle file removed
    assert tokenbridge(["audit", "verify", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] == str(path)
    assert doc["line"] == 1


def test_rotation_settings_are_validated(tmp_path: Path) -> None:
    base = {
        "listen": "127.0.0.1:7447",
        "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"},
        "tokens": [{"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": ["vm1"]}],
    }
    cfg = parse_server_config(
        {**base, "audit": {"path": "a.jsonl", "max_bytes": 1048576, "keep": 3}}, "s.yaml"
    )
    assert (cfg.audit.max_bytes, cfg.audit.keep) == (1048576, 3)
    with pytest.raises(ConfigError, match=r"audit\.max_bytes"):
        parse_server_config({**base, "audit": {"path": "a.jsonl", "max_bytes": 100}}, "s.yaml")
    with pytest.raises(ConfigError, match=r"audit\.keep"):
        parse_server_config({**base, "audit": {"path": "a.jsonl", "keep": 0}}, "s.yaml")
