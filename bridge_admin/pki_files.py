"""How `tokenbridge pki` writes files and checks names (issue 19 #3, conventions).

Re-issuing a certificate or key must not break the service that reads it. A key the operator
made readable by the service's group (root:tokenbridge 0640) keeps that owner, group and mode
when it is replaced, and the replacement is atomic: the new bytes go to a temporary file in the
same folder (so the rename stays on one file system), created 0600, given the old file's
owner/group/mode, fsynced, renamed over the old name, and the folder fsynced. A reader (the
server's file watcher, a reload) sees the old file or the new one, never a half-written key.
If the old group cannot be kept (not root and not a member of it), nothing is replaced.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Final

from protocol.errors import BridgeError

PRIVATE_MODE: Final = 0o600
PUBLIC_MODE: Final = 0o644
# A client identity is a DNS-style label sequence (it is also put in the certificate's SAN), at
# most 64 characters (RFC 5280 ub-common-name). No spaces, no slashes: it names a folder too.
_NAME: Final = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
_LABEL: Final = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PkiError(BridgeError):
    """The PKI folder is missing something or a request cannot be honoured."""


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Replace `path` atomically with `data`, keeping an existing file's owner, group and mode.

    New files get 0600 (private) or 0644. A private key never keeps bits for "others".
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise PkiError(f"{path} is not a regular file (a symbolic link?); refusing to replace it")
    mode = stat.S_IMODE(old.st_mode) if old is not None else (PRIVATE_MODE if private else PUBLIC_MODE)
    if private:
        mode &= 0o770
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if old is not None:
                _keep_owner(fh.fileno(), old, path)
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _keep_owner(fd: int, old: os.stat_result, path: Path) -> None:
    uid = old.st_uid if os.geteuid() == 0 else -1  # only root may give a file away
    if (uid == -1 or uid == os.geteuid()) and old.st_gid == os.getegid():
        return
    try:
        os.fchown(fd, uid, old.st_gid)
    except PermissionError as exc:
        raise PkiError(
            f"cannot keep the group (gid {old.st_gid}) of {path}: run this as root or as a member of "
            "that group; the old file was left in place"
        ) from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_identity(name: str) -> str:
    """A client identity usable as CN, SAN, allow-list entry and folder name, or PkiError."""
    if not _NAME.match(name) or ".." in name:
        raise PkiError(
            f"{name!r} is not a usable identity: use 1-64 letters, digits, '.', '-' or '_', starting "
            "and ending with a letter or digit (e.g. build-vm-01)"
        )
    return name


def check_host(name: str) -> str:
    """A server name for the certificate's SAN: an IP address or a DNS name (RFC 1123 labels)."""
    if is_ip(name):
        return name
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise PkiError(
            f"{name!r} is neither an IP address nor a DNS name (letters, digits and '-' per label, "
            "labels separated by '.')"
        )
    return name


def dns_ok(name: str) -> bool:
    """Whether a client identity can also be put in the certificate as a DNS SAN."""
    try:
        check_host(name)
    except PkiError:
        return False
    return not is_ip(name)
