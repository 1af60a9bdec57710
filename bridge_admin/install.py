"""`tokenbridge install-service server|client`: put the systemd units and friends in place.

The files live once, in the repository's `systemd/` (examples in `systemd/examples/`). A wheel
ships that folder as data files (pyproject `[tool.setuptools.data-files]`), installed as
`<prefix>/share/tokenbridge/systemd/`; a source checkout (editable install) reads it in place.
`files_dir()` finds whichever is there. Installing writes:

- the unit, with ExecStart pointing at this installation's `tokenbridge-server|client`;
- sysusers and tmpfiles snippets (the `tokenbridge` user, /etc, /var/lib and /run folders);
- server: the udev rule, one line per token VID:PID of the server config (if it has any);
- client: the polkit rule for pcscd and the pcscd.service drop-ins (loopback only, keep running);
- an example config in /etc/tokenbridge, never overwriting one that exists.

It runs no command itself: it prints the ones to run next (systemd-sysusers, daemon-reload,
enable --now), so `--prefix` trees and `--dry-run` behave exactly like the real thing.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Action:
    dest: Path  # absolute path on the target system (without the prefix)
    content: bytes
    mode: int = 0o644
    keep_existing: bool = False  # configs: never overwrite what an operator wrote


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


def render_unit(name: str, bindir: str) -> bytes:
    text = service_file(name).decode()
    return text.replace(f"ExecStart={CANONICAL_BINDIR}/", f"ExecStart={bindir.rstrip('/')}/").encode()


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


def plan(role: str, *, bindir: str, config: ServerConfig | None = None) -> list[Action]:
    """What `install-service ROLE` writes (pure apart from reading the shipped files)."""
    common = [
        Action(
            Path(f"/etc/systemd/system/tokenbridge-{role}.service"),
            render_unit(f"tokenbridge-{role}.service", bindir),
        ),
        Action(Path("/etc/sysusers.d/tokenbridge.conf"), service_file("tokenbridge.sysusers.conf")),
        Action(Path("/etc/tmpfiles.d/tokenbridge.conf"), service_file("tokenbridge.tmpfiles.conf")),
        Action(
            Path(f"/etc/tokenbridge/{role}.yaml"), service_file(f"{role}.yaml"), 0o640, keep_existing=True
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


def next_commands(role: str) -> list[str]:
    cmds = [
        "systemd-sysusers /etc/sysusers.d/tokenbridge.conf",
        "systemd-tmpfiles --create /etc/tmpfiles.d/tokenbridge.conf",
    ]
    if role == "server":
        cmds.append("udevadm control --reload && udevadm trigger --subsystem-match=usb --action=change")
    cmds.append("systemctl daemon-reload")
    if role == "client":
        cmds.append("systemctl restart pcscd.service")
    cmds.append(f"systemctl enable --now tokenbridge-{role}.service")
    return cmds


def install(
    role: str, *, prefix: Path = Path("/"), dry_run: bool = False, config_path: Path | None = None,
    bindir: str | None = None,
) -> int:  # fmt: skip
    """Write the files under `prefix` (or only print them) and print the next commands."""
    config = None
    default = Path("/etc/tokenbridge/server.yaml")
    if role == "server" and (config_path is not None or default.exists()):
        try:
            config = load_server_config(config_path or default)
        except ConfigError as exc:
            print(f"tokenbridge: {exc}", file=sys.stderr)
            return 2
    verb = "would write" if dry_run else "wrote"
    for action in plan(role, bindir=bindir or find_bindir(), config=config):
        target = prefix / action.dest.relative_to("/")
        if action.keep_existing and target.exists():
            print(f"kept       {target} (exists; example not copied)")
            continue
        if not dry_run:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(action.content)
            target.chmod(action.mode)
        print(f"{verb:<10} {target}")
    if role == "server" and config is None:
        print(
            "note: no server config read; the udev rule holds a commented example (edit VID:PID, see lsusb)"
        )
    print(
        "\nnext, as root:"
        if str(prefix) == "/"
        else f"\nnext, on the target system (files are under {prefix}):"
    )
    for cmd in next_commands(role):
        print(f"  {cmd}")
    print(f"then: edit /etc/tokenbridge/{role}.yaml, and `systemctl reload tokenbridge-{role}` after changes")
    return 0
