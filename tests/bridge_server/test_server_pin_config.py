"""A token's `server_pin` (issue 16): config errors, and reading the PIN the way systemd provides it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bridge_server.config import load_server_config, load_server_pins, parse_server_config
from bridge_server.guard.server_pin_source import ServerPinError, read_server_pin
from protocol.errors import ConfigError
from protocol.runtime.config import dump_yaml

CFG = Path("/etc/tokenbridge/server.yaml")
SERVICE_UID = os.geteuid()


def doc_with(server_pin: dict[str, Any], *, simulate: str = "safenet-5110", **match: Any) -> dict[str, Any]:
    return {
        "tls": {"ca": "pki/ca.pem", "cert": "pki/server.pem", "key": "pki/server.key"},
        "tokens": [
            {
                "name": "codesign",
                "match": match or {"simulate": simulate},
                "allow": ["build-vm-01", "build-vm-02"],
                "server_pin": server_pin,
            }
        ],
    }


def error_of(server_pin: dict[str, Any], **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_server_config(doc_with(server_pin, **kw), CFG)
    return info.value


# -- parsing -------------------------------------------------------------------------------------


def test_a_credential_source_with_its_identities_parses_with_the_piv_reference() -> None:
    cfg = parse_server_config(doc_with({"credential": "codesign-pin", "for": ["build-vm-01"]}), CFG)
    sp = cfg.tokens[0].server_pin
    assert sp is not None
    assert (sp.credential, sp.file, sp.identities, sp.references) == (
        "codesign-pin",
        None,
        ("build-vm-01",),
        {0x80},
    )
    assert sp.pin is None  # parsing alone never reads the PIN


def test_a_relative_file_resolves_against_the_config_folder_and_references_take_hex() -> None:
    cfg = parse_server_config(
        doc_with({"file": "codesign.pin", "for": ["build-vm-02"], "references": ["81", 0x80]}), CFG
    )
    sp = cfg.tokens[0].server_pin
    assert sp is not None
    assert sp.file == Path("/etc/tokenbridge/codesign.pin")
    assert sp.references == {0x80, 0x81}


def test_a_token_without_server_pin_has_none() -> None:
    doc = doc_with({})
    del doc["tokens"][0]["server_pin"]
    assert parse_server_config(doc, CFG).tokens[0].server_pin is None


@pytest.mark.parametrize(
    ("server_pin", "key", "words"),
    [
        ({"for": ["build-vm-01"]}, "tokens[0].server_pin", "exactly one of credential"),
        ({"credential": "a", "file": "/x", "for": ["build-vm-01"]}, "tokens[0].server_pin", "exactly one"),
        (
            {"credential": "../etc/shadow", "for": ["build-vm-01"]},
            "tokens[0].server_pin.credential",
            "not a credential name",
        ),
        ({"credential": "pin"}, "tokens[0].server_pin.for", "required"),
        (
            {"credential": "pin", "for": ["build-vm-1"]},
            "tokens[0].server_pin.for[0]",
            "did you mean 'build-vm-01'",
        ),
        (
            {"credential": "pin", "for": ["ops-laptop"]},
            "tokens[0].server_pin.for[0]",
            "add it to the token's allow list",
        ),
        (
            {"credential": "pin", "for": ["build-vm-01"], "references": [256]},
            "tokens[0].server_pin.references[0]",
            "0x00..0xFF",
        ),
        (
            {"credential": "pin", "for": ["build-vm-01"], "references": "80"},
            "tokens[0].server_pin.references",
            "a list",
        ),
        (
            {"credential": "pin", "for": ["build-vm-01"], "pin": "123456"},
            "tokens[0].server_pin",
            "never written",
        ),
        ({"credential": "pin", "fro": ["build-vm-01"]}, "tokens[0].server_pin.fro", "did you mean 'for'"),
    ],
)
def test_config_errors_name_the_key_and_what_to_do(server_pin: dict[str, Any], key: str, words: str) -> None:
    err = error_of(server_pin)
    assert err.key == key, str(err)
    assert words in str(err)


def test_the_pin_itself_has_no_key_in_the_yaml() -> None:
    err = error_of({"credential": "pin", "for": ["build-vm-01"], "pin": "918273"})
    assert err.key == "tokens[0].server_pin"
    assert "918273" not in str(err)


def test_a_pkcs15_token_must_name_its_pin_reference() -> None:
    err = error_of({"credential": "pin", "for": ["build-vm-01"]}, vid=0x0529, pid=0x0620)
    assert err.key == "tokens[0].server_pin.references"
    assert "e.g. [0x01]" in str(err)


# -- reading the PIN ----------------------------------------------------------------------------


def write(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_a_credential_is_read_from_credentials_directory_as_systemd_sets_it(tmp_path: Path) -> None:
    write(tmp_path / "codesign-pin", b"918273", 0o400)
    pin, problem = read_server_pin(
        credential="codesign-pin", file=None, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert problem is None and pin is not None
    assert bytes(pin.value) == b"918273"


def test_without_credentials_directory_the_pin_is_missing_and_says_how_to_fix_it() -> None:
    pin, problem = read_server_pin(credential="codesign-pin", file=None, env={})
    assert pin is None and problem is not None
    assert "LoadCredentialEncrypted=codesign-pin" in problem


def test_a_missing_file_is_missing_not_an_error(tmp_path: Path) -> None:
    pin, problem = read_server_pin(credential=None, file=tmp_path / "nope.pin")
    assert pin is None and problem is not None and "tokenbridge pin set" in problem


def test_one_trailing_newline_is_not_part_of_the_pin(tmp_path: Path) -> None:
    for content in (b"918273\n", b"918273\r\n", b"918273"):
        pin, _ = read_server_pin(credential=None, file=write(tmp_path / "p", content))
        assert pin is not None and bytes(pin.value) == b"918273"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_a_pin_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "p", b"918273", mode)
    with pytest.raises(ServerPinError, match=f"mode {mode:04o}.*chmod 600"):
        read_server_pin(credential=None, file=path)


def test_a_pin_file_of_mode_0400_is_accepted(tmp_path: Path) -> None:
    pin, _ = read_server_pin(credential=None, file=write(tmp_path / "p", b"918273", 0o400))
    assert pin is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_pin_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "p", b"918273")
    os.chown(path, 65534, -1)
    with pytest.raises(ServerPinError, match="owned by uid 65534"):
        read_server_pin(credential=None, file=path)


def test_a_symlink_to_a_pin_file_is_refused(tmp_path: Path) -> None:
    real = write(tmp_path / "real", b"918273")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ServerPinError, match="cannot open"):
        read_server_pin(credential=None, file=link)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"123", "has 3 characters"),
        (b"1" * 17, "has 17 characters"),
        (b"12 3456", "printable ASCII"),
        (b"12\x003456", "printable ASCII"),
        (b"000000\n", "is the placeholder"),
        (b"1" * 65, "larger than 64 bytes"),
    ],
)
def test_bad_pin_content_is_refused_without_showing_it(tmp_path: Path, content: bytes, words: str) -> None:
    path = write(tmp_path / "p", content)
    with pytest.raises(ServerPinError) as info:
        read_server_pin(credential=None, file=path)
    assert words in str(info.value)
    if words != "is the placeholder":  # the placeholder is no secret
        assert content.decode(errors="replace").strip() not in str(info.value)


def test_loading_the_config_reads_the_pin_and_a_loose_file_is_a_config_error(tmp_path: Path) -> None:
    pin_file = write(tmp_path / "codesign.pin", b"918273\n")
    path = tmp_path / "server.yaml"
    path.write_text(dump_yaml(doc_with({"file": "codesign.pin", "for": ["build-vm-01"]})))
    sp = load_server_pins(load_server_config(path)).tokens[0].server_pin
    assert sp is not None and sp.pin is not None and bytes(sp.pin.value) == b"918273"
    assert "918273" not in repr(load_server_pins(load_server_config(path)))
    pin_file.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_server_pins(load_server_config(path))
    assert info.value.key == "tokens[0].server_pin.file"
    assert "chmod 600" in str(info.value)


def test_admin_tools_read_the_config_without_touching_the_pin(tmp_path: Path) -> None:
    write(tmp_path / "codesign.pin", b"918273\n", 0o644)  # loose: the daemon would refuse it
    path = tmp_path / "server.yaml"
    path.write_text(dump_yaml(doc_with({"file": "codesign.pin", "for": ["build-vm-01"]})))
    sp = load_server_config(path).tokens[0].server_pin
    assert sp is not None and sp.pin is None and sp.problem == ""


def test_loading_with_the_credential_absent_keeps_the_server_running_and_says_missing(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(dump_yaml(doc_with({"file": "codesign.pin", "for": ["build-vm-01"]})))
    sp = load_server_pins(load_server_config(path)).tokens[0].server_pin
    assert sp is not None and sp.pin is None
    assert "does not exist" in sp.problem
