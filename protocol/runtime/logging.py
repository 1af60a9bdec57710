"""structlog set up the way its author recommends for daemons (style-anchors §1.11, §3.6).

- JSON lines when stderr is not a terminal or when running under systemd (`JOURNAL_STREAM`),
  a console renderer on a terminal.
- stdlib `logging` (trio, pyusb) goes through the same processor chain via
  `ProcessorFormatter`, so every line has the same shape.
- Tracebacks never carry local variables: structlog's `dict_tracebacks` and Rich's console
  formatter both default to `show_locals=True`, which would put a VERIFY PIN in the log.
- A final redactor drops any key that names a secret (`pin`, `puk`, `password`, ...). The
  daemons never hold PINs on purpose; this is the seatbelt, not the brakes.
- Under systemd (stderr is the stream `JOURNAL_STREAM` names) every line starts with its syslog
  priority, `<3>` error, `<4>` warning, `<6>` info, `<7>` debug (sd-daemon(3)): journald strips
  the prefix and stores the priority, so `journalctl -p warning` filters. No libsystemd needed.
- `RepeatLimiter`: a warning that repeats (a vpcd that is down, retried every few seconds) is
  logged the first time, then at most once per interval with `repeated=N`, the number of
  occurrences not logged since the last line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LEVELS",
    "SECRET_KEY_WORDS",
    "SYSLOG_PRIORITIES",
    "RepeatLimiter",
    "configure_logging",
    "debug_enabled",
    "is_secret_key",
    "plain_values",
    "redact_secrets",
    "under_journald",
]

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# sd-daemon(3) / syslog(3) priorities for the `<N>` line prefix journald reads.
SYSLOG_PRIORITIES: Final[Mapping[int, int]] = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# Words that make a key secret wherever they appear as a `_`/`-`/`.`-separated part of it:
# `pin`, `new_pin`, `pin_value`, `puk`, `admin-password`. Whole words only, so
# `pinned_fingerprint` or `spin_count` survive.
SECRET_KEY_WORDS: Final = frozenset(
    {"pin", "pins", "puk", "password", "passwd", "passphrase", "secret", "pinvalue", "private_key"}
)
_SPLIT = re.compile(r"[_\-.\s]+")

# Marks the handler we install so a second configure_logging() replaces it, not doubles it.
_HANDLER_FLAG: Final = "_tokenbridge_handler"


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    if lowered in SECRET_KEY_WORDS:
        return True
    return any(word in SECRET_KEY_WORDS for word in _SPLIT.split(lowered))


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Drop secret-named keys, also inside nested mappings. Runs last, before rendering."""
    return _redact(event_dict)


def _redact(mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in [k for k in mapping if isinstance(k, str) and is_secret_key(k)]:
        del mapping[key]
    for key, value in mapping.items():
        if isinstance(value, dict):
            mapping[key] = _redact(dict(value))
    return mapping


def configure_logging(
    *,
    level: str = "info",
    json: bool | None = None,
    stream: TextIO | None = None,
    journal: bool | None = None,
) -> None:
    """Configure structlog and stdlib logging once, from the daemon's `main()`.

    `json=None` picks JSON when `stream` (default stderr) is not a TTY or `JOURNAL_STREAM` is
    set. `journal=None` prefixes each line with its syslog priority when the stream is the one
    `JOURNAL_STREAM` names (`under_journald`). Calling it again replaces the configuration.
    """
    try:
        numeric_level = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = bool(os.environ.get("JOURNAL_STREAM")) or not _isatty(out)
    if journal is None:
        journal = under_journald(out)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: structlog.testing.capture_logs() and reconfiguration in tests need
        # uncached loggers (structlog docs, "Testing"); the cost is small at our rates.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    setattr(handler, _HANDLER_FLAG, True)
    formatter = _JournalFormatter if journal else structlog.stdlib.ProcessorFormatter
    handler.setFormatter(
        formatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *_render_chain(json=json),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is connected to the journal: `JOURNAL_STREAM` is `DEV:INODE` of that very
    file (systemd.exec(5)); a child whose stderr was redirected elsewhere inherits the variable
    but not the stream, and must not prefix its lines."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no fileno (a StringIO), or a malformed value
        return False


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """Each line prefixed with `<N>`, its syslog priority (sd-daemon(3))."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>" + super().format(record)


@dataclass
class _Run:
    logged_at: float
    suppressed: int = 0


class RepeatLimiter:
    """Log the first of a run of repeated events, then at most one line per `interval_s`.

    `check(key)` says whether to log this occurrence: None to drop it, else the number of
    occurrences dropped since the last logged one (log it as `repeated=N` when N > 0).
    `clear(key)` ends the run (the condition went away) and returns what was dropped since the
    last line, so the recovery line can say it (None when there was no run). `clock` is
    monotonic seconds: the daemons pass `trio.current_time`, so tests drive it with trio's
    `autojump_clock`.
    """

    def __init__(self, interval_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._runs: dict[Hashable, _Run] = {}

    def check(self, key: Hashable) -> int | None:
        now = self.clock()
        run = self._runs.get(key)
        if run is None:
            self._runs[key] = _Run(logged_at=now)
            return 0
        if now - run.logged_at < self.interval_s:
            run.suppressed += 1
            return None
        dropped, run.logged_at, run.suppressed = run.suppressed, now, 0
        return dropped

    def clear(self, key: Hashable) -> int | None:
        run = self._runs.pop(key, None)
        return None if run is None else run.suppressed


def debug_enabled(name: str) -> bool:
    """Whether a DEBUG event from logger `name` would be kept; guards per-APDU debug lines.

    Under `configure_logging` at INFO a `log.debug(...)` is dropped only after the lazy proxy,
    the bound logger and `filter_by_level` ran (~14 µs with its `redact()`, measured, about
    3 per APDU): this check costs ~0.5 µs. Any other structlog configuration (not configured,
    `structlog.testing.capture_logs()`) keeps every event, so this says True there."""
    processors = structlog.get_config()["processors"]
    if not processors or processors[0] is not structlog.stdlib.filter_by_level:
        return True
    return logging.getLogger(name).isEnabledFor(logging.DEBUG)


_NATIVE: Final = (str, int, float, bool, type(None), list, tuple, dict)
_UNTOUCHED_KEYS: Final = frozenset({"exc_info", "stack_info", "_record", "_from_structlog"})


def plain_values(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Values as people read them: a path, an address, an exception as their `str()`, never a
    repr (`PosixPath('/etc/x')`, `Address(host=...)`). JSON-native values stay as they are."""
    for key, value in event_dict.items():
        if key not in _UNTOUCHED_KEYS and not isinstance(value, _NATIVE):
            event_dict[key] = str(value)
    return event_dict


def _render_chain(*, json: bool) -> list[Processor]:
    if json:
        return [
            # show_locals=False: the default dumps every frame's locals (style-anchors §1.11).
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            plain_values,
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ]
    return [
        plain_values,
        redact_secrets,
        # plain_traceback: Rich's formatter would default to show_locals=True.
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # detached or closed streams
        return False
