"""`tokenbridge pin set|test TOKEN`: the PIN the server holds for a token (issue 16, docs/ops.md).

`pin set` reads the PIN without echo (twice) or, with `--stdin`, one line from standard input
(for provisioning scripts; never put a PIN on a command line), checks it with the rules the
server applies, and writes it where the token's `server_pin` says:

- `file: PATH`: PATH, mode 0600, owned by the service user (`tokenbridge` if it exists; else
  the current user), written to a temporary file and renamed, so the server never reads half;
- `credential: NAME`: `CREDSTORE/NAME.cred` encrypted with `systemd-creds encrypt` (host key,
  and the TPM2 too when there is one: systemd-creds' default) when systemd-creds works here;
  else, or with `--plain`, `CREDSTORE/NAME` as a 0600 root file for `LoadCredential=`.
  `tokenbridge install-service server` wires whichever exists into the unit.

`pin test` asks the running server (control socket or remote admin) to check the stored PIN
against the card: bridge_server/tokens/pin_check.py reads the retry counter first and refuses
at the PIN guard's floor.

`credential_dropin(config)` is the unit drop-in `install-service` writes for it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from bridge_admin.client import AdminClientError, add_target_options, call_sync, resolve_target
from bridge_server.config import ServerConfig, TokenConfig, load_server_config
from bridge_server.guard.server_pin import wipe
from bridge_server.guard.server_pin_source import pin_problem
from protocol.errors import ConfigError

CREDSTORE: Final = Path("/etc/tokenbridge/credentials")
SERVICE_USER: Final = "tokenbridge"
DEFAULT_CONFIG: Final = Path("/etc/tokenbridge/server.yaml")
DROPIN: Final = Path("/etc/systemd/system/tokenbridge-server.service.d/tokenbridge-credentials.conf")


class PinSetError(Exception):
    """What went wrong and what to do (never the PIN)."""


def add_pin_parser(sub: Any) -> None:
    pin = sub.add_parser("pin", help="the PIN the server holds for a token (build VMs then need none)")
    verbs = pin.add_subparsers(dest="verb", required=True, metavar="ACTION")
    pset = verbs.add_parser("set", help="store token NAME's PIN where its server_pin says (no echo)")
    pset.add_argument("name", metavar="NAME", help="token name from the server config")
    pset.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="server config (default: %(default)s)"
    )
    pset.add_argument("--stdin", action="store_true", help="read the PIN as one line from standard input")
    pset.add_argument("--plain", action="store_true", help="credential: a plain 0600 file, not systemd-creds")
    pset.add_argument(
        "--credstore", type=Path, default=CREDSTORE, help="credential folder (default: %(default)s)"
    )
    pset.add_argument("--owner", default=SERVICE_USER, help="file: the service user (default: %(default)s)")
    pset.add_argument("--json", action="store_true")
    ptest = verbs.add_parser(
        "test", help="check the stored PIN against the card (reads the retry counter first)"
    )
    ptest.add_argument("name", metavar="NAME", help="token name from the server config")
    ptest.add_argument("--json", action="store_true")
    add_target_options(ptest)


def run_pin_command(args: argparse.Namespace) -> int:
    try:
        if args.verb == "set":
            result = pin_set(args)
        else:
            return _pin_test(args)
    except (PinSetError, ConfigError, AdminClientError) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        else:
            print(f"tokenbridge: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        print(f"wrote {result['written']} ({result['kind']})")
        for step in result["next"]:
            print(f"next: {step}")
    return 0


def _token(config: ServerConfig, name: str) -> TokenConfig:
    for token in config.tokens:
        if token.name == name:
            if token.server_pin is None:
                raise PinSetError(
                    f"token {name!r} in {config.path} has no server_pin section; add "
                    "`server_pin: {credential: NAME, for: [IDENTITY...]}` first (docs/ops.md)"
                )
            return token
    raise PinSetError(
        f"no token {name!r} in {config.path}; tokens: {', '.join(t.name for t in config.tokens)}"
    )


def read_pin(*, from_stdin: bool) -> bytearray:
    """The PIN typed twice without echo, or one line of stdin; checked like the server checks it."""
    if from_stdin:
        pin = bytearray(sys.stdin.buffer.readline(128).rstrip(b"\r\n"))
    else:
        first = bytearray(getpass.getpass("PIN: ").encode())
        again = bytearray(getpass.getpass("PIN again: ").encode())
        same = first == again
        wipe(again)
        if not same:
            wipe(first)
            raise PinSetError("the two PINs differ; nothing was written")
        pin = first
    problem = pin_problem(pin)
    if problem is not None:
        wipe(pin)
        raise PinSetError(f"not written: the PIN {problem}")
    return pin


def pin_set(args: argparse.Namespace) -> dict[str, Any]:
    token = _token(load_server_config(args.config), args.name)
    sp = token.server_pin
    assert sp is not None
    pin = read_pin(from_stdin=args.stdin)
    try:
        if sp.file is not None:
            _write_private(sp.file, pin, owner=_uid(args.owner))
            return {
                "token": token.name, "kind": "file", "written": str(sp.file), "encrypted": False,
                "next": [f"systemctl reload tokenbridge-server (re-reads {sp.file})",
                         f"tokenbridge pin test {token.name}"],
            }  # fmt: skip
        assert sp.credential is not None
        return _write_credential(token.name, sp.credential, pin, args.credstore, plain=args.plain)
    finally:
        wipe(pin)


def _uid(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return os.geteuid()  # no service user on this machine (a test, a dev box): the caller


def _write_private(path: Path, pin: bytearray, *, owner: int) -> None:
    """`path` holding `pin`, mode 0600, owned by `owner`: temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        os.write(fd, bytes(pin) + b"\n")
        os.fsync(fd)
        if owner != os.geteuid():
            os.fchown(fd, owner, -1)
        os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise PinSetError(f"cannot write {path}: {exc.strerror or exc}") from None


