"""What the journal shows of a start: version and config path first, addresses as plain text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from admin_fixtures import Certs, running
from structlog.testing import capture_logs

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _first_json_line(stderr: str) -> dict[str, object]:
    for line in stderr.splitlines():
        if line.startswith("{"):
            doc: dict[str, object] = json.loads(line)
            return doc
    raise AssertionError(f"no JSON line in {stderr!r}")


def test_the_server_logs_its_version_and_config_path_before_anything_else(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        'listen: "127.0.0.1:0"\ntls: {ca: ca.pem, cert: localhost.pem, key: localhost.key}\n'
        "tokens: [{name: codesign, match: {simulate: safenet-5110}, allow: [build-vm-01]}]\n"
    )  # no certificates: the start fails after the first line
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge_server", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    first = _first_json_line(proc.stderr)
    assert (first["event"], first["version"], first["config"]) == ("server.starting", VERSION, str(config))


def test_the_client_logs_its_version_and_config_path_before_anything_else(tmp_path: Path) -> None:
    config = tmp_path / "client.yaml"
    config.write_text("server: [not, an, address]\n")  # a config it cannot run with: exit 2
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    proc = subprocess.run(
        [sys.executable, "-m", "bridge_client", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    first = _first_json_line(proc.stderr)
    assert (first["event"], first["version"], first["config"]) == ("client.starting", VERSION, str(config))


async def test_listening_addresses_are_logged_as_host_colon_port(tmp_path: Path) -> None:
    Certs(tmp_path)
    with capture_logs() as logs:
        async with running(tmp_path) as (_srv, port):
            pass
    (listening,) = [e for e in logs if e["event"] == "server.listening"]
    assert listening["addresses"] == [f"127.0.0.1:{port}"]  # not "('127.0.0.1', 35853)"
