"""How `tokenbridge selftest` finds its token and its PIN.

The token is found as the server finds it (bridge_server/usb/devices.py): a config's
`match` (vid/pid/serial, or `simulate: PROFILE` with its `state` folder), `--simulate
PROFILE`, or, with no config at all, the only CCID device attached.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bridge_server.usb.transport import DeviceMatch
from protocol.errors import ConfigError

DEFAULT_CONFIG: Final = Path("/etc/tokenbridge/server.yaml")


@dataclass
class Target:
    """Which token, found how: a config's `match`, `--simulate`, or the only CCID device."""

    match: DeviceMatch
    source: str
    backend: object | None = None
    simulated: Any = None  # the SimulatedToken, for tests and the demo


def resolve_target(config: Path | None, token: str | None, simulate: str | None) -> Target:
    """The token as the server would find it (bridge_server/usb/devices.py)."""
    if simulate is not None:
        return _simulated(simulate, None, f"--simulate {simulate}", "--simulate")
    path = config if config is not None else DEFAULT_CONFIG
    if config is None and not path.exists():
        return Target(DeviceMatch(), "the only usb ccid device attached (no server config found)")
    from bridge_server.config import load_server_config

    cfg = load_server_config(path)
    names = [t.name for t in cfg.tokens]
    if token is None and len(names) != 1:
        raise ConfigError(str(path), "tokens", f"holds {len(names)} tokens ({names}): pick one with --token")
    chosen = next((t for t in cfg.tokens if token in (None, t.name)), None)
    if chosen is None:
        raise ConfigError(str(path), "tokens", f"has no token {token!r} (it has {names})")
    where = f"config {path} token {chosen.name}"
    m = chosen.match
    if m.simulate is not None:
        return _simulated(m.simulate, m.state, where, f"tokens.{chosen.name}.match.simulate")
    return Target(DeviceMatch(vid=m.vid, pid=m.pid, serial=m.serial), where)


def _simulated(profile: str, state: Path | None, source: str, key: str) -> Target:
    from bridge_server.simulator.backend import open_simulator

    try:
        backend, sims = open_simulator([profile], state_dir=state)
    except ValueError as exc:
        raise ConfigError(source, key, str(exc)) from None
    sim = sims[0]
    return Target(DeviceMatch(vid=sim.profile.vid, pid=sim.profile.pid), source, backend, sim)


def read_pin(spec: str) -> tuple[bytearray, str, str]:
    """(PIN, where it came from, a warning or ""); never echoes the PIN."""
    if spec.startswith("env:"):
        name = spec[4:]
        value = os.environ.get(name)
        if not value:
            raise ConfigError("--pin-from", spec, f"environment variable {name} is unset or empty")
        return bytearray(value.encode()), spec, ""
    path = Path(spec)
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError("--pin-from", spec, f"cannot read the PIN file: {exc.strerror or exc}") from None
    pin = bytearray(raw.rstrip(b"\r\n"))
    raw = b""
    if not pin:
        raise ConfigError("--pin-from", spec, "the PIN file is empty")
    warning = ""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = f"{path} is readable by other users; chmod 600 it"
    return pin, str(path), warning
