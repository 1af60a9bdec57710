"""`tokenbridge install-service server|client`: put the systemd units and friends in place.

The files live once, in the repository's `systemd/` (examples in `systemd/examples/`). A wheel
ships that folder as data files (pyproject `[tool.setuptools.data-files]`), installed as
`<prefix>/share/tokenbridge/systemd/`; a source checkout (editable install) reads it in place.
`files_dir()` finds whichever is there. Installing writes:

- the unit, with ExecStart pointing at this installation's `tokenbridge-server|client`;
- sysusers and tmpfiles snippets (the `tokenbridge` user, /etc, /var/lib and /run folders);
- server: the udev rule, one line per token VID:PID of the server config (if it has any);
- client: the polkit rule for pcscd and the pcscd.service drop-ins (loopback only, keep running);
- an example config in /etc/tokenbridge, never overwriting one that exists. It holds no secret
  (the TLS key is a systemd credential, below), so it is root:root 0644: readable by the service
  user before `systemd-sysusers` has even created the tokenbridge group.

Keys reach the service as systemd credentials (issue 19 #2): the unit's `LoadCredential=` lines
are built from the config's `credential:NAME` values (`unit_credentials`), each read from
/etc/credstore/NAME (root, 0600); systemd copies it into the service's private
$CREDENTIALS_DIRECTORY, readable by the service user only. No chgrp, no group-readable key.

It runs no command itself: it prints the ones to run next, in the order that works (users and
folders, the key, edit the config, check-config, then enable --now), so `--prefix` trees and
`--dry-run` behave exactly like the real thing. `--json` prints the same as one document.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bridge_admin.server_pin_cli import DROPIN, credential_dropin
from bridge_server.config import ServerConfig, load_server_config
from protocol.errors import ConfigError
from protocol.runtime.config import CREDENTIAL_PREFIX, CREDSTORE_DIRS, load_yaml

CANONICAL_BINDIR: Final = "/opt/tokenbridge/bin"
SHARE_SUBDIR: Final = Path("share/tokenbridge/systemd")  # pyproject data-files put systemd/ here
MARKER: Final = "tokenbridge-server.service"
UDEV_LINE: Final = (
    'ACTION!="remove|unbind", SUBSYSTEM=="usb", ENV{{DEVTYPE}}=="usb_device", '
    'ATTR{{idVendor}}=="{vid:04x}", ATTR{{idProduct}}=="{pid:04x}", '
    'MODE="0660", GROUP="tokenbridge", ENV{{PCSCLITE_IGNORE}}="1"'
)
EXAMPLE_UDEV_LINE: Final = (
    "# " + UDEV_LINE.format(vid=0x0529, pid=0x0620) + "   (example: SafeNet eToken 5110)"
)


CONFIG_MODE: Final = 0o644  # no secret inside: keys are credentials


@dataclass(frozen=True)
class Action:
    dest: Path  # absolute path on the target system (without the prefix)
    content: bytes
    mode: int = 0o644
    keep_existing: bool = False  # configs: never overwrite what an operator wrote


@dataclass(frozen=True)
class Credential:
    """One `LoadCredential=` (or, encrypted, `LoadCredentialEncrypted=`) line of a unit."""

    name: str  # what the config names as `credential:NAME`
    encrypted: bool = False

    @property
    def source(self) -> Path:
        store = CREDSTORE_DIRS[0]
        return store.with_name(store.name + ".encrypted") / self.name if self.encrypted else store / self.name

    def line(self) -> str:
        key = "LoadCredentialEncrypted" if self.encrypted else "LoadCredential"
        return f"{key}={self.name}:{self.source}"


DEFAULT_CREDENTIALS: Final = {
    "server": (Credential("tokenbridge-server.key"),),
    "client": (Credential("tokenbridge-client.key"),),
}


def files_dir() -> Path:
    """The shipped `systemd/` folder: the source checkout's own (editable installs), else
    `<prefix>/share/tokenbridge/systemd` of this installation or of the user scheme."""
    data_dirs = [sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user")]
    candidates = [Path(__file__).resolve().parents[1] / "systemd"]  # a checkout: its live files
    candidates += [Path(d) / SHARE_SUBDIR for d in data_dirs if d]
    for folder in candidates:
        if (folder / MARKER).is_file():  # not some other package's `systemd` folder
            return folder
    raise FileNotFoundError(
        f"the tokenbridge systemd files are not installed (looked in {', '.join(map(str, candidates))}); "
        "reinstall tokenbridge with pip"
    )


def service_file(name: str) -> bytes:
    """One of the shipped files: systemd/NAME, or systemd/examples/NAME for the example configs."""
    folder = files_dir()
    path = folder / "examples" / name if name.endswith(".yaml") else folder / name
    return path.read_bytes()


def find_bindir() -> str:
    """The folder holding this installation's tokenbridge-server (a venv's bin, /usr/local/bin...)."""
    here = Path(sys.executable).parent
    if (here / "tokenbridge-server").exists():
        return str(here)
    found = shutil.which("tokenbridge-server")
    return str(Path(found).parent) if found else CANONICAL_BINDIR


def config_credentials(raw: object) -> list[Credential]:
    """Every `credential:NAME` value in a parsed config, in order (tls.key, a PIN...)."""
    found: list[Credential] = []
    if isinstance(raw, dict):
        for value in raw.values():
            found += config_credentials(value)
    elif isinstance(raw, list):
        for value in raw:
            found += config_credentials(value)
    elif isinstance(raw, str) and raw.startswith(CREDENTIAL_PREFIX):
        found.append(Credential(raw.removeprefix(CREDENTIAL_PREFIX)))
    return found


def unit_credentials(role: str, config_path: Path | None) -> list[Credential]:
    """The credentials the unit loads: those the config names (none for a config that still
    reads its key from a file: a LoadCredential= of a missing file would stop the unit from
    starting), else, with no config yet, those of the shipped example."""
    if config_path is not None and config_path.is_file():
        return list(dict.fromkeys(config_credentials(load_yaml(config_path))))
    return list(DEFAULT_CREDENTIALS[role])


def credential_lines(credentials: list[Credential]) -> list[str]:
    return [c.line() for c in dict.fromkeys(credentials)]


def render_unit(name: str, bindir: str, credentials: list[Credential] | None = None) -> bytes:
    """The shipped unit with this installation's ExecStart and, given a list, its own
    LoadCredential lines in place of the shipped ones."""
    text = service_file(name).decode()
    text = text.replace(f"ExecStart={CANONICAL_BINDIR}/", f"ExecStart={bindir.rstrip('/')}/")
    if credentials is None:
        return text.encode()
    lines = text.splitlines(keepends=True)
    marks = [
        i for i, ln in enumerate(lines) if ln.startswith(("LoadCredential=", "LoadCredentialEncrypted="))
    ]
    if not marks:
        raise ValueError(f"{name} has no LoadCredential= line to replace")
    new = [ln + "\n" for ln in credential_lines(credentials)] or ["# (the config names no credential)\n"]
    lines[marks[0] : marks[-1] + 1] = new
    return "".join(lines).encode()


def udev_rules(config: ServerConfig | None) -> bytes:
    """The udev rule with one line per token that is matched by VID and PID."""
    lines = []
    if config is not None:
        for token in config.tokens:
            m = token.match
            if m.vid is not None and m.pid is not None:
                lines.append(f"# token {token.name}\n" + UDEV_LINE.format(vid=m.vid, pid=m.pid))
    if not lines:
        lines = ["# No token with vid and pid in the server config: edit and uncomment.", EXAMPLE_UDEV_LINE]
    template = service_file("70-tokenbridge.rules.in").decode()
    return template.replace("@TOKEN_RULES@", "\n".join(lines)).encode()


def plan(
    role: str, *, bindir: str, config: ServerConfig | None = None, credentials: list[Credential] | None = None
) -> list[Action]:
    """What `install-service ROLE` writes (pure apart from reading the shipped files)."""
    if role == "crl":
        return crl_plan(bindir)
    creds = credentials if credentials is not None else list(DEFAULT_CREDENTIALS[role])
    common = [
        Action(
            Path(f"/etc/systemd/system/tokenbridge-{role}.service"),
            render_unit(f"tokenbridge-{role}.service", bindir, creds),
        ),
        Action(Path("/etc/sysusers.d/tokenbridge.conf"), service_file("tokenbridge.sysusers.conf")),
        Action(Path("/etc/tmpfiles.d/tokenbridge.conf"), service_file("tokenbridge.tmpfiles.conf")),
        Action(
            Path(f"/etc/tokenbridge/{role}.yaml"),
            service_file(f"{role}.yaml"),
            CONFIG_MODE,
            keep_existing=True,
        ),
    ]
    if role == "server":
        udev = Action(Path("/etc/udev/rules.d/70-tokenbridge.rules"), udev_rules(config))
        return [*common, udev, *credential_actions(config)]
    dropins = Path("/etc/systemd/system/pcscd.service.d")
    return [
        *common,
        Action(
            Path("/etc/polkit-1/rules.d/60-tokenbridge-pcsc.rules"),
            service_file("org.debian.pcsc-lite.rules"),
        ),
        Action(dropins / "tokenbridge-loopback.conf", service_file("pcscd-loopback.conf")),
        Action(dropins / "tokenbridge-keep-running.conf", service_file("pcscd-keep-running.conf")),
    ]


def credential_actions(config: ServerConfig | None) -> list[Action]:
    """Issue 16: the unit drop-in that loads the server-held PINs (bridge_admin/server_pin_cli.py)."""
    dropin = credential_dropin(config)
    return [] if dropin is None else [Action(DROPIN, dropin)]


def crl_plan(bindir: str) -> list[Action]:
    """The CRL timer for the machine that holds the CA key (docs/ops.md §4)."""
    return [
        Action(
            Path("/etc/systemd/system/tokenbridge-crl.service"),
            render_unit("tokenbridge-crl.service", bindir),
        ),
        Action(Path("/etc/systemd/system/tokenbridge-crl.timer"), service_file("tokenbridge-crl.timer")),
    ]


def crl_steps() -> list[dict[str, str]]:
    return [
        _step("load the units", "systemctl daemon-reload"),
        _step("sign a CRL now and see that it works", "systemctl start tokenbridge-crl.service"),
        _step("re-sign it every week from now on", "systemctl enable --now tokenbridge-crl.timer"),
        _step("see the next run", "systemctl list-timers tokenbridge-crl.timer"),
    ]


def _step(step: str, run: str) -> dict[str, str]:
    return {"step": step, "run": run}


def next_steps(
    role: str, credentials: list[Credential], bindir: str = CANONICAL_BINDIR
) -> list[dict[str, str]]:
    """What to do after the files are in place, in the order that works: the user and folders
    first, then the key, then the config (edit, check), and only then start the service."""
    if role == "crl":
        return crl_steps()
    config = f"/etc/tokenbridge/{role}.yaml"
    bin_ = bindir.rstrip("/")
    steps = [
        _step("create the tokenbridge user and groups", "systemd-sysusers /etc/sysusers.d/tokenbridge.conf"),
        _step("create its folders", "systemd-tmpfiles --create /etc/tmpfiles.d/tokenbridge.conf"),
    ]
    steps += [
        _step(
            f"install the credential {c.name} (root only; systemd hands it to the service)",
            f"install -D -m 0600 -o root -g root KEY_FILE {c.source}   # the key `tokenbridge pki` wrote",
        )
        for c in credentials
    ]
    steps.append(_step(f"edit {config} (see docs/ops.md)", f"editor {config}"))
    if role == "server":
        steps.append(
            _step(
                "render the udev rule from the edited config and apply it",
                f"{bin_}/tokenbridge install-service server --config {config} && udevadm control --reload "
                "&& udevadm trigger --subsystem-match=usb --action=change",
            )
        )
    check = f"{bin_}/tokenbridge-{role} check-config --config {config}"
    steps.append(_step("check the config, the certificates and the key", check))
    steps.append(_step("load the units", "systemctl daemon-reload"))
    if role == "client":
        steps.append(_step("restart pcscd with the drop-ins", "systemctl restart pcscd.service"))
    steps.append(_step("start it now and at boot", f"systemctl enable --now tokenbridge-{role}.service"))
    return steps


def _load_config(
    role: str, config_path: Path | None, prefix: Path
) -> tuple[ServerConfig | None, Path | None]:
    """The config to render from: --config, else the one already installed under the prefix."""
    default = prefix / f"etc/tokenbridge/{role}.yaml"
    path = config_path or (default if default.exists() else None)
    if role != "server" or path is None:
        return None, path
    return load_server_config(path), path


def install(
    role: str, *, prefix: Path = Path("/"), dry_run: bool = False, config_path: Path | None = None,
    bindir: str | None = None, as_json: bool = False,
) -> int:  # fmt: skip
    """Write the files under `prefix` (or only print them) and print the next steps."""
    try:
        config, path = _load_config(role, config_path, prefix)
        credentials = unit_credentials(role, path) if role != "crl" else []
    except ConfigError as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"tokenbridge: {exc}", file=sys.stderr)
        return 2
    verb = "would write" if dry_run else "wrote"
    files = []
    for action in plan(role, bindir=bindir or find_bindir(), config=config, credentials=credentials):
        target = prefix / action.dest.relative_to("/")
        if action.keep_existing and target.exists():
            files.append({"path": str(target), "action": "kept", "mode": None})
            continue
        if not dry_run:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(action.content)
            target.chmod(action.mode)
        files.append({"path": str(target), "action": verb, "mode": f"{action.mode:04o}"})
    steps = next_steps(role, credentials, bindir or find_bindir())
    notes = []
    if role == "server" and config is None:
        notes.append(
            "no server config read; the udev rule holds a commented example (edit VID:PID, see lsusb)"
        )
    if as_json:
        print(json.dumps({"ok": True, "role": role, "prefix": str(prefix), "dry_run": dry_run, "files": files,
                          "credentials": [c.line() for c in credentials], "notes": notes, "next": steps},
                         indent=2))  # fmt: skip
        return 0
    _print_text(files, notes, steps, prefix)
    return 0


def _print_text(
    files: list[dict[str, str | None]], notes: list[str], steps: list[dict[str, str]], prefix: Path
) -> None:
    for f in files:
        if f["action"] == "kept":
            print(f"kept        {f['path']} (exists; example not copied)")
        else:
            print(f"{f['action']:<11} {f['path']} ({f['mode']})")
    for note in notes:
        print(f"note: {note}")
    where = "as root" if str(prefix) == "/" else f"on the target system (files are under {prefix})"
    print(f"\nnext, {where}, in this order:")
    for number, step in enumerate(steps, start=1):
        print(f"  {number}. {step['step']}:\n       {step['run']}")
