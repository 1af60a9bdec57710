"""Issue 19 #5: start and admin failures are one line on stderr and an exit code, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from admin_stack import CLI, admin_stack

from bridge_admin.local_stack import BridgeStack, wait_for

SERVER = [sys.executable, "-m", "bridge_server", "--log-level", "error"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _one_line(proc: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The single human line on stderr (JSON log lines aside); no traceback anywhere."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "ExceptionGroup" not in out, out
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith(prefix), out
    return lines[0]


def _stack(tmp_path: Path) -> tuple[BridgeStack, Path]:
    stack = BridgeStack(tmp_path)
    stack.make_pki([])
    return stack, stack.write_server_config([])


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    stack, config = _stack(tmp_path)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", stack.server_port))
        busy.listen(1)
        proc = _run([*SERVER, "--config", str(config)])
    line = _one_line(proc, "tokenbridge-server: ")
    assert proc.returncode == 1
    assert f"127.0.0.1:{stack.server_port}" in line and "already in use" in line


def test_missing_certificate_is_one_line(tmp_path: Path) -> None:
    _, config = _stack(tmp_path)
    (tmp_path / "pki" / "localhost.pem").unlink()
    for argv in (["--config", str(config)], ["check-config", "--config", str(config)]):
        proc = _run([*SERVER, *argv])
        line = _one_line(proc, "tokenbridge-server: ")
        assert proc.returncode == 1
        assert "localhost.pem not found" in line


# Root (the CI user) can read any file: the server runs with the key's read denied instead.
_KEY_DENIED = """
import pathlib, sys
real = pathlib.Path.read_bytes
def read_bytes(self):
    if self.name == "localhost.key":
        raise PermissionError(13, "Permission denied", str(self))
    return real(self)
pathlib.Path.read_bytes = read_bytes
from bridge_server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_unreadable_key_is_one_line_saying_permission_denied(tmp_path: Path) -> None:
    _, config = _stack(tmp_path)
    key = tmp_path / "pki" / "localhost.key"
    for argv in (["--config", str(config)], ["check-config", "--config", str(config)]):
        proc = _run([sys.executable, "-c", _KEY_DENIED, "--log-level", "error", *argv])
        line = _one_line(proc, "tokenbridge-server: ")
        assert proc.returncode == 1
        assert line == (
            f"tokenbridge-server: cannot read key file {key}: permission denied "
            "(the service user must be able to read it)"
        )


def test_status_with_a_revoked_admin_certificate_is_one_line(tmp_path: Path) -> None:
    with admin_stack(tmp_path, [], []) as stack:
        stack.pki.revoke("ops")
        bundle = stack.pki.folder / "clients" / "ops"
        argv = [*CLI, "status", "--server", f"127.0.0.1:{stack.server_port}", "--server-name", "localhost"]
        # The server notices the new CRL by itself (file watcher): the first refused attempt.
        proc = wait_for(
            lambda: (p := _run([*argv, "--bundle", str(bundle)])).returncode != 0 and p,
            timeout=30,
            interval=0.5,
            what="the server to refuse the revoked admin certificate",
        )
    line = _one_line(proc, "tokenbridge: ")
    assert proc.returncode == 1
    assert f"127.0.0.1:{stack.server_port}" in line


def test_audit_verify_of_a_missing_file_says_cannot_read(tmp_path: Path) -> None:
    proc = _run([*CLI, "audit", "verify", str(tmp_path / "nonexistent.jsonl")])
    line = _one_line(proc, "tokenbridge audit verify: ")
    assert proc.returncode == 2
    assert "cannot read" in line and "BROKEN" not in proc.stdout + proc.stderr
