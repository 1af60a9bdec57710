"""Issue 19 #1: one server per state folder; the lock names its holder and goes with the process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge_server.config import ServerConfig, parse_server_config
from bridge_server.guard.instance_lock import LOCK_NAME, InstanceLocked, instance_lock, state_folders


def _config(tmp_path: Path, **extra: object) -> ServerConfig:
    doc = {
        "listen": "127.0.0.1:7447",
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [{"name": "codesign", "match": {"simulate": "safenet-5110"}, "allow": ["a"]}],
        **extra,
    }
    return parse_server_config(doc, tmp_path / "server.yaml")


def test_a_second_holder_is_refused_with_the_pid_and_the_lock(tmp_path: Path) -> None:
    config = _config(tmp_path, audit={"path": "state/audit.jsonl"}, control={"socket": "run/control.sock"})
    root = tmp_path.resolve()
    assert state_folders(config) == [root / "run", root / "state"]
    with instance_lock(config) as locks:
        assert {p.read_text() for p in locks} == {f"{os.getpid()}\n"}
        with pytest.raises(InstanceLocked) as refused, instance_lock(config):
            pass
        assert f"PID {os.getpid()} holds" in str(refused.value)
        assert str(tmp_path.resolve() / "run" / LOCK_NAME) in str(refused.value)
    with instance_lock(config):  # released with the first holder: a left-over file is harmless
        pass


def test_no_state_files_no_lock(tmp_path: Path) -> None:
    assert state_folders(_config(tmp_path)) == []
