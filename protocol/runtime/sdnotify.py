"""systemd `sd_notify` and watchdog pings, without libsystemd (style-anchors §1.12, §3.9).

`NOTIFY_SOCKET` names an AF_UNIX datagram socket (a path, or `@name` for the abstract
namespace). Each notification is one datagram of `KEY=value` lines (sd_notify(3)). When the
variable is unset we are not under systemd and every call is a no-op, so the daemons call
`notify()` unconditionally.

Sends never block the trio loop: the socket is non-blocking and a full queue is treated like
any other failure, logged at debug and otherwise ignored (a missed status line must not take a
daemon down; a missed watchdog ping is what the watchdog is for).

The watchdog ping runs *in the trio loop*, so a wedged loop stops the pings and systemd
restarts the daemon; that is the point. It pings at half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
recommends.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from typing import Final, Protocol

import structlog
import trio

__all__ = ["Notifier", "SystemdNotifier", "run_watchdog"]

log = structlog.get_logger(__name__)

_MAX_DATAGRAM: Final = 4096  # generous: our messages are a few dozen bytes


class Notifier(Protocol):
    """What a daemon tells its service manager (`SystemdNotifier`, or a test's recorder)."""

    def notify(self, **fields: object) -> object: ...


class SystemdNotifier:
    """Reads the systemd environment once; `notify()` sends one datagram or does nothing."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address: str | None = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval: float | None = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines as one datagram, e.g. `notify(READY=1, STATUS="2 sessions")`.

        Returns whether a datagram was sent (False when not under systemd or on failure).
        """
        if self.address is None or not fields:
            return False
        # sd_notify(3): newline-separated assignments; a newline inside a value would start
        # a bogus assignment, so flatten it.
        payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode()
        if len(payload) > _MAX_DATAGRAM:
            log.debug("sdnotify.failed", reason="message too long", bytes_out=len(payload))
            return False
        try:
            with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as sock:
                sock.setblocking(False)
                sock.connect(self.address)
                sock.send(payload)
        except OSError as exc:
            log.debug("sdnotify.failed", reason=exc.strerror or str(exc), error=type(exc).__name__)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """After listeners are bound and devices enumerated (DESIGN: Type=notify)."""
        return self.notify(READY=1) if status is None else self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)


def _socket_address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]  # Linux abstract namespace
    return raw


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, or None when there is no watchdog for *this* process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None  # meant for another process (sd_watchdog_enabled(3))
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


async def run_watchdog(
    notifier: SystemdNotifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping `WATCHDOG=1` now and then every `watchdog_interval` seconds until cancelled.

    Returns at once (after `started()`) when there is no watchdog. Deadlines are absolute so
    a slow ping does not push every later one back; after a stall (the loop was blocked) the
    schedule restarts from now instead of sending a burst of the missed pings.
    """
    interval = notifier.watchdog_interval
    if interval is None or not notifier.enabled:
        task_status.started()
        return
    notifier.watchdog()
    task_status.started()
    deadline = trio.current_time()
    while True:
        deadline += interval
        if deadline <= trio.current_time():  # we were stalled: one ping now, then back on schedule
            deadline = trio.current_time() + interval
        await trio.sleep_until(deadline)
        notifier.watchdog()
