"""Issue 19 #2 and #3: the first install reaches a running service, and rotation keeps it running.

`install-service` writes configs the service user can read before its group exists (no secret
inside: the key is a systemd credential), builds the unit's `LoadCredential=` lines from the
config's `credential:NAME` values, and prints the next steps in the order that works. The
server reads `credential:NAME` from `$CREDENTIALS_DIRECTORY` as systemd provides it, and a
certificate renewed for the same key is picked up by a reload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from systemd_support import make_stack, served_serial, server_cmd, spawn

from bridge_admin import install
from protocol.runtime.config import dump_yaml, load_yaml

BINDIR = str(Path(sys.executable).parent)
TOKENBRIDGE = [BINDIR + "/tokenbridge"]
SERVER_LINE = "LoadCredential=tokenbridge-server.key:/etc/credstore/tokenbridge-server.key"


def _install(prefix: Path, role: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [*TOKENBRIDGE, "install-service", role, "--prefix", str(prefix), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)


@pytest.fixture
def open_root() -> Iterator[Path]:
    """An install prefix other users can traverse (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="tb-install-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("role", ["server", "client"])
def test_install_writes_a_secret_free_config_any_user_can_read_and_a_credential_line(
    open_root: Path, role: str
) -> None:
    tmp_path = open_root
    doc = json.loads(_install(tmp_path, role, "--json").stdout)
    config = tmp_path / f"etc/tokenbridge/{role}.yaml"
    assert (config.stat().st_mode & 0o777, config.stat().st_uid) == (0o644, os.geteuid())
    assert f"credential:tokenbridge-{role}.key" in config.read_text()
    unit = (tmp_path / f"etc/systemd/system/tokenbridge-{role}.service").read_text()
    line = f"LoadCredential=tokenbridge-{role}.key:/etc/credstore/tokenbridge-{role}.key"
    assert unit.count("\nLoadCredential") == 1 and f"\n{line}\n" in unit
    assert doc["credentials"] == [line]
    assert {f["path"]: f["mode"] for f in doc["files"]}[str(config)] == "0644"
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # The service user before `systemd-sysusers` ran: a uid in no group at all.
        read = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(config)],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert read.returncode == 0, read.stderr


def test_next_steps_come_in_the_order_that_works_and_never_chgrp_a_key(tmp_path: Path) -> None:
    out = _install(tmp_path, "server").stdout
    order = [
        "systemd-sysusers",
        "systemd-tmpfiles --create",
        "install -D -m 0600 -o root -g root KEY_FILE /etc/credstore/tokenbridge-server.key",
        "edit /etc/tokenbridge/server.yaml",
        "udevadm control --reload",
        "tokenbridge-server check-config --config /etc/tokenbridge/server.yaml",
        "systemctl daemon-reload",
        "systemctl enable --now tokenbridge-server.service",
    ]
    positions = [out.index(step) for step in order]
    assert positions == sorted(positions), out
    assert "chgrp" not in out and "chmod 0640" not in out


def test_the_unit_loads_every_credential_the_config_names_and_none_for_a_key_file(tmp_path: Path) -> None:
    example = load_yaml(Path(install.files_dir()) / "examples" / "server.yaml")
    example["tls"]["ca"] = "credential:tokenbridge-ca.pem"
    config = tmp_path / "server.yaml"
    config.write_text(dump_yaml(example))
    _install(tmp_path / "root", "server", "--config", str(config))
    unit = (tmp_path / "root/etc/systemd/system/tokenbridge-server.service").read_text()
    assert (
        SERVER_LINE in unit and "LoadCredential=tokenbridge-ca.pem:/etc/credstore/tokenbridge-ca.pem" in unit
    )

    # An existing install whose key is still a file: no LoadCredential= of a file that is not
    # there (systemd would refuse to start the unit), and no credential step.
    example["tls"]["ca"], example["tls"]["key"] = "pki/ca.pem", "pki/tokenhost.example.key"
    config.write_text(dump_yaml(example))
    out = _install(tmp_path / "old", "server", "--config", str(config)).stdout
    unit = (tmp_path / "old/etc/systemd/system/tokenbridge-server.service").read_text()
    assert "\nLoadCredential" not in unit and "/etc/credstore" not in out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_a_unit_with_several_credential_lines_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    creds = [install.Credential("tokenbridge-server.key"), install.Credential("codesign.pin", encrypted=True)]
    unit = tmp_path / "tokenbridge-server.service"
    unit.write_bytes(install.render_unit(unit.name, BINDIR, creds))
    text = unit.read_text()
    assert "LoadCredentialEncrypted=codesign.pin:/etc/credstore.encrypted/codesign.pin" in text
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and unit.name not in result.stderr, result.stderr


