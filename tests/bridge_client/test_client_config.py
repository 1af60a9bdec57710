"""client.yaml: defaults, relative paths, and errors that name the file and the dotted key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bridge_client.cli import main
from bridge_client.config import load_client_config, load_tls_files, parse_client_config
from protocol.errors import ConfigError

CONFIG = Path("/etc/tokenbridge/client.yaml")
MINIMAL: dict[str, Any] = {
    "server": "tokenhost.example",
    "tls": {"ca": "pki/ca.pem", "cert": "pki/vm.pem", "key": "pki/vm.key"},
    "readers": [{"token": "codesign"}],
}


def doc(**changes: Any) -> dict[str, Any]:
    d = copy.deepcopy(MINIMAL)
    d.update(changes)
    return d


def test_a_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_client_config(doc(), CONFIG)
    assert (cfg.server_host, cfg.server_port, cfg.server_name) == (
        "tokenhost.example",
        7447,
        "tokenhost.example",
    )
    assert cfg.queue_timeout_s == 900.0
    assert (cfg.reconnect_initial_s, cfg.reconnect_max_s, cfg.connect_timeout_s) == (0.5, 30.0, 10.0)
    assert cfg.status_socket is None
    assert [(r.token, r.vpcd_host, r.vpcd_port) for r in cfg.readers] == [("codesign", "127.0.0.1", 35963)]


def test_readers_without_vpcd_take_slot_n_port_35963_plus_n() -> None:
    cfg = parse_client_config(doc(readers=[{"token": "a"}, {"token": "b"}]), CONFIG)
    assert [r.vpcd_port for r in cfg.readers] == [35963, 35964]


def test_every_setting_is_read() -> None:
    cfg = parse_client_config(
        doc(
            server="10.0.0.7:9000",
            server_name="tokenhost.internal",
            lease={"queue_timeout_s": 120},
            reconnect={"initial_s": 0.2, "max_s": 5, "connect_timeout_s": 3},
            status={"socket": "/run/tokenbridge/client.sock"},
            readers=[{"token": "codesign", "vpcd": {"connect": "127.0.0.1:35964"}}],
        ),
        CONFIG,
    )
    assert (cfg.server_host, cfg.server_port, cfg.server_name) == ("10.0.0.7", 9000, "tokenhost.internal")
    assert cfg.queue_timeout_s == 120.0
    assert (cfg.reconnect_initial_s, cfg.reconnect_max_s, cfg.connect_timeout_s) == (0.2, 5.0, 3.0)
    assert cfg.status_socket == Path("/run/tokenbridge/client.sock")
    assert cfg.readers[0].vpcd_port == 35964


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd() -> None:
    cfg = parse_client_config(
        doc(
            tls={"ca": "pki/ca.pem", "cert": "/srv/pki/vm.pem", "key": "vm.key"},
            status={"socket": "run/client.sock"},
        ),
        Path("/opt/tb/conf/client.yaml"),
    )
    assert cfg.tls.ca == Path("/opt/tb/conf/pki/ca.pem")
    assert cfg.tls.cert == Path("/srv/pki/vm.pem")
    assert cfg.tls.key == Path("/opt/tb/conf/vm.key")
    assert cfg.status_socket == Path("/opt/tb/conf/run/client.sock")


@pytest.mark.parametrize(
    ("connect", "host", "port"),
    [
        ("127.0.0.1:35964", "127.0.0.1", 35964),
        ("127.0.0.2", "127.0.0.2", 35963),
        ("localhost:35963", "localhost", 35963),
        ("::1", "::1", 35963),
        ("[::1]:35964", "::1", 35964),
    ],
)
def test_vpcd_on_a_loopback_address_is_accepted(connect: str, host: str, port: int) -> None:
    cfg = parse_client_config(doc(readers=[{"token": "t", "vpcd": {"connect": connect}}]), CONFIG)
    assert (cfg.readers[0].vpcd_host, cfg.readers[0].vpcd_port) == (host, port)


@pytest.mark.parametrize("connect", ["0.0.0.0:35963", "10.0.0.5:35963", "vpcd.example:35963", "[::]:35963"])
def test_vpcd_off_loopback_is_refused_because_it_carries_pins(connect: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_client_config(
            doc(readers=[{"token": "t"}, {"token": "u", "vpcd": {"connect": connect}}]), CONFIG
        )
    err = info.value
    assert (err.path, err.key) == (str(CONFIG), "readers[1].vpcd.connect")
    assert "not a loopback address" in err.problem
    assert "PINs" in err.problem


ERRORS = [
    ({"server": None}, "server", "required but missing"),
    ({"server": "tokenhost:99999"}, "server", "bad port"),
    ({"server": 7447}, "server", "expected a string"),
    ({"sever": "x"}, "sever", "did you mean 'server'?"),
    ({"tls": None}, "tls", "required but missing"),
    ({"tls": {"ca": "ca.pem", "cert": "c.pem"}}, "tls.key", "required but missing"),
    ({"tls": {"ca": "ca.pem", "cert": "c.pem", "key": "k", "crt": "x"}}, "tls.crt", "unknown key"),
    ({"readers": []}, "readers", "non-empty list"),
    ({"readers": ["codesign"]}, "readers[0]", "must be a mapping"),
    ({"readers": [{"vpcd": {}}]}, "readers[0].token", "required but missing"),
    ({"readers": [{"token": "t", "vpcd": {"port": 1}}]}, "readers[0].vpcd.port", "unknown key"),
    (
        {"readers": [{"token": "t", "vpcd": {"connect": "127.0.0.1:x"}}]},
        "readers[0].vpcd.connect",
        "bad port",
    ),
    (
        {"readers": [{"token": "a"}, {"token": "b", "vpcd": {"connect": "127.0.0.1:35963"}}]},
        "readers",
        "same vpcd slot",
    ),
    ({"reconnect": {"initial_s": 5, "max_s": 1}}, "reconnect.max_s", "at least reconnect.initial_s"),
    ({"reconnect": {"initial_s": 0}}, "reconnect.initial_s", "must be >="),
    ({"reconnect": {"connect_timeout_s": "10s"}}, "reconnect.connect_timeout_s", "a number of seconds"),
    ({"lease": {"queue_timeout_s": 0}}, "lease.queue_timeout_s", "must be >="),
    ({"lease": {"queue_timeout": 5}}, "lease.queue_timeout", "did you mean 'queue_timeout_s'?"),
    ({"status": {"socket": ""}}, "status.socket", "must not be empty"),
]


@pytest.mark.parametrize(("change", "key", "problem"), ERRORS, ids=[e[1] + ":" + e[2] for e in ERRORS])
def test_each_error_names_the_file_the_dotted_key_and_the_problem(
    change: dict[str, Any], key: str, problem: str
) -> None:
    raw = doc(**change)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_client_config(raw, CONFIG)
    assert info.value.path == str(CONFIG)
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{CONFIG}: {key}: ")


def test_a_yaml_file_loads_and_a_missing_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(
        'server: "tokenhost.example:7447"\n'
        "tls: {ca: pki/ca.pem, cert: pki/vm.pem, key: pki/vm.key}\n"
        'readers:\n  - token: codesign\n    vpcd: {connect: "127.0.0.1:35964"}\n'
    )
    cfg = load_client_config(path)
    assert cfg.path == path
    assert cfg.tls.ca == tmp_path / "pki" / "ca.pem"
    with pytest.raises(ConfigError, match="file not found"):
        load_client_config(tmp_path / "nope.yaml")


def test_check_config_reports_the_file_and_key_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(
        'server: "tokenhost.example"\ntls: {ca: a, cert: b, key: c}\n'
        'readers: [{token: codesign, vpcd: {connect: "192.0.2.1:35963"}}]\n'
    )
    assert main(["--config", str(path), "check-config"]) == 1  # a problem found (docs/ops.md)
    err = capsys.readouterr().err
    assert f"{path}: readers[0].vpcd.connect: 192.0.2.1 is not a loopback address" in err

    # A well-formed file whose TLS files do not exist is a problem too: the daemon could not start.
    path.write_text(
        'server: "tokenhost.example"\ntls: {ca: a, cert: b, key: c}\nreaders: [{token: codesign}]\n'
    )
    assert main(["--config", str(path), "check-config"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: tls: " in err and str(tmp_path / "a") in err


def test_a_reload_reads_only_the_tls_section(tmp_path: Path) -> None:
    # SIGHUP applies new certificate files and nothing else: it needs no readers, no server.
    path = tmp_path / "client.yaml"
    path.write_text("tls: {ca: pki/ca.pem, cert: pki/vm.pem, key: pki/vm.key}\n")
    tls = load_tls_files(path)
    assert (tls.ca, tls.cert, tls.key) == (
        tmp_path / "pki/ca.pem",
        tmp_path / "pki/vm.pem",
        tmp_path / "pki/vm.key",
    )
    path.write_text("tls: {ca: a, cert: b, keys: c}\n")
    with pytest.raises(ConfigError, match=r"tls\.keys: unknown key; did you mean 'key'"):
        load_tls_files(path)
