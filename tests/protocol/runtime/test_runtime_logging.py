"""configure_logging: renderer choice, stdlib routing, no locals in tracebacks, key redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from protocol.runtime.logging import configure_logging, debug_enabled, is_secret_key

PIN = "31415926"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


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


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_level_logger_timestamp_and_values() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    structlog.get_logger("bridge_server.net.session").info("session.closed", peer="10.0.0.7", duration_ms=12)
    (line,) = _lines(out)
    assert line["event"] == "session.closed"
    assert line["level"] == "info"
    assert line["logger"] == "bridge_server.net.session"
    assert line["peer"] == "10.0.0.7"
    assert line["duration_ms"] == 12
    assert str(line["timestamp"]).endswith("Z")


def test_pin_named_keys_are_dropped_from_the_line() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    log = structlog.get_logger("t")
    log.warning("pin.seen", pin=PIN, new_pin=PIN, pin_value=PIN, puk=PIN, password=PIN, sw="63C2")
    log.warning("nested.seen", detail={"PIN": PIN, "ok": 1})
    first, second = _lines(out)
    assert first == {k: first[k] for k in ("event", "level", "logger", "timestamp", "sw")}
    assert second["detail"] == {"ok": 1}
    assert PIN not in out.getvalue()


def test_pin_named_keys_are_dropped_on_the_console_too() -> None:
    out = FakeTty()
    configure_logging(stream=out)
    structlog.get_logger("t").info("pin.seen", pin=PIN, reason="verify")
    text = out.getvalue()
    assert "pin.seen" in text
    assert "verify" in text
    assert PIN not in text


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("pin", True),
        ("PIN", True),
        ("pin_value", True),
        ("admin-password", True),
        ("client_secret", True),
        ("pinned_fingerprint", False),
        ("spin_count", False),
        ("peer", False),
        ("sw", False),
    ],
)
def test_secret_key_detection_matches_whole_words(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_tracebacks_never_include_local_variables() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    def verify(pin_digits: str) -> None:
        raise RuntimeError("card refused")

    try:
        verify(PIN)
    except RuntimeError:
        structlog.get_logger("t").exception("session.crashed")
    (line,) = _lines(out)
    assert "exception" in line
    assert "card refused" in json.dumps(line)
    assert PIN not in out.getvalue()


def test_stdlib_logging_goes_through_the_same_chain() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    logging.getLogger("trio.serve").warning("listener %s failed", "tcp:7000")
    (line,) = _lines(out)
    assert line["event"] == "listener tcp:7000 failed"
    assert line["logger"] == "trio.serve"
    assert line["level"] == "warning"
    assert "timestamp" in line


def test_level_filters_structlog_and_stdlib() -> None:
    out = io.StringIO()
    configure_logging(level="warning", json=True, stream=out)
    structlog.get_logger("t").info("hidden.event")
    logging.getLogger("usb").debug("hidden too")
    structlog.get_logger("t").error("shown.event")
    assert [line["event"] for line in _lines(out)] == ["shown.event"]


def test_console_renderer_on_a_tty_and_json_under_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    tty = FakeTty()
    configure_logging(stream=tty)
    structlog.get_logger("t").info("device.attached", device="0529:0620:X")
    with pytest.raises(json.JSONDecodeError):
        json.loads(tty.getvalue())

    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    journal = FakeTty()
    configure_logging(stream=journal)
    structlog.get_logger("t").info("device.attached", device="0529:0620:X")
    assert _lines(journal)[0]["device"] == "0529:0620:X"


def test_reconfiguring_replaces_the_handler_instead_of_adding_one() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(json=True, stream=first)
    configure_logging(json=True, stream=second)
    structlog.get_logger("t").info("once.logged")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown log level 'loud'.*debug"):
        configure_logging(level="loud")


def test_debug_enabled_follows_the_configured_level_and_keeps_events_under_capture_logs() -> None:
    configure_logging(level="info", json=True, stream=io.StringIO())
    assert debug_enabled("bridge_server.usb.ccid_driver") is False
    with structlog.testing.capture_logs():  # tests capture every level: so must the guard
        assert debug_enabled("bridge_server.usb.ccid_driver") is True
    configure_logging(level="debug", json=True, stream=io.StringIO())
    assert debug_enabled("bridge_server.usb.ccid_driver") is True
