"""The server's state files (PIN guard, lease epochs, audit log, its anchor and key): safe I/O.

Theory of operation
-------------------
State files live in folders only the service may write (checked at start,
`check_state_folders`): a folder that group or others can write lets a local user plant a
symbolic link where the server will write as root. Even so, nothing here follows a link:
files are opened with O_NOFOLLOW, and temporary files get an unpredictable name and O_EXCL,
so a planted link or file makes the write fail instead of redirecting it.

`write_whole` replaces a file whole or not at all: write a temporary file in the same folder
(looping over short writes, which a nearly full disk or a signal can cause), fsync it, rename
it over the target, fsync the folder. Any failure removes the temporary file and raises
`OSError`; the old file stays as it was. Callers decide what a failed write means (the PIN
guard refuses PIN commands, the epoch store says so in status, the audit log refuses leases).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from protocol.errors import ConfigError

_OPEN_NOFOLLOW: Final = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FOREIGN_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH


def _explain(exc: OSError, path: Path) -> OSError:
    """ELOOP from O_NOFOLLOW reads 'Too many levels of symbolic links': say what it means."""
    if exc.errno == errno.ELOOP:
        return OSError(exc.errno, f"{path} is a symbolic link; state files are never followed through links")
    return exc


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is written (a short write is not an error, it is a loop)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a regular file never returns 0 for a non-empty write
            raise OSError(0, "the disk accepted no bytes")
        view = view[written:]


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path: Path, data: bytes, *, mode: int = 0o640, sync_folder: bool = True) -> None:
    """Replace `path` with `data`, whole or not at all (see the module docstring).

    `sync_folder=False` skips the folder's fsync: after a crash the rename may be lost and the
    previous version comes back, which callers that only ever grow a value can accept.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_NOFOLLOW, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces a link at `path` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_folder(path.parent)


def read_bytes(path: Path) -> bytes | None:
    """The file's bytes, None when it does not exist. Raises OSError for a link or a read error."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _explain(exc, path) from None
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def open_append(path: Path, mode: int = 0o640) -> int:
    """An O_APPEND descriptor for `path` (created if missing), never through a link."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _OPEN_NOFOLLOW, mode)
    except OSError as exc:
        raise _explain(exc, path) from None


def open_read(path: Path) -> int:
    """A read descriptor for `path`, never through a link. Raises FileNotFoundError when missing."""
    try:
        return os.open(path, os.O_RDONLY | _OPEN_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _explain(exc, path) from None


def check_state_folders(config_path: str, folders: Iterable[tuple[str, Path | None]]) -> None:
    """Refuse a state folder that group or others can write (issue 13 item 9).

    `folders` are (config key, file) pairs; the check is on each file's folder, when it exists
    (a missing folder is created by the first write with the service's umask).

    Raises:
        ConfigError: naming the key, the folder, its mode and the `chmod` that fixes it.
    """
    for key, file in folders:
        if file is None:
            continue
        folder = file.parent
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            continue
        if st.st_mode & _FOREIGN_WRITE:
            raise ConfigError(
                config_path,
                key,
                f"the state folder {folder} can be written by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): a local user could replace the files the "
                f"server writes there; run `chmod go-w {folder}` (and make the service user its owner)",
            )
