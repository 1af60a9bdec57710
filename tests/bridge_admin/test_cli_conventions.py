"""The command-line conventions all three programs share (docs/ops.md "Exit codes"):
`--version`, `--json` for check-config, one JSON document per line under `--watch --json`,
exit 2 for bad input and 1 for a problem found, in every program alike."""

from __future__ import annotations

import json
import logging
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from admin_fixtures import Certs, running
from cli_lines import read_lines

from bridge_admin.cli import main as tokenbridge
from bridge_admin.pki import Pki
from bridge_client.cli import main as client
from bridge_server.cli import main as server

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS: list[tuple[str, Callable[[list[str]], int]]] = [
    ("tokenbridge", tokenbridge),
    ("tokenbridge-server", server),
    ("tokenbridge-client", client),
]
DAEMONS = PROGRAMS[1:]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` configures logging on the captured stderr; later tests must not write to it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def _exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --version, --help and bad usage
        return int(exc.code or 0)


@pytest.mark.parametrize(("prog", "main"), PROGRAMS)
def test_every_program_prints_the_project_version(
    prog: str, main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _exit_code(main, ["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"{prog} {version}"


@pytest.mark.parametrize(("prog", "main"), PROGRAMS)
def test_a_command_line_that_does_not_parse_exits_2(prog: str, main: Callable[[list[str]], int]) -> None:
    assert _exit_code(main, ["--no-such-option"]) == 2


@pytest.mark.parametrize(("prog", "main"), DAEMONS)
def test_check_config_of_a_missing_file_is_a_problem_found_in_both_daemons(
    prog: str, main: Callable[[list[str]], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert _exit_code(main, ["check-config", "--config", str(missing), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["config"] == str(missing)
    assert f"{missing}: file not found" in doc["problem"]
    assert _exit_code(main, ["check-config", "--config", str(missing)]) == 1
    assert capsys.readouterr().err.startswith(f"{prog}: {missing}: file not found")


def test_server_check_config_json_names_listen_and_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Certs(tmp_path)
    config = tmp_path / "server.yaml"
    config.write_text(
        'listen: "127.0.0.1:7447"\ntls: {ca: ca.pem, cert: localhost.pem, key: localhost.key}\n'
        "tokens: [{name: codesign, match: {simulate: safenet-5110}, allow: [build-vm-01]}]\n"
    )
    assert server(["check-config", "--json", "--config", str(config)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "ok": True,
        "config": str(config),
        "problem": "",
        "listen": "127.0.0.1:7447",
        "tokens": ["codesign"],
    }
    (tmp_path / "localhost.key").write_text("not a key\n")
    assert server(["check-config", "--json", "--config", str(config)]) == 1
    broken = json.loads(capsys.readouterr().out)
    assert broken["ok"] is False and "localhost.key" in broken["problem"]


def test_client_check_config_json_names_server_and_readers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init()
    issued = pki.issue_client("build-vm-01")  # no client.yaml: the test writes its own
    assert issued.key is not None
    config = tmp_path / "client.yaml"
    config.write_text(
        f'server: "tokenhost.example"\ntls: {{ca: "{pki.folder / "ca.pem"}", cert: "{issued.cert}", '
        f'key: "{issued.key}"}}\nreaders: [{{token: codesign}}]\n'
    )
    assert client(["check-config", "--json", "--config", str(config)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["server"], doc["readers"], doc["problem"]) == (
        True,
        "tokenhost.example:7447",
        ["codesign"],
        "",
    )


async def test_status_watch_json_prints_one_document_per_line(tmp_path: Path) -> None:
    Certs(tmp_path)
    async with running(tmp_path) as (_srv, _port):
        argv = [sys.executable, "-m", "bridge_admin", "status", "--watch", "0.2", "--json"]
        lines = await read_lines([*argv, "--socket", str(tmp_path / "control.sock")], 2)
    docs = [json.loads(line) for line in lines]
    assert [d["schema"] for d in docs] == [1, 1]
    assert [d["tokens"][0]["name"] for d in docs] == ["codesign", "codesign"]


def test_every_program_that_reads_a_config_has_a_default_path() -> None:
    from bridge_client.cli import build_parser as client_parser
    from bridge_server.cli import build_parser as server_parser

    for argv in ([], ["check-config"]):
        assert server_parser().parse_args(argv).config == Path("/etc/tokenbridge/server.yaml")
        assert client_parser().parse_args(argv).config == Path("/etc/tokenbridge/client.yaml")