def _credentials_dir(tmp_path: Path, key: Path) -> Path:
    """What systemd makes of LoadCredential=tokenbridge-server.key:KEY: a private copy, 0400."""
    creds = tmp_path / "credentials" / "tokenbridge-server.service"
    creds.mkdir(parents=True)
    shutil.copyfile(key, creds / "tokenbridge-server.key")
    os.chmod(creds / "tokenbridge-server.key", 0o400)
    os.chmod(creds, 0o500)
    return creds


def _use_credential(stack_config: Path) -> None:
    doc = load_yaml(stack_config)
    doc["tls"]["key"] = "credential:tokenbridge-server.key"
    stack_config.write_text(dump_yaml(doc))


def test_the_server_starts_with_its_key_from_the_credentials_directory_and_reloads_a_renewal(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path / "stack")
    key, cert = stack.pki.folder / "localhost.key", stack.pki.folder / "localhost.pem"
    creds = _credentials_dir(tmp_path, key)
    key.unlink()  # the key exists only as the credential now
    config = stack.workdir / "server.yaml"
    _use_credential(config)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}

    check = subprocess.run(
        [sys.executable, "-m", "bridge_server", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    proc = spawn(server_cmd(stack), tmp_path / "server.log", None, extra_env=env)
    try:
        proc.wait_log('"server.ready"', timeout=30)
        original = served_serial(stack)
        renewed = stack.pki.renew("localhost")  # same key: the credential stays valid
        assert int(renewed.serial, 16) != original
        assert x509.load_pem_x509_certificate(cert.read_bytes()).serial_number == int(renewed.serial, 16)
        mark = len(proc.log())
        proc.signal(signal.SIGHUP)
        proc.wait_log('"tls.reloaded"', after=mark)
        assert served_serial(stack) == int(renewed.serial, 16)
    finally:
        proc.stop()


def test_a_missing_credential_is_named_with_where_systemd_takes_it_from(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "stack")
    config = stack.workdir / "server.yaml"
    _use_credential(config)
    empty = tmp_path / "credentials"
    empty.mkdir()
    check = subprocess.run(
        [sys.executable, "-m", "bridge_server", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "CREDENTIALS_DIRECTORY": str(empty)},
    )  # fmt: skip
    assert check.returncode == 1
    assert "credential tokenbridge-server.key not found" in check.stderr
    assert "LoadCredential=tokenbridge-server.key:/etc/credstore/tokenbridge-server.key" in check.stderr


def test_reissuing_a_group_readable_key_keeps_it_readable_and_a_reload_serves_the_new_pair(
    tmp_path: Path,
) -> None:
    """Issue 19 #3, for sites that keep the key as a file for the service's group: re-issuing
    used to reset it to 0600 without the group, and the reload then failed."""
    stack = make_stack(tmp_path / "stack")
    key = stack.pki.folder / "localhost.key"
    group = 65534 if os.geteuid() == 0 else next(iter(set(os.getgroups()) - {os.getegid()}), None)
    if group is None:
        pytest.skip("needs root or a supplementary group")
    os.chown(key, -1, group)
    os.chmod(key, 0o640)
    proc = spawn(server_cmd(stack), tmp_path / "server.log", None)
    try:
        proc.wait_log('"server.ready"', timeout=30)
        issued = stack.pki.issue_server(["localhost", "127.0.0.1"], out=stack.pki.folder)  # new key and cert
        assert (key.stat().st_mode & 0o777, key.stat().st_gid) == (0o640, group)
        mark = len(proc.log())
        proc.signal(signal.SIGHUP)
        proc.wait_log('"tls.reloaded"', after=mark)
        assert served_serial(stack) == int(issued.serial, 16)
    finally:
        proc.stop()
