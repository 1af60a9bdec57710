"""`tokenbridge pin set` and the install-service drop-in (issue 16)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bridge_admin.cli import main
from bridge_admin.install import plan
from bridge_admin.server_pin_cli import DROPIN, credential_dropin, systemd_creds_usable
from bridge_server.config import load_server_config
from bridge_server.guard.server_pin_source import read_server_pin
from protocol.runtime.config import dump_yaml


def server_yaml(tmp_path: Path, server_pin: dict[str, Any] | None) -> Path:
    token: dict[str, Any] = {
        "name": "codesign",
        "match": {"simulate": "safenet-5110"},
        "allow": ["build-vm-01"],
    }
    if server_pin is not None:
        token["server_pin"] = server_pin
    doc = {"tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"}, "tokens": [token]}
    path = tmp_path / "server.yaml"
    path.write_text(dump_yaml(doc))
    return path


def pin_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: bytes, *args: str
) -> tuple[int, dict[str, Any]]:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["pin", "set", "codesign", "--stdin", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_pin_set_writes_a_0600_file_the_server_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_yaml(tmp_path, {"file": "pins/codesign.pin", "for": ["build-vm-01"]})
    code, out = pin_set(monkeypatch, capsys, b"918273\n", "--config", str(config), "--owner", "nobody-here")
    assert code == 0, out
    path = tmp_path / "pins" / "codesign.pin"
    assert (out["kind"], out["written"]) == ("file", str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pin, problem = read_server_pin(credential=None, file=path)
    assert problem is None and pin is not None and bytes(pin.value) == b"918273"
    assert "918273" not in json.dumps(out)


@pytest.mark.parametrize(("typed", "words"), [(b"000000\n", "placeholder"), (b"12\n", "has 2 characters")])
def test_pin_set_refuses_a_pin_the_server_would_refuse_and_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    typed: bytes,
    words: str,
) -> None:
    config = server_yaml(tmp_path, {"file": "codesign.pin", "for": ["build-vm-01"]})
    code, out = pin_set(monkeypatch, capsys, typed, "--config", str(config))
    assert code == 1 and words in out["error"]
    assert not (tmp_path / "codesign.pin").exists()


def test_pin_set_on_a_token_without_server_pin_says_what_to_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = pin_set(monkeypatch, capsys, b"918273\n", "--config", str(server_yaml(tmp_path, None)))
    assert code == 1 and "has no server_pin section" in out["error"]


def test_pin_set_plain_credential_is_a_0600_file_for_load_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_yaml(tmp_path, {"credential": "codesign-pin", "for": ["build-vm-01"]})
    store = tmp_path / "creds"
    code, out = pin_set(
        monkeypatch, capsys, b"918273\n", "--config", str(config), "--credstore", str(store), "--plain"
    )
    assert code == 0, out
    assert out["unit_line"] == f"LoadCredential=codesign-pin:{store / 'codesign-pin'}"
    assert stat.S_IMODE((store / "codesign-pin").stat().st_mode) == 0o600
    pin, _ = read_server_pin(credential="codesign-pin", file=None, env={"CREDENTIALS_DIRECTORY": str(store)})
    assert pin is not None and bytes(pin.value) == b"918273"


@pytest.mark.skipif(
    not systemd_creds_usable() and os.environ.get("CI") != "true",
    reason="systemd-creds cannot encrypt here (not installed, or not root); CI installs and runs it as root",
)
def test_pin_set_encrypts_with_systemd_creds_and_the_credential_decrypts_as_systemd_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_yaml(tmp_path, {"credential": "codesign-pin", "for": ["build-vm-01"]})
    store = tmp_path / "creds"
    code, out = pin_set(monkeypatch, capsys, b"918273\n", "--config", str(config), "--credstore", str(store))
    assert code == 0, out
    encrypted = store / "codesign-pin.cred"
    assert (out["encrypted"], out["unit_line"]) == (True, f"LoadCredentialEncrypted=codesign-pin:{encrypted}")
    assert b"918273" not in encrypted.read_bytes()
    clear = subprocess.run(
        ["systemd-creds", "decrypt", "--name=codesign-pin", str(encrypted), "-"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    assert clear.stdout == b"918273"
    assert "restart tokenbridge-server" in " ".join(out["next"])


def test_install_service_adds_the_credential_drop_in_only_for_tokens_with_one(tmp_path: Path) -> None:
    with_pin = load_server_config(
        server_yaml(tmp_path, {"credential": "codesign-pin", "for": ["build-vm-01"]})
    )
    dropin = credential_dropin(with_pin, tmp_path)
    assert dropin is not None
    assert f"LoadCredentialEncrypted=codesign-pin:{tmp_path}/codesign-pin.cred" in dropin.decode()
    (tmp_path / "codesign-pin").write_text("918273")  # a plain credential written by `pin set --plain`
    assert (
        f"LoadCredential=codesign-pin:{tmp_path}/codesign-pin\n"
        in (credential_dropin(with_pin, tmp_path) or b"").decode()
    )
    assert DROPIN in [a.dest for a in plan("server", bindir="/opt/tokenbridge/bin", config=with_pin)]
    without = load_server_config(server_yaml(tmp_path, None))
    assert credential_dropin(without) is None
    assert DROPIN not in [a.dest for a in plan("server", bindir="/opt/tokenbridge/bin", config=without)]


def test_pin_set_asks_twice_without_echo_and_two_different_pins_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_yaml(tmp_path, {"file": "codesign.pin", "for": ["build-vm-01"]})
    typed = iter(["918273", "918274"])
    prompts: list[str] = []

    def getpass(prompt: str) -> str:
        prompts.append(prompt)
        return next(typed)

    monkeypatch.setattr("getpass.getpass", getpass)
    assert main(["pin", "set", "codesign", "--config", str(config)]) == 1
    assert prompts == ["PIN: ", "PIN again: "]
    assert "differ" in capsys.readouterr().err
    assert not (tmp_path / "codesign.pin").exists()
    typed = iter(["918273", "918273"])
    assert main(["pin", "set", "codesign", "--config", str(config)]) == 0
    assert (tmp_path / "codesign.pin").read_bytes() == b"918273\n"
    assert "918273" not in capsys.readouterr().out
