"""One tokenbridge-server per state folder: an exclusive `flock` taken before anything is opened.

A second server started on the same config (to "check" it, or by mistake) used to unlink the
live control socket and append to the live audit log before it failed on the port. Now the
server first locks `tokenbridge-server.lock` in every folder that holds its state (PIN guard
state, audit log, control socket); the lock is held by the open file, so the kernel releases
it when the process ends, however it ends, and a stale lock file is harmless. A held lock
makes the start fail with the PID of the holder (written into the file) and the lock's path.
`tokenbridge-server check-config` validates a config without starting anything.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Final

from bridge_server.config import ServerConfig
from bridge_server.guard.guardrails import guard_state_path
from protocol.errors import BridgeError

LOCK_NAME: Final = "tokenbridge-server.lock"


class InstanceLocked(BridgeError):
    """Another server holds the lock of one of this config's state folders."""


def state_folders(config: ServerConfig) -> list[Path]:
    """The folders holding this config's state files, without duplicates."""
    paths = [guard_state_path(config), config.audit.path, config.control.socket]
    return sorted({p.parent.resolve() for p in paths if p is not None})


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "another process"
    return f"PID {text}" if text.isdigit() else "another process"


def _lock_one(folder: Path, stack: ExitStack) -> None:
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)  # as the first state write would
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise InstanceLocked(
            f"cannot open the instance lock {path}: {exc.strerror or exc}; "
            "the service user must be able to write its state folder"
        ) from exc
    stack.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InstanceLocked(
            f"tokenbridge-server is already running with this state folder ({_holder(fd)} holds {path}); "
            "stop it first (systemctl stop tokenbridge-server), or check a config with "
            "`tokenbridge-server check-config --config FILE`"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextmanager
def instance_lock(config: ServerConfig) -> Iterator[list[Path]]:
    """Hold the lock of every state folder of `config` (raises InstanceLocked) until the block ends."""
    with ExitStack() as stack:
        folders = state_folders(config)
        for folder in folders:
            _lock_one(folder, stack)
        yield [f / LOCK_NAME for f in folders]
