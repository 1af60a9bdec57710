"""Server config parsing (DESIGN §6): defaults, relative paths, errors that name file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge_server.config import LeaseConfig, LimitsConfig, TokenMatch, parse_server_config
from protocol.errors import ConfigError

CFG = Path("/etc/tokenbridge/server.yaml")


def minimal(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tls": {"ca": "pki/ca.pem", "cert": "pki/server.pem", "key": "pki/server.key"},
        "tokens": [{"name": "codesign", "match": {"simulate": "safenet-5110"}, "allow": ["build-vm-01"]}],
    }
    doc.update(extra)
    return doc


def error_of(doc: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_server_config(doc, CFG)
    return info.value


def test_design_example_parses_with_every_value() -> None:
    doc = {
        "listen": "0.0.0.0:7447",
        "tls": {"ca": "pki/ca.pem", "cert": "pki/server.pem", "key": "pki/server.key", "crl": "pki/crl.pem"},
        "admins": ["ops-laptop"],
        "tokens": [
            {
                "name": "codesign",
                "match": {"vid": 0x0529, "pid": 0x0620, "serial": "0247A1B2"},
                "allow": ["build-vm-01", "build-vm-02"],
            },
        ],
        "lease": {"linger_s": 2, "idle_timeout_s": 60, "max_hold_s": 1800, "queue_timeout_s": 900},
        "pin_guard": {"min_retries_left": 2, "max_failures": 1},
        "audit": {"path": "/var/lib/tokenbridge/audit.jsonl"},
        "control": {"socket": "/run/tokenbridge/control.sock"},
    }
    cfg = parse_server_config(doc, CFG)
    assert (cfg.host, cfg.port) == ("0.0.0.0", 7447)
    assert cfg.tls.ca == Path("/etc/tokenbridge/pki/ca.pem")
    assert cfg.tls.crl == Path("/etc/tokenbridge/pki/crl.pem")
    assert cfg.admins == ("ops-laptop",)
    assert cfg.tokens[0].match == TokenMatch(vid=0x0529, pid=0x0620, serial="0247A1B2")
    assert cfg.tokens[0].allow == ("build-vm-01", "build-vm-02")
    assert cfg.lease == LeaseConfig(
        linger_s=2.0, idle_timeout_s=60.0, max_hold_s=1800.0, queue_timeout_s=900.0
    )
    assert cfg.pin_guard.max_failures == 1
    assert cfg.audit.path == Path("/var/lib/tokenbridge/audit.jsonl")
    assert cfg.control.socket == Path("/run/tokenbridge/control.sock")


def test_defaults_apply_when_sections_are_missing() -> None:
    cfg = parse_server_config(minimal(), CFG)
    assert cfg.port == 7447
    assert cfg.heartbeat_s == 10.0
    assert cfg.limits == LimitsConfig(max_connections=256, max_handshakes=32, handshake_timeout_s=10.0)
    assert cfg.lease.linger_s == 2.0
    assert cfg.audit.path is None


def test_simulated_token_state_path_resolves_against_the_config_folder() -> None:
    doc = minimal(tokens=[{"name": "t", "match": {"simulate": "yubikey5", "state": "sim"}, "allow": ["x"]}])
    match = parse_server_config(doc, CFG).tokens[0].match
    assert match == TokenMatch(simulate="yubikey5", state=Path("/etc/tokenbridge/sim"))


def test_ipv6_listen_address_and_bare_host() -> None:
    assert parse_server_config(minimal(listen="[::1]:9000"), CFG).host == "::1"
    cfg = parse_server_config(minimal(listen="127.0.0.1"), CFG)
    assert (cfg.host, cfg.port) == ("127.0.0.1", 7447)


def test_unknown_key_names_the_file_and_suggests_the_close_one() -> None:
    err = error_of(minimal(lease={"idle_timeout": 5}))
    assert err.path == str(CFG)
    assert err.key == "lease.idle_timeout"
    assert "did you mean 'idle_timeout_s'" in err.problem


def test_unknown_top_level_key_lists_known_keys_when_nothing_is_close() -> None:
    err = error_of(minimal(zzz=1))
    assert err.key == "zzz"
    assert "allowed keys: " in err.problem and "tokens" in err.problem


def test_missing_tls_key_is_reported_with_its_dotted_path() -> None:
    doc = minimal(tls={"ca": "a", "cert": "b"})
    assert error_of(doc).key == "tls.key"


@pytest.mark.parametrize(
    ("section", "problem_key"),
    [
        ({"lease": {"linger_s": -1}}, "lease.linger_s"),
        ({"lease": {"max_hold_s": "long"}}, "lease.max_hold_s"),
        ({"limits": {"max_connections": 0}}, "limits.max_connections"),
        ({"heartbeat_s": True}, "heartbeat_s"),
        ({"listen": "host:99999"}, "listen"),
        ({"admins": "ops"}, "admins"),
    ],
)
def test_bad_values_name_their_key(section: dict[str, Any], problem_key: str) -> None:
    err = error_of(minimal(**section))
    assert err.key == problem_key
    assert str(CFG) in str(err)


def test_token_errors_name_the_list_index() -> None:
    assert error_of(minimal(tokens=[{"name": "t", "match": {"vid": 70000}}])).key == "tokens[0].match.vid"
    assert error_of(minimal(tokens=[{"name": "t", "match": {}}])).key == "tokens[0].match"
    dup = [{"name": "t", "match": {"simulate": "a"}}, {"name": "t", "match": {"simulate": "b"}}]
    err = error_of(minimal(tokens=dup))
    assert (err.key, "duplicate" in err.problem) == ("tokens[1].name", True)
    err = error_of(minimal(tokens=[{"name": "t", "match": {"simulate": "a", "vid": 1}}]))
    assert err.key == "tokens[0].match.simulate"


def test_a_numeric_serial_is_refused_with_the_quoting_fix() -> None:
    # YAML reads `serial: 0012345` as a number (octal, even): the leading zeros are gone, so the
    # one config layer refuses it for both daemons instead of guessing the text.
    doc = minimal(tokens=[{"name": "t", "match": {"vid": 1, "serial": 12345678}, "allow": []}])
    err = error_of(doc)
    assert err.key == "tokens[0].match.serial"
    assert "quote it: '12345678'" in err.problem


def test_usb_ids_may_be_written_in_hex_text() -> None:
    doc = minimal(tokens=[{"name": "t", "match": {"vid": "0x0529", "pid": 1568}, "allow": []}])
    assert parse_server_config(doc, CFG).tokens[0].match == TokenMatch(vid=0x0529, pid=0x0620)


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_durations_must_be_finite(value: str) -> None:
    import yaml

    err = error_of(minimal(lease={"linger_s": yaml.safe_load(value)}))
    assert (err.key, "finite" in err.problem) == ("lease.linger_s", True)


def test_tokens_must_be_a_non_empty_list() -> None:
    assert error_of(minimal(tokens=[])).key == "tokens"
    assert error_of({"tls": minimal()["tls"]}).key == "tokens"


def test_top_level_must_be_a_mapping() -> None:
    err = error_of(["not", "a", "mapping"])
    assert "expected a mapping" in err.problem


def test_simulate_override_keeps_names_and_allow_lists() -> None:
    doc = minimal(tokens=[{"name": "codesign", "match": {"vid": 1, "pid": 2}, "allow": ["vm"]}])
    cfg = parse_server_config(doc, CFG).with_simulated_tokens("yubikey5").with_listen("127.0.0.1:0")
    assert cfg.tokens[0].name == "codesign"
    assert cfg.tokens[0].allow == ("vm",)
    assert cfg.tokens[0].match == TokenMatch(simulate="yubikey5")
    assert (cfg.host, cfg.port) == ("127.0.0.1", 0)
