"""Issue 19 #4: every command line our docs and `--help` texts show is accepted by the real parsers.

The lines come from the fenced code blocks and `inline code` of README.md and docs/*.md, from
the three programs' `--help` epilogs and from the hints the code prints (`pki init --dir`).
Each is split like a shell would, cut at pipes, redirections and comments, and parsed with the
program's own `build_parser()`: a usage error (argparse's exit 2) fails the test.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge_admin import cli as admin_cli
from bridge_client import cli as client_cli
from bridge_server import cli as server_cli

REPO = Path(__file__).resolve().parents[2]
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "tokenbridge": admin_cli.build_parser,
    "tokenbridge-client": client_cli.build_parser,
    "tokenbridge-server": server_cli.build_parser,
}
# The program at the start of a command (after a prompt, sudo, a path): not `chgrp tokenbridge`.
_PROGRAM = re.compile(
    r"^\s*(?:\$\s+)?(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:\S*/bin/)?(tokenbridge(?:-client|-server)?)\s+(.*)"
)
_INLINE = re.compile(r"`([^`\n]+)`")
_CUT = ("|", ">", ">>", "&&", ";", "&", "2>&1", "||", "<")
# Hints printed by the code itself (bridge_admin/pki.py, bridge_server/cli.py).
_PRINTED = [
    "tokenbridge pki init --dir /etc/tokenbridge/pki",
    "tokenbridge-server check-config --config FILE",
]


def _doc_lines() -> Iterator[tuple[str, str]]:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fenced = False
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            where = f"{path.relative_to(REPO)}:{number}"
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                yield where, line
            else:
                for span in _INLINE.findall(line):
                    yield where, span


def _help_lines() -> Iterator[tuple[str, str]]:
    for prog, build in PARSERS.items():
        for line in (build().epilog or "").splitlines():
            yield f"{prog} --help", line
    for line in _PRINTED:
        yield "printed hint", line


def command_lines() -> list[tuple[str, str, list[str]]]:
    """(where, program, argv) for every tokenbridge command line shown to users."""
    found = []
    for where, line in [*_doc_lines(), *_help_lines()]:
        match = _PROGRAM.search(line)
        if match is None:
            continue
        argv = _argv(match.group(2))
        if argv is not None:
            found.append((where, match.group(1), argv))
    return found


def _argv(rest: str) -> list[str] | None:
    """The arguments, placeholders made concrete; None for prose that only names the program."""
    rest = rest.split("  ", 1)[0]  # an epilog's explanation column
    rest = rest.replace("…", "X").replace("...", "").replace("[", "").replace("]", "")
    rest = rest.split(" #", 1)[0]
    try:
        words = shlex.split(rest)
    except ValueError:
        return None
    argv: list[str] = []
    for word in words:
        if word in _CUT or word.startswith(("`", ">", "|")):
            break
        argv.append(word.rstrip("`.,;:)"))
    if not argv or not (argv[0].startswith("-") or argv[0].islower()):
        return None
    return [a for a in argv if "|" not in a]


def _ids() -> list[str]:
    return [f"{w}: {p} {' '.join(a)}" for w, p, a in command_lines()]


@pytest.mark.parametrize(("where", "program", "argv"), command_lines(), ids=_ids())
def test_documented_command_line_parses(
    where: str, program: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = PARSERS[program]()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        message = capsys.readouterr().err
        # Prose naming a command without its arguments (`tokenbridge pki`) is not a command line.
        if exc.code != 0 and "arguments are required" not in message:
            pytest.fail(f"{where}: `{program} {' '.join(argv)}` is refused by its own parser: {message}")


def test_the_walk_finds_the_commands_the_issue_names() -> None:
    lines = {(p, " ".join(a)) for _w, p, a in command_lines()}
    assert ("tokenbridge", "pki init --dir /etc/tokenbridge/pki") in lines
    assert ("tokenbridge-client", "check-config --config client.yaml") in lines
    assert len(lines) > 40


@pytest.mark.parametrize(
    ("program", "argv", "attr", "expected"),
    [
        ("tokenbridge", ["pki", "init"], "dir", "/etc/tokenbridge/pki"),
        ("tokenbridge", ["pki", "--dir", "A", "init"], "dir", "A"),
        ("tokenbridge", ["pki", "init", "--dir", "B"], "dir", "B"),
        ("tokenbridge", ["pki", "--dir", "A", "list", "--dir", "B", "--json"], "dir", "B"),
        ("tokenbridge-client", ["check-config"], "config", "/etc/tokenbridge/client.yaml"),
        ("tokenbridge-client", ["--config", "A", "check-config"], "config", "A"),
        ("tokenbridge-client", ["check-config", "--config", "B"], "config", "B"),
        ("tokenbridge-client", ["--log-level", "debug", "status", "--json"], "log_level", "debug"),
        ("tokenbridge-client", ["status", "--log-level", "error"], "log_level", "error"),
        ("tokenbridge-server", [], "config", "/etc/tokenbridge/server.yaml"),
        ("tokenbridge-server", ["--config", "A", "check-config"], "config", "A"),
        ("tokenbridge-server", ["check-config", "--config", "B"], "config", "B"),
        ("tokenbridge-server", ["--listen", "1.2.3.4:5", "run"], "listen", "1.2.3.4:5"),
    ],
)
def test_common_options_before_and_after_the_subcommand(
    program: str, argv: list[str], attr: str, expected: str
) -> None:
    """The subcommand's copy of an option only overrides when given (default=SUPPRESS)."""
    assert str(getattr(PARSERS[program]().parse_args(argv), attr)) == expected
