"""What the three programs (`tokenbridge`, `tokenbridge-server`, `tokenbridge-client`) share on
the command line: exit codes, `--version`, and JSON output for scripts.

Exit codes (docs/ops.md "Exit codes"), the same in every program and subcommand:

- 0: done, nothing wrong was found;
- 1: the command ran and found a problem (check-config: the config or a file it names is not
  usable; status: no answer, or the tunnel is down; audit verify: the chain is broken;
  doctor/selftest: a check failed; an admin action was refused);
- 2: bad input: the command line does not parse, a daemon was started with a config it cannot
  run with, or a file named on the command line cannot be read;
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import metadata
from typing import Any, Final, TextIO

from protocol.runtime.logging import SYSLOG_PRIORITIES, under_journald

__all__ = [
    "DISTRIBUTION",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "add_version_option",
    "json_line",
    "package_version",
    "print_error",
]

EXIT_OK: Final = 0
EXIT_PROBLEM: Final = 1
EXIT_USAGE: Final = 2  # argparse's own code for a command line it cannot parse
EXIT_INTERRUPTED: Final = 130

DISTRIBUTION: Final = "tokenbridge"  # pyproject.toml [project].name


def package_version() -> str:
    """The installed distribution's version (its metadata), "unknown" when run from a bare tree."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """`--version`: prints `PROG VERSION` and exits 0."""
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the version and exit",
    )


def json_line(document: Any) -> str:
    """One JSON document on one line (what `--watch --json` prints per refresh, `jq`-friendly)."""
    return json.dumps(document, separators=(",", ":"), sort_keys=False)


def print_error(prog: str, message: str, *, stream: TextIO | None = None) -> None:
    """The one-line failure `PROG: MESSAGE` on stderr; at error priority (`<3>`) for journald
    when stderr is the journal, so `journalctl -p err` shows why a start failed."""
    out = sys.stderr if stream is None else stream
    prefix = f"<{SYSLOG_PRIORITIES[logging.ERROR]}>" if under_journald(out) else ""
    print(f"{prefix}{prog}: {message}", file=out)
