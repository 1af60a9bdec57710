"""Where a token's server-held PIN is read from (issue 16): a systemd credential or a 0600 file.

- `credential: NAME`: `$CREDENTIALS_DIRECTORY/NAME`, which systemd fills from the unit's
  `LoadCredentialEncrypted=NAME:PATH` (a `systemd-creds encrypt` blob, host key or TPM2) or
  `LoadCredential=NAME:PATH`. systemd decrypts it into a private, non-swappable folder readable
  only by the service, so its ownership and mode are systemd's business, not checked here.
- `file: PATH`: a plain file, refused unless it is a regular file owned by the user the server
  runs as with no permission for group or others (0600 or 0400): anything looser means the PIN
  was readable by someone else already.

The content is the PIN, optionally followed by one newline (what `echo` and editors write).
It must be 4-16 printable ASCII characters without spaces, and not the placeholder itself.
The PIN is read into a `bytearray` (`ServerPin`), never into `str` or `bytes`.

`read_server_pin` returns `(pin, None)` or `(None, why)` for a PIN that is simply not there yet
(no credential, no file: the server runs and says "missing"), and raises `ServerPinError` for
one that is there but must not be used (loose mode, wrong owner, bad content): a config error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from bridge_server.guard.server_pin import PLACEHOLDER, ServerPin, wipe

MIN_PIN_LENGTH: Final = 4
MAX_PIN_LENGTH: Final = 16
MAX_FILE_BYTES: Final = 64  # a PIN file is tiny; anything bigger is the wrong file
CREDENTIALS_ENV: Final = "CREDENTIALS_DIRECTORY"


class ServerPinError(ValueError):
    """A server PIN that is present but must not be used; the message never contains it."""


def credential_path(name: str, env: Mapping[str, str]) -> Path | None:
    """`$CREDENTIALS_DIRECTORY/name`, or None when the variable is not set."""
    folder = env.get(CREDENTIALS_ENV)
    return Path(folder) / name if folder else None


def valid_credential_name(name: str) -> bool:
    """systemd credential names are file names: no '/', not '.' or '..', printable."""
    return bool(name) and "/" not in name and name not in (".", "..") and name.isprintable()


def read_server_pin(
    *, credential: str | None, file: Path | None, env: Mapping[str, str] | None = None
) -> tuple[ServerPin | None, str | None]:
    """Read the PIN from the one source given. See the module docstring for the outcomes."""
    if credential is not None:
        path = credential_path(credential, os.environ if env is None else env)
        if path is None:
            return None, (
                f"${CREDENTIALS_ENV} is not set: the server was not started by systemd with "
                f"LoadCredentialEncrypted={credential}:... (tokenbridge install-service adds it)"
            )
        return _read(path, check_owner=False)
    assert file is not None  # the config parser requires exactly one source
    return _read(file, check_owner=True)


def _read(path: Path, *, check_owner: bool) -> tuple[ServerPin | None, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"{path} does not exist; write it with `tokenbridge pin set`"
    except OSError as exc:
        raise ServerPinError(f"cannot open {path}: {exc.strerror or exc}") from None
    raw = bytearray(MAX_FILE_BYTES + 1)
    try:
        _check_file(path, os.fstat(fd), check_owner=check_owner)
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            count = f.readinto(raw) or 0
    finally:
        os.close(fd)
    try:
        return ServerPin(_pin_from(raw, count, path)), None
    finally:
        wipe(raw)


def _check_file(path: Path, st: os.stat_result, *, check_owner: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ServerPinError(f"{path} is not a regular file")
    if not check_owner:
        return
    if st.st_uid != os.geteuid():
        raise ServerPinError(
            f"{path} is owned by uid {st.st_uid}, not by the user the server runs as (uid {os.geteuid()}); "
            f"chown it to the service user (tokenbridge)"
        )
    if st.st_mode & 0o077:
        raise ServerPinError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may read or change it; "
            f"chmod 600 {path} (and write a new PIN to the card if someone else may have read it)"
        )


def _pin_from(raw: bytearray, count: int, path: Path) -> bytearray:
    if count > MAX_FILE_BYTES:
        raise ServerPinError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a PIN file")
    end = count
    if end and raw[end - 1] == 0x0A:
        end -= 1
        if end and raw[end - 1] == 0x0D:
            end -= 1
    pin = bytearray(raw[:end])
    problem = pin_problem(pin)
    if problem is not None:
        wipe(pin)
        raise ServerPinError(f"{path}: the PIN {problem}")
    return pin


def pin_problem(pin: bytes | bytearray) -> str | None:
    """Why `pin` cannot be a server-held PIN (the server and `tokenbridge pin set` agree), or None."""
    if not MIN_PIN_LENGTH <= len(pin) <= MAX_PIN_LENGTH:
        return f"has {len(pin)} characters; a PIN has {MIN_PIN_LENGTH} to {MAX_PIN_LENGTH}"
    if any(not 0x21 <= b <= 0x7E for b in pin):
        return "has characters other than printable ASCII without spaces"
    if pin == PLACEHOLDER:
        return "is the placeholder 000000 that build VMs send; change the card's PIN first"
    return None