def systemd_creds_usable() -> bool:
    """Whether `systemd-creds encrypt` works here (it needs no running systemd, but root)."""
    tool = shutil.which("systemd-creds")
    if tool is None:
        return False
    probe = subprocess.run(
        [tool, "encrypt", "--name=tokenbridge-probe", "-", "-"],
        input=b"probe", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return probe.returncode == 0


def _write_credential(token: str, name: str, pin: bytearray, store: Path, *, plain: bool) -> dict[str, Any]:
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    encrypted = not plain and systemd_creds_usable()
    if not encrypted:
        path = store / name
        _write_private(path, pin, owner=os.geteuid())  # systemd reads it as root at unit start
        line = f"LoadCredential={name}:{path}"
    else:
        path = store / f"{name}.cred"
        tmp = path.with_name(f".{path.name}.tmp")
        done = subprocess.run(
            ["systemd-creds", "encrypt", f"--name={name}", "-", str(tmp)],
            input=bytes(pin), capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise PinSetError(f"systemd-creds encrypt failed: {done.stderr.decode(errors='replace').strip()}")
        tmp.chmod(0o600)
        os.replace(tmp, path)
        line = f"LoadCredentialEncrypted={name}:{path}"
    return {
        "token": token, "kind": "encrypted credential" if encrypted else "credential", "written": str(path),
        "encrypted": encrypted, "unit_line": line,
        "next": ["tokenbridge install-service server (adds the line below to the unit) or add it yourself: "
                 + line,
                 "systemctl daemon-reload && systemctl restart tokenbridge-server "
                 "(systemd hands credentials over at start; a reload does not re-read them)",
                 f"tokenbridge pin test {token}"],
    }  # fmt: skip


def _pin_test(args: argparse.Namespace) -> int:
    answer = call_sync(resolve_target(args), "server-pin.test", {"token": args.name})
    ok = bool(answer["ok"] and answer["result"].get("ok"))
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0 if ok else 1
    if not answer["ok"]:
        print(f"tokenbridge: {answer['error']}", file=sys.stderr)
        return 1
    print(answer["result"]["message"], file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def credential_dropin(config: ServerConfig | None, store: Path = CREDSTORE) -> bytes | None:
    """The unit drop-in loading each token's credential (None when no token has one).

    `NAME.cred` (written by `pin set` with systemd-creds) -> LoadCredentialEncrypted=; a plain
    `NAME` -> LoadCredential=; neither yet -> LoadCredentialEncrypted= (what `pin set` will write).
    """
    names = [t.server_pin.credential for t in (config.tokens if config else ()) if t.server_pin is not None]
    lines = []
    for name in filter(None, names):
        plain = store / name
        if plain.exists() and not (store / f"{name}.cred").exists():
            lines.append(f"LoadCredential={name}:{plain}")
        else:
            lines.append(f"LoadCredentialEncrypted={name}:{store / name}.cred")
    if not lines:
        return None
    head = (
        "# Written by `tokenbridge install-service server`: the server-held PINs (docs/ops.md).\n[Service]\n"
    )
    return (head + "\n".join(lines) + "\n").encode()
