"""journald: `<N>` priority prefixes when stderr is the journal stream, and the repeat limiter."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from protocol.runtime.logging import RepeatLimiter, configure_logging, under_journald


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def _journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_each_line_carries_the_syslog_priority_journald_filters_on(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as out:
        configure_logging(level="debug", json=True, stream=out, journal=True)
        log = structlog.get_logger("t")
        log.debug("a.debugged")
        log.info("a.informed")
        log.warning("a.warned")
        log.error("a.failed")
        logging.getLogger("trio").critical("stdlib.critical")
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert json.loads(lines[2][3:])["event"] == "a.warned"  # the rest of the line is unchanged JSON


def test_the_prefix_is_used_only_on_the_stream_journal_stream_names(tmp_path: Path) -> None:
    journal, other = tmp_path / "journal", tmp_path / "other"
    journal.write_text("")
    other.write_text("")
    env = {"JOURNAL_STREAM": _journal_stream(journal)}
    with journal.open("a") as j, other.open("a") as o:
        assert under_journald(j, env) is True
        assert under_journald(o, env) is False  # a child's redirected stderr inherits the variable
        assert under_journald(j, {}) is False
        assert under_journald(j, {"JOURNAL_STREAM": "garbage"}) is False


def test_a_daemon_started_by_systemd_prefixes_its_stderr_lines(tmp_path: Path) -> None:
    """As systemd starts it: stderr is the journal stream and JOURNAL_STREAM names it."""
    err = tmp_path / "stderr"
    err.write_text("")
    code = (
        "import structlog\n"
        "from protocol.runtime.logging import configure_logging\n"
        "configure_logging()\n"
        "structlog.get_logger('t').warning('vpcd.unreachable', token='codesign')\n"
    )
    with err.open("a") as stream:
        env = {**os.environ, "JOURNAL_STREAM": _journal_stream(err)}
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True, timeout=60)
    (line,) = err.read_text().splitlines()
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["event"] == "vpcd.unreachable"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeat_limiter_logs_the_first_then_one_summary_per_interval() -> None:
    clock = FakeClock()
    limiter = RepeatLimiter(60.0, clock=clock)
    decisions = []
    for t in range(0, 720, 5):  # a vpcd down for 12 minutes, retried every 5 s: 144 failures
        clock.now = float(t)
        decisions.append((t, limiter.check("vpcd.unreachable")))
    logged = [(t, n) for t, n in decisions if n is not None]
    assert logged == [(0, 0)] + [(60 * k, 11) for k in range(1, 12)]
    assert limiter.clear("vpcd.unreachable") == 11  # 665..715 s, not logged yet
    assert limiter.clear("vpcd.unreachable") is None  # the run is over
    assert limiter.check("vpcd.unreachable") == 0  # a new run logs at once


def test_repeat_limiter_keeps_runs_apart_by_key() -> None:
    clock = FakeClock()
    limiter = RepeatLimiter(10.0, clock=clock)
    assert limiter.check(("vpcd.unreachable", "a")) == 0
    assert limiter.check(("vpcd.unreachable", "b")) == 0
    assert limiter.check(("vpcd.unreachable", "a")) is None


def test_paths_addresses_and_errors_are_logged_as_plain_text_not_reprs(tmp_path: Path) -> None:
    from protocol.runtime.address import Address

    out = tmp_path / "log"
    with out.open("w") as stream:
        configure_logging(json=True, stream=stream, journal=False)
        structlog.get_logger("t").warning(
            "x.failed",
            path=Path("/etc/tokenbridge/server.yaml"),
            peer=Address("127.0.0.1", 35853),
            error=PermissionError(13, "Permission denied"),
            count=3,
            names=["a"],
        )
    line = json.loads(out.read_text())
    assert line["path"] == "/etc/tokenbridge/server.yaml"
    assert line["peer"] == "127.0.0.1:35853"
    assert line["error"] == "[Errno 13] Permission denied"
    assert (line["count"], line["names"]) == (3, ["a"])


def test_a_start_failure_line_is_at_error_priority_under_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from protocol.runtime.cli import print_error

    journal, terminal = tmp_path / "journal", tmp_path / "terminal"
    journal.write_text("")
    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream(journal))
    with journal.open("a") as j, terminal.open("w") as t:
        print_error("tokenbridge-server", "address already in use", stream=j)
        print_error("tokenbridge-server", "address already in use", stream=t)
    assert journal.read_text() == "<3>tokenbridge-server: address already in use\n"
    assert terminal.read_text() == "tokenbridge-server: address already in use\n"
