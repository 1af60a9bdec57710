"""The server's configuration (DESIGN §6): frozen dataclasses parsed from YAML.

`parse_server_config(mapping, path)` is pure: it takes the already-loaded mapping and the
file's path (for error messages and for resolving relative paths against the file's folder)
and raises `ConfigError(path, dotted_key, problem)` naming the first problem it finds. Unknown
keys are errors, with the closest known key suggested, because a typo such as `idle_timeout`
silently falling back to a default is how a lease policy quietly stops applying.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from bridge_server.guard.command_policy import (
    DEFAULT_FAMILY,
    ENVELOPE_INS,
    FAMILIES,
    allowed_instructions,
    default_family,
)
from protocol.errors import ConfigError
from protocol.runtime.config import load_yaml, optional_float, parse_hostport, reject_unknown

DEFAULT_PORT: Final = 7447
DEFAULT_HEARTBEAT_S: Final = 10.0
# Token names travel in TokenStatus and log lines; keep them short and printable.
MAX_TOKEN_NAME_LENGTH: Final = 64


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None


@dataclass(frozen=True, slots=True)
class TokenMatch:
    """How a token is found: a USB device by VID/PID/serial, or a simulator profile."""

    vid: int | None = None
    pid: int | None = None
    serial: str | None = None
    simulate: str | None = None
    state: Path | None = None  # simulator only: folder where the simulated card persists its state


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Per-token command policy (docs/guardrails.md): the allow list, and who may send anything."""

    allow_management: tuple[str, ...] = ()  # identities besides `admins` that may send any command
    family: str = DEFAULT_FAMILY  # which signing allow list applies (command_policy.FAMILIES)
    allow_ins: tuple[int, ...] = ()  # instructions added to the family's list for every client
    allowed: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", allowed_instructions(self.family, self.allow_ins))


@dataclass(frozen=True, slots=True)
class TokenConfig:
    name: str
    match: TokenMatch
    allow: tuple[str, ...] = ()
    policy: PolicyConfig = PolicyConfig()


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    linger_s: float = 2.0
    idle_timeout_s: float = 60.0
    max_hold_s: float = 1800.0
    queue_timeout_s: float = 900.0


@dataclass(frozen=True, slots=True)
class PinGuardConfig:
    min_retries_left: int = 2
    max_failures: int = 1
    state: Path | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: Path | None = None
    max_bytes: int = 64 * 1024 * 1024  # rotate before the file grows past this (docs/ops.md)
    keep: int = 8  # rotated files kept: FILE.1 .. FILE.keep


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: Path | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: tuple[str, int] | None = None  # opt-in Prometheus endpoint (bridge_server/observe/metrics.py)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int = 256
    max_handshakes: int = 32
    handshake_timeout_s: float = 10.0
    grace_period_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    path: Path
    host: str
    port: int
    tls: TlsConfig
    tokens: tuple[TokenConfig, ...]
    admins: tuple[str, ...] = ()
    lease: LeaseConfig = LeaseConfig()
    pin_guard: PinGuardConfig = PinGuardConfig()
    audit: AuditConfig = AuditConfig()
    control: ControlConfig = ControlConfig()
    limits: LimitsConfig = LimitsConfig()
    metrics: MetricsConfig = MetricsConfig()
    heartbeat_s: float = DEFAULT_HEARTBEAT_S

    def with_listen(self, listen: str) -> ServerConfig:
        """A copy listening on `listen` ("host:port"), as `--listen` asks."""
        host, port = parse_listen(listen, str(self.path), "--listen")
        return replace(self, host=host, port=port)

    def with_simulated_tokens(self, profile: str) -> ServerConfig:
        """A copy whose every token is the simulator `profile` (names, allow lists, policy kept;
        a command-policy family that came from the old `match` follows the new one)."""
        return replace(self, tokens=tuple(_simulated(t, profile) for t in self.tokens))


def _simulated(token: TokenConfig, profile: str) -> TokenConfig:
    policy = token.policy
    if policy.family == default_family(simulate=token.match.simulate, vid=token.match.vid):
        policy = replace(policy, family=default_family(simulate=profile, vid=None))
    return replace(token, match=TokenMatch(simulate=profile), policy=policy)


