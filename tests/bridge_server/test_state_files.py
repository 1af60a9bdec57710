"""State files (PIN guard, epochs, audit): whole or not at all, no symlinks, a full disk fails closed.

Issue 13 items 4 and 9: a short write must not leave half a file, a symlink planted in the state
folder must not redirect a write, a state folder others can write is refused at start, and when
the guard's state cannot be saved, PIN commands are refused rather than let through.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge_admin.pki import Pki
from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from bridge_server.guard.audit import AuditLog
from bridge_server.guard.guardrails import Guardrails, Holder
from bridge_server.guard.pin_guard import REFUSAL_SW, PinGuard, PinGuardStore
from bridge_server.observe.metrics import server_rows
from bridge_server.observe.status import build_status
from bridge_server.tokens.epochs import EpochStore
from protocol.errors import ConfigError

WALL = 1_800_000_000.0
VERIFY = bytes.fromhex("0020008008313233343536FFFF")
HOLDER = Holder("vm1", ("vm1",), admin=False, epoch=1)


def _short_writes(monkeypatch: pytest.MonkeyPatch, most: int = 7) -> None:
    """Every `os.write` writes at most `most` bytes (as a signal or a nearly full disk can)."""
    real = os.write

    def short(fd: int, data: Any) -> int:
        return real(fd, bytes(data)[:most])

    monkeypatch.setattr(os, "write", short)


def test_pin_guard_state_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = PinGuard(min_retries_left=0, max_failures=3)
    guard.observe("codesign", 0x20, 0x80, True, 0x63C5, holder="vm1", now=WALL)
    store = PinGuardStore(tmp_path / "pin-guard.json")
    _short_writes(monkeypatch)
    store.save(guard)
    monkeypatch.undo()
    loaded = PinGuard()
    store.load(loaded)
    assert loaded.to_json() == guard.to_json()


def test_epoch_marks_survive_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "epochs.json"
    _short_writes(monkeypatch, most=3)
    first = EpochStore(path).first_epoch("codesign", WALL)
    monkeypatch.undo()
    assert json.loads(path.read_text())["high_water"]["codesign"] > first


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("root-owned file\n")
    return victim


def test_a_symlinked_temp_file_does_not_redirect_the_guard_state(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "pin-guard.json.tmp").symlink_to(victim)
    PinGuardStore(state / "pin-guard.json").save(PinGuard())
    assert victim.read_text() == "root-owned file\n"
    assert json.loads((state / "pin-guard.json").read_text())["tokens"] == {}


def test_a_symlinked_temp_file_does_not_redirect_the_epoch_marks(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "epochs.json.tmp").symlink_to(victim)
    EpochStore(tmp_path / "epochs.json").first_epoch("codesign", WALL)
    assert victim.read_text() == "root-owned file\n"


def test_a_symlinked_audit_log_is_not_followed(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    (tmp_path / "audit.jsonl").symlink_to(victim)
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.append("server.started", tokens=["codesign"]) is False
    assert victim.read_text() == "root-owned file\n"
    assert "symbolic link" in log.problem


def test_a_symlinked_guard_state_is_not_read(tmp_path: Path) -> None:
    other = tmp_path / "planted.json"
    other.write_text(json.dumps({"version": 1, "tokens": {}}))
    (tmp_path / "pin-guard.json").symlink_to(other)
    with pytest.raises(OSError, match="symbolic link"):
        PinGuardStore(tmp_path / "pin-guard.json").load(PinGuard())


def _server_config(folder: Path, **extra: Any) -> Any:
    pki = Pki(folder / "pki")
    pki.init()
    pki.issue_server(["localhost"])
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": "pki/ca.pem", "cert": "pki/localhost.pem", "key": "pki/localhost.key"},
        "tokens": [{"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": ["vm1"]}],
        **extra,
    }
    return parse_server_config(doc, folder / "server.yaml")


def test_a_state_folder_others_can_write_is_refused_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    config = _server_config(tmp_path, audit={"path": "state/audit.jsonl"})
    with pytest.raises(ConfigError) as caught:
        BridgeServer(config)
    message = str(caught.value)
    assert str(state) in message
    assert "chmod go-w" in message
    assert not (state / "audit.jsonl").exists()


def test_a_group_writable_guard_state_folder_is_refused_too(tmp_path: Path) -> None:
    state = tmp_path / "guard"
    state.mkdir()
    state.chmod(0o770)
    config = _server_config(tmp_path, pin_guard={"state": "guard/pin-guard.json"})
    with pytest.raises(ConfigError, match=r"pin_guard\.state"):
        BridgeServer(config)


def _unsavable(tmp_path: Path) -> PinGuardStore:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state folder should be\n")
    return PinGuardStore(blocker / "pin-guard.json")  # every save fails (ENOTDIR)


def test_the_guard_refuses_pin_commands_while_its_state_cannot_be_saved(tmp_path: Path) -> None:
    guard = PinGuard(min_retries_left=0, max_failures=3)  # one failure alone does not engage
    rails = Guardrails("codesign", guard=guard, store=_unsavable(tmp_path))
    refused = rails.screen(VERIFY, HOLDER)  # the state is saved first: that fails, so no PIN goes out
    assert refused is not None
    assert refused.sw == REFUSAL_SW
    assert "cannot save" in rails.notice(refused)
    assert rails.store.problem
    assert rails.screen(bytes.fromhex("00200080"), HOLDER) is None  # the retry-counter query spends nothing
    rails.observe(VERIFY, b"\x63\xc2", HOLDER)  # a failure seen anyway stays refused
    assert rails.screen(VERIFY, HOLDER) is not None


def test_the_guard_allows_pin_commands_again_once_its_state_is_saved(tmp_path: Path) -> None:
    guard = PinGuard(min_retries_left=0, max_failures=3)
    rails = Guardrails("codesign", guard=guard, store=_unsavable(tmp_path))
    rails.observe(VERIFY, b"\x63\xc2", HOLDER)
    assert rails.screen(VERIFY, HOLDER) is not None
    (tmp_path / "blocker").unlink()
    (tmp_path / "blocker").mkdir()  # the operator freed the disk
    assert rails.screen(VERIFY, HOLDER) is None  # saved first, then allowed
    assert rails.store.problem == ""
    saved = PinGuard()
    rails.store.load(saved)
    assert saved.to_json() == guard.to_json()


def test_the_server_starts_when_the_epoch_marks_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _server_config(tmp_path, audit={"path": "state/audit.jsonl"})
    (tmp_path / "state").mkdir(mode=0o750)

    def full(*_a: Any, **_kw: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    server = BridgeServer(config)  # raised [Errno 28] from the epoch store before
    monkeypatch.undo()
    assert "No space left" in server.epochs.problem
    assert server.guard_store.problem  # probed at start: PIN commands wait for a good save


def test_an_unsaved_state_shows_in_status_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _server_config(tmp_path, audit={"path": "state/audit.jsonl"})
    (tmp_path / "state").mkdir(mode=0o750)

    def full(*_a: Any, **_kw: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    server = BridgeServer(config)
    monkeypatch.undo()
    doc = trio.run(_status, server)
    state = doc["server"]["state"]
    assert "No space left" in state["pin_guard"]["problem"]
    assert "No space left" in state["epochs"]["problem"]
    subjects = [w["subject"] for w in doc["warnings"]]
    assert "PIN guard state" in subjects and "lease epochs" in subjects
    rows = {(n, lab.get("file")): v for n, v, lab in server_rows(server)}
    assert rows[("tokenbridge_state_saved", "pin_guard")] == 0.0
    assert rows[("tokenbridge_state_saved", "epochs")] == 0.0
    assert rows[("tokenbridge_state_saved", "audit")] == 1.0
    assert rows[("tokenbridge_audit_truncated", None)] == 0.0


async def _status(server: BridgeServer) -> dict[str, Any]:
    return build_status(server)
