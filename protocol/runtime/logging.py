"""structlog set up the way its author recommends for daemons (style-anchors §1.11, §3.6).

- JSON lines when stderr is not a terminal or when running under systemd (`JOURNAL_STREAM`),
  a console renderer on a terminal.
- stdlib `logging` (trio, pyusb) goes through the same processor chain via
  `ProcessorFormatter`, so every line has the same shape.
- Tracebacks never carry local variables: structlog's `dict_tracebacks` and Rich's console
  formatter both default to `show_locals=True`, which would put a VERIFY PIN in the log.
- A final redactor drops any key that names a secret (`pin`, `puk`, `password`, ...). The
  daemons never hold PINs on purpose; this is the seatbelt, not the brakes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LEVELS",
    "SECRET_KEY_WORDS",
    "configure_logging",
    "debug_enabled",
    "is_secret_key",
    "redact_secrets",
]

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
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


def configure_logging(*, level: str = "info", json: bool | None = None, stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging once, from the daemon's `main()`.

    `json=None` picks JSON when `stream` (default stderr) is not a TTY or `JOURNAL_STREAM` is
    set. Calling it again replaces the previous configuration.
    """
    try:
        numeric_level = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}") from None
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = bool(os.environ.get("JOURNAL_STREAM")) or not _isatty(out)

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
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
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


def _render_chain(*, json: bool) -> list[Processor]:
    if json:
        return [
            # show_locals=False: the default dumps every frame's locals (style-anchors §1.11).
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            redact_secrets,
            structlog.processors.JSONRenderer(),
        ]
    return [
        redact_secrets,
        # plain_traceback: Rich's formatter would default to show_locals=True.
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # detached or closed streams
        return False
