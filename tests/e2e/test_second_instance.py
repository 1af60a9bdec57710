"""Issue 19 #1: a second tokenbridge-server on the same config must not touch the live one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from admin_stack import CLI, admin_stack

SERVER = [sys.executable, "-m", "bridge_server"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_second_instance_refuses_and_leaves_the_live_one_alone(tmp_path: Path) -> None:
    with admin_stack(tmp_path, ["build-vm-01"], ["build-vm-01"]) as stack:
        config = stack.workdir / "server.yaml"
        sock = stack.workdir / "control.sock"
        audit = stack.workdir / "audit.jsonl"
        second = _run([*SERVER, "--config", str(config)])
        out = second.stdout + second.stderr
        assert second.returncode == 1, out
        assert "already running" in second.stderr and str(stack.server.proc.pid) in second.stderr, out
        assert "Traceback" not in out and "ExceptionGroup" not in out
        status = _run([*CLI, "status", "--socket", str(sock)])
        assert status.returncode == 0, status.stdout + status.stderr
        verify = _run([*CLI, "audit", "verify", str(audit)])
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert ": ok," in verify.stdout


def test_check_config_starts_nothing(tmp_path: Path) -> None:
    with admin_stack(tmp_path, ["build-vm-01"], ["build-vm-01"]) as stack:
        config = stack.workdir / "server.yaml"
        for argv in (["check-config", "--config", str(config)], ["--config", str(config), "check-config"]):
            checked = _run([*SERVER, *argv])
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "ok" in checked.stdout
        status = _run([*CLI, "status", "--socket", str(stack.workdir / "control.sock")])
        assert status.returncode == 0, status.stdout + status.stderr
        verify = _run([*CLI, "audit", "verify", str(stack.workdir / "audit.jsonl")])
        assert verify.returncode == 0, verify.stdout + verify.stderr