class _Section:
    """One YAML mapping being read: remembers the dotted prefix and which keys were used."""

    def __init__(self, raw: object, path: str, prefix: str, known: tuple[str, ...]) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(path, prefix, f"expected a mapping, got {type(raw).__name__}")
        self.raw: Mapping[Any, Any] = raw
        self.path = path
        self.prefix = prefix
        self.known = known
        reject_unknown(raw, known, path, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def get(self, name: str, required: bool = False) -> Any:
        if name not in self.raw or self.raw[name] is None:
            if required:
                raise self.error(name, "is required")
            return None
        return self.raw[name]

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self.get(name, required)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.error(name, f"expected a non-empty string, got {value!r}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """Seconds, finite and above `minimum`: the shared helper refuses NaN and infinity
        (`nan <= 0` is False, so a bare comparison lets `.nan` through)."""
        value = optional_float(self.raw, name, self.path, default, prefix=self.prefix, minimum=minimum)
        assert value is not None  # the default is a float
        if value <= minimum:
            raise self.error(name, f"must be greater than {minimum:g}, got {value:g}")
        return value

    def integer(self, name: str, default: int | None, *, low: int, high: int) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}, got {value!r}")
        return value

    def file(self, name: str, base: Path, *, required: bool = False) -> Path | None:
        value = self.string(name, required=required)
        if value is None:
            return None
        # DESIGN §6: relative paths resolve against the config file's folder, not the cwd.
        return base / Path(value).expanduser()

    def required_file(self, name: str, base: Path) -> Path:
        value = self.file(name, base, required=True)
        assert value is not None  # required=True raised otherwise
        return value

    def names(self, name: str) -> tuple[str, ...]:
        value = self.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"expected a list of identity names, got {value!r}")
        return tuple(value)

    def section(self, name: str, known: tuple[str, ...]) -> _Section:
        value = self.get(name)
        return _Section({} if value is None else value, self.path, self.key(name), known)


def parse_listen(value: object, path: str, key: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:7447"); a bare host gets the default port."""
    if not isinstance(value, str) or not value:
        raise ConfigError(path, key, f'expected "host:port", got {value!r}')
    try:
        return parse_hostport(value, DEFAULT_PORT, listen=True)
    except ValueError as exc:
        raise ConfigError(path, key, str(exc)) from None


def _parse_match(sec: _Section, base: Path) -> TokenMatch:
    profile = sec.string("simulate")
    if profile is not None:
        if any(sec.get(k) is not None for k in ("vid", "pid", "serial")):
            raise sec.error("simulate", "cannot be combined with vid/pid/serial")
        return TokenMatch(simulate=profile, state=sec.file("state", base))
    if sec.get("state") is not None:
        raise sec.error("state", "only applies to a simulated token (match.simulate)")
    vid = sec.integer("vid", None, low=0, high=0xFFFF)
    pid = sec.integer("pid", None, low=0, high=0xFFFF)
    serial = sec.get("serial")
    if isinstance(serial, int) and not isinstance(serial, bool):
        serial = str(serial)  # YAML reads 12345678 as an int; a serial is text
    if serial is not None and (not isinstance(serial, str) or not serial):
        raise sec.error("serial", f"expected a string, got {serial!r}")
    if vid is None and pid is None and serial is None:
        raise ConfigError(sec.path, sec.prefix, "needs vid/pid/serial or simulate")
    return TokenMatch(vid=vid, pid=pid, serial=serial)


def _parse_policy(sec: _Section, match: TokenMatch) -> PolicyConfig:
    family = sec.string("family") or default_family(simulate=match.simulate, vid=match.vid)
    if family not in FAMILIES:
        raise sec.error("family", f"unknown card family {family!r}; one of: {', '.join(FAMILIES)}")
    raw = sec.get("allow_ins")
    if raw is not None and not isinstance(raw, list):
        raise sec.error("allow_ins", f"expected a list of instruction bytes such as [0xD6], got {raw!r}")
    allow_ins = tuple(_instruction(sec, i, v) for i, v in enumerate(raw or ()))
    return PolicyConfig(allow_management=sec.names("allow_management"), family=family, allow_ins=allow_ins)


def _instruction(sec: _Section, index: int, value: object) -> int:
    """One INS byte: an integer (YAML reads 0xD6 as 214) or hex text ("D6", "0xD6")."""
    ins: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        ins = value
    elif isinstance(value, str):
        try:
            ins = int(value, 16)
        except ValueError:
            ins = None
    if ins is None or not 0 <= ins <= 0xFF:
        raise sec.error(f"allow_ins[{index}]", f"expected an instruction byte 0x00..0xFF, got {value!r}")
    if ins in ENVELOPE_INS:
        raise sec.error(
            f"allow_ins[{index}]",
            "ENVELOPE (C2/C3) cannot be allowed: it hides the wrapped command from the policy, "
            "the PIN guard and log redaction; list the identity in policy.allow_management instead",
        )
    return ins


def _parse_tokens(root: _Section, base: Path) -> tuple[TokenConfig, ...]:
    raw = root.get("tokens", required=True)
    if not isinstance(raw, list) or not raw:
        raise root.error("tokens", "expected a non-empty list of tokens")
    tokens: list[TokenConfig] = []
    for i, item in enumerate(raw):
        sec = _Section(item, root.path, f"tokens[{i}]", ("name", "match", "allow", "policy"))
        name = sec.string("name", required=True)
        assert name is not None
        if len(name) > MAX_TOKEN_NAME_LENGTH or not name.isprintable():
            raise sec.error("name", f"must be printable and at most {MAX_TOKEN_NAME_LENGTH} characters")
        if any(t.name == name for t in tokens):
            raise sec.error("name", f"duplicate token name {name!r}")
        sec.get("match", required=True)
        match = _parse_match(sec.section("match", ("vid", "pid", "serial", "simulate", "state")), base)
        policy = _parse_policy(sec.section("policy", ("allow_management", "family", "allow_ins")), match)
        tokens.append(TokenConfig(name=name, match=match, allow=sec.names("allow"), policy=policy))
    return tuple(tokens)


def _parse_tls(root: _Section, base: Path) -> TlsConfig:
    root.get("tls", required=True)
    sec = root.section("tls", ("ca", "cert", "key", "crl"))
    ca, cert, key = (sec.required_file(k, base) for k in ("ca", "cert", "key"))
    return TlsConfig(ca=ca, cert=cert, key=key, crl=sec.file("crl", base))


def _parse_sections(root: _Section, base: Path) -> dict[str, Any]:
    lease = root.section("lease", ("linger_s", "idle_timeout_s", "max_hold_s", "queue_timeout_s"))
    guard = root.section("pin_guard", ("min_retries_left", "max_failures", "state"))
    limits = root.section(
        "limits", ("max_connections", "max_handshakes", "handshake_timeout_s", "grace_period_s")
    )
    d_lease, d_guard, d_limits = LeaseConfig(), PinGuardConfig(), LimitsConfig()
    return {
        "lease": LeaseConfig(**{k: lease.number(k, getattr(d_lease, k)) for k in lease.known}),
        "pin_guard": PinGuardConfig(
            min_retries_left=guard.integer("min_retries_left", d_guard.min_retries_left, low=0, high=15) or 0,
            max_failures=guard.integer("max_failures", d_guard.max_failures, low=1, high=1000) or 1,
            state=guard.file("state", base),
        ),
        "audit": _parse_audit(root.section("audit", ("path", "max_bytes", "keep")), base),
        "control": ControlConfig(socket=root.section("control", ("socket",)).file("socket", base)),
        "limits": LimitsConfig(
            max_connections=limits.integer("max_connections", 256, low=1, high=100_000) or 256,
            max_handshakes=limits.integer("max_handshakes", 32, low=1, high=10_000) or 32,
            handshake_timeout_s=limits.number("handshake_timeout_s", d_limits.handshake_timeout_s),
            grace_period_s=limits.number("grace_period_s", d_limits.grace_period_s),
        ),
        "heartbeat_s": root.number("heartbeat_s", DEFAULT_HEARTBEAT_S),
        "metrics": _parse_metrics(root.section("metrics", ("listen",))),
    }


def _parse_audit(sec: _Section, base: Path) -> AuditConfig:
    d = AuditConfig()
    return AuditConfig(
        path=sec.file("path", base),
        max_bytes=sec.integer("max_bytes", d.max_bytes, low=4096, high=2**40) or d.max_bytes,
        keep=sec.integer("keep", d.keep, low=1, high=1000) or d.keep,
    )


def _parse_metrics(sec: _Section) -> MetricsConfig:
    listen = sec.get("listen")
    return MetricsConfig(listen=None if listen is None else parse_listen(listen, sec.path, sec.key("listen")))


_TOP_LEVEL: Final = (
    "listen", "tls", "admins", "tokens", "lease", "pin_guard", "audit", "control", "limits", "heartbeat_s",
    "metrics",
)  # fmt: skip


def parse_server_config(mapping: object, path: Path | str) -> ServerConfig:
    """Validate the loaded YAML `mapping` of the server config file at `path`.

    Raises:
        ConfigError: naming the file, the dotted key and the problem.
    """
    path = Path(path)
    base = path.parent
    root = _Section(mapping, str(path), "", _TOP_LEVEL)
    listen = root.get("listen")
    if listen is None:
        host, port = "0.0.0.0", DEFAULT_PORT  # noqa: S104 - DESIGN §6: a token host serves the network
    else:
        host, port = parse_listen(listen, str(path), "listen")
    return ServerConfig(
        path=path,
        host=host,
        port=port,
        tls=_parse_tls(root, base),
        tokens=_parse_tokens(root, base),
        admins=root.names("admins"),
        **_parse_sections(root, base),
    )


def load_server_config(path: Path) -> ServerConfig:
    """Read and validate the YAML file at `path`.

    Raises:
        ConfigError: the file is missing, is not YAML, or is not a valid server config.
    """

    return parse_server_config(load_yaml(path), path)
