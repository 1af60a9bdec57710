"""Audit log: hash chain, `audit verify` pinpointing tampering, and an unwritable log refusing leases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trio
from rails_fakes import PivDevice, lease, make_manager, make_rails, settle
from server_fakes import Client

from bridge_admin.cli import main as tokenbridge
from bridge_server.guard.audit import ZERO_HASH, AuditLog, verify_file
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from protocol import wire


def write_log(path: Path, n: int = 5) -> list[bytes]:
    log = AuditLog(path, clock=lambda: 1_700_000_000.0)
    for i in range(n):
        assert log.append("lease.granted", token="codesign", client_id=f"vm{i}")
    return path.read_bytes().splitlines(keepends=True)


def test_each_entry_carries_a_sequence_and_the_hash_of_the_previous_line(tmp_path: Path) -> None:
    lines = write_log(tmp_path / "audit.jsonl", 3)
    docs = [json.loads(line) for line in lines]
    assert [d["seq"] for d in docs] == [1, 2, 3]
    assert docs[0]["prev"] == ZERO_HASH
    assert docs[1]["prev"] == hashlib.sha256(lines[0].rstrip(b"\n")).hexdigest()
    assert docs[2]["prev"] == hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()
    assert docs[0]["ts"] == "2023-11-14T22:13:20.000Z"


def test_a_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    AuditLog(path).append("server.started", tokens=["codesign"])
    result = verify_file(path)
    assert (result.ok, result.entries, result.last_seq) == (True, 3, 3)


def test_verify_accepts_an_untouched_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    result = verify_file(path)
    assert (result.ok, result.entries, result.line) == (True, 5, None)


def test_verify_pinpoints_an_edited_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    lines[2] = lines[2].replace(b'"vm2"', b'"vm9"')
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert (result.ok, result.line, result.entries) == (False, 3, 2)
    assert "edited" in result.problem


def test_verify_pinpoints_a_deleted_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert (result.ok, result.line) == (False, 2)
    assert "entry 2 is missing" in result.problem


def test_verify_notices_reordered_and_truncated_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    path.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    assert verify_file(path).line == 2
    path.write_bytes(b"".join(lines)[:-10])
    result = verify_file(path)
    assert (result.line, result.entries) == (5, 4)
    assert "cut off" in result.problem


def test_audit_verify_command_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path)
    assert tokenbridge(["audit", "verify", str(path)]) == 0
    assert "ok, 5 entries" in capsys.readouterr().out
    path.write_bytes(b"".join(lines[:3] + lines[4:]))
    assert tokenbridge(["audit", "verify", str(path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["line"], doc["last_seq"]) == (False, 4, 3)


def test_payload_bytes_cannot_enter_the_audit_log(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not allowed"):
        AuditLog(tmp_path / "a.jsonl").append("pin.verified", data=b"123456")


async def test_an_unwritable_log_refuses_new_leases_and_service_resumes_by_itself(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    path.mkdir()  # unwritable from the start (as root too: a directory cannot be opened for appending)
    rails = make_rails(tmp_path, audit_path=path)
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), rails)
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    await manager.request_lease(client.sub)
    await settle()
    errors = client.of_type(wire.ErrorMessage)
    assert [e.code for e in errors] == ["audit_unavailable"]
    assert str(path) in errors[0].message
    status = rails.audit.status()
    assert (status["available"], status["pending"]) == (False, 2)
    assert str(path) in status["problem"]
    assert manager.snapshot()["holder"] is None

    path.rmdir()
    epoch = await lease(manager, client)  # the next request retries the log first
    assert epoch == 1000
    assert rails.audit.status()["available"] is True
    events = [json.loads(x)["event"] for x in path.read_text().splitlines()]
    # The entries that waited went in first, in order: no hole in the chain.
    assert events == ["token.attached", "lease.requested", "lease.requested", "lease.granted"]
    assert verify_file(path).ok
