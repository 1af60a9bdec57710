"""Start an emulated token (handler.py under Debian's python) and run processes against it.

`require_umockdev()` skips (outside CI) or fails (CI=true) when the rig cannot run.
`emulated_token()` starts the handler and yields an `EmulatedToken` whose `env` and `wrap()`
put a child process under `umockdev-wrapper` with UMOCKDEV_DIR pointing at the testbed.
`LibusbStack` is `BridgeStack` with the server configured as for real hardware
(`match: {vid, pid, serial}`) and started under the wrapper.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

import pytest

from bridge_admin.local_stack import BridgeStack, Daemon
from bridge_server.simulator.profiles import EXTRA_PROFILES, PROFILES
from protocol.runtime.config import dump_yaml, load_yaml

SUPPORT = Path(__file__).resolve().parents[1]
REPO = SUPPORT.parents[1]
HANDLER = Path(__file__).with_name("handler.py")
# Debian's own interpreter: python3-gi and the UMockdev typelib are installed for it only.
SYSTEM_PYTHON = Path("/usr/bin/python3")
ALL_PROFILES = {**PROFILES, **EXTRA_PROFILES}  # the rig also serves the rig-only profiles
APT_HINT = "apt-get install umockdev gir1.2-umockdev-1.0 libumockdev0 python3-gi libusb-1.0-0"


@cache
def rig_problem() -> str | None:
    """Why the rig cannot run here, or None."""
    if shutil.which("umockdev-wrapper") is None:
        return "umockdev-wrapper not found"
    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = "import gi; gi.require_version('UMockdev', '1.0'); from gi.repository import UMockdev"
    proc = subprocess.run([str(SYSTEM_PYTHON), "-c", probe], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot load UMockdev through gi: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def require_umockdev() -> None:
    problem = rig_problem()
    if problem is None:
        return
    message = f"the umockdev USB rig cannot run: {problem}; install it: {APT_HINT}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def handler_pythonpath() -> str:
    """The repo, tests/support and the venv's packages (cryptography is abi3, the rest pure)."""
    paths = [str(REPO), str(SUPPORT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


@dataclass
class EmulatedToken:
    profile: str
    serial: str
    umockdev_dir: str
    devnode: str
    proc: subprocess.Popen[str]
    events_path: Path
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "UMOCKDEV_DIR": self.umockdev_dir}

    @staticmethod
    def wrap(cmd: list[str]) -> list[str]:
        return ["umockdev-wrapper", *cmd]

    def events(self) -> list[dict[str, Any]]:
        """Bulk-OUT commands the device saw: {"type": 0x6f, "seq": n, "head": "00c1"}."""
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

    def unplug(self) -> None:
        """Pull the token out: its ioctls fail with ENODEV from now on, and sysfs loses it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("unplug\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"unplugged": True}

    def match(self) -> dict[str, Any]:
        p = ALL_PROFILES[self.profile]
        return {"vid": p.vid, "pid": p.pid, "serial": self.serial}


@contextlib.contextmanager
def emulated_token(
    workdir: Path,
    profile: str,
    *,
    serial: str | None = None,
    packet_interval_ms: float = 1.0,
    slow_sign_ms: float = 0.0,
    slot_busy: bool = True,
    time_extensions: bool = True,
    usb_serial: bool = True,
    devnum: int = 2,
    abort_stalls: bool = False,
) -> Iterator[EmulatedToken]:
    """Run handler.py for one token until the block ends (stopped by its pid)."""
    require_umockdev()
    workdir.mkdir(parents=True, exist_ok=True)
    events, log_path = workdir / f"usb-{profile}-events.jsonl", workdir / f"usb-{profile}.log"
    cmd = [str(SYSTEM_PYTHON), str(HANDLER), "--profile", profile, "--state", str(workdir / "card.json")]
    cmd += ["--events", str(events), "--packet-interval-ms", str(packet_interval_ms)]
    cmd += ["--slow-sign-ms", str(slow_sign_ms)]
    if serial is not None:
        cmd += ["--serial", serial]
    if not slot_busy:
        cmd.append("--no-slot-busy")
    if not time_extensions:
        cmd.append("--no-time-extension")
    if not usb_serial:
        cmd.append("--no-serial")  # the device has no iSerialNumber; its card still knows it
    cmd += ["--devnum", str(devnum)]
    if abort_stalls:
        cmd.append("--abort-stalls")  # as most tokens (reference §1.6): recovery must reset the device
    env = {k: v for k, v in os.environ.items() if k not in ("UMOCKDEV_DIR", "LD_PRELOAD", "PYTHONHOME")}
    env["PYTHONPATH"] = handler_pythonpath()
    log: IO[str]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=10)
            raise AssertionError(f"usb rig handler exited ({proc.returncode}):\n{log_path.read_text()}")
        info = json.loads(line)
        yield EmulatedToken(
            profile=profile,
            serial=serial or ALL_PROFILES[profile].serial,
            umockdev_dir=info["umockdev_dir"],
            devnode=info["devnode"],
            proc=proc,
            events_path=events,
            log_path=log_path,
        )
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the handler quits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class LibusbStack(BridgeStack):
    """BridgeStack whose server reaches `tokens` through libusb, configured by VID/PID/serial."""

    tokens: list[EmulatedToken] = field(default_factory=list)
    token_timeouts: dict[str, float] | None = None  # each token's `timeouts` section, if set
    match_keys: tuple[str, ...] = ("vid", "pid", "serial")  # which of token.match() the config uses

    def write_server_config(self, allow: list[str]) -> Path:
        path = super().write_server_config(allow)
        config = load_yaml(path)
        by_profile = {token.profile: token for token in self.tokens}
        for entry in config["tokens"]:
            token = by_profile[entry["match"]["simulate"]]
            m = token.match()
            entry["match"] = {key: m[key] if key != "serial" else str(m[key]) for key in self.match_keys}
            if self.token_timeouts is not None:
                entry["timeouts"] = dict(self.token_timeouts)
        path.write_text(dump_yaml(config))
        return path

    def _spawn(self, name: str, cmd: list[str]) -> Daemon:
        if name != "server":
            return super()._spawn(name, cmd)
        (token,) = self.tokens  # one testbed per server process
        log_path = self.workdir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                token.wrap(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=token.env
            )
        daemon = Daemon(name, proc, log_path, offset)
        self.daemons.append(daemon)
        return daemon


__all__ = ["APT_HINT", "EmulatedToken", "LibusbStack", "emulated_token", "require_umockdev"]
