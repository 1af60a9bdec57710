"""The server's configuration (DESIGN §6): frozen dataclasses parsed from YAML.

`parse_server_config(mapping, path)` is pure: it takes the already-loaded mapping and the
file's path (for error messages and for resolving relative paths against the file's folder)
and raises `ConfigError(path, dotted_key, problem)` naming the first problem it finds. Unknown
keys are errors, with the closest known key suggested, because a typo such as `idle_timeout`
silently falling back to a default is how a lease policy quietly stops applying.
"""

from __future__ import annotations

import re
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
from bridge_server.guard.server_pin_config import (
    ServerPinConfig,
    load_server_pin,
    parse_server_pin,
    server_pin_section,
)
from protocol.errors import ConfigError
from protocol.runtime.address import parse_address
from protocol.runtime.config import load_yaml
from protocol.runtime.schema import Section
from protocol.wire import DEFAULT_PORT

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
    port: str | None = None  # USB port path ("1-1.2"), for tokens without a usb serial number
    simulate: str | None = None
    state: Path | None = None  # simulator only: folder where the simulated card persists its state
    usb_serial: bool = True  # simulator only: false = the device shows no iSerialNumber (issue 15 item 3)


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
class TokenTimeouts:
    """How long the server waits for this token's card (docs/configuration.md, `timeouts`).

    `frame_s`: the wait for one CCID answer while the card sends nothing (no time extension);
    None derives it from the ATR as libccid does (BWT, CWT, clock, plus 1 s). `max_s`: the bound
    on one whole APDU exchange, however many time extensions the card sends."""

    frame_s: float | None = None
    max_s: float = 60.0


# A wait beyond an hour is no longer a slow card but a hung one; a lease's max_hold_s is 30 min.
MAX_TOKEN_WAIT_S: Final = 3600.0
MIN_TOKEN_FRAME_S: Final = 0.5
_USB_PORT_PATH: Final = re.compile(
    r"[0-9]{1,3}-[0-9]{1,3}(\.[0-9]{1,3}){0,6}"
)  # USB 2.0: ≤ 7 tiers  # below this a loaded host's scheduling stall reads as a dead card


@dataclass(frozen=True, slots=True)
class TokenConfig:
    name: str
    match: TokenMatch
    allow: tuple[str, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    timeouts: TokenTimeouts = TokenTimeouts()
    server_pin: ServerPinConfig | None = None  # issue 16: bridge_server/guard/server_pin_config.py
    speculation: bool = True  # verified speculation and GET RESPONSE prefetch (issue 17, docs/performance.md)


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


def parse_listen(value: object, path: str, key: str) -> tuple[str, int]:
    """A listen address "host:port" (IPv6 as "[::1]:7447", port 0: any free port); a bare host
    gets the default port."""
    if not isinstance(value, str) or not value:
        raise ConfigError(path, key, f'expected "host:port", got {value!r}')
    try:
        address = parse_address(value, DEFAULT_PORT, listen=True)
    except ValueError as exc:
        raise ConfigError(path, key, str(exc)) from None
    return address.host, address.port


def _parse_match(sec: Section) -> TokenMatch:
    profile = sec.string("simulate")
    if profile is not None:
        if any(sec.has(k) for k in ("vid", "pid", "serial", "port")):
            raise sec.error("simulate", "cannot be combined with vid/pid/serial/port")
        usb_serial = sec.raw.get("usb_serial", True)
        if not isinstance(usb_serial, bool):
            raise sec.error("usb_serial", f"expected true or false, got {usb_serial!r}")
        return TokenMatch(simulate=profile, state=sec.file("state"), usb_serial=usb_serial)
    for key in ("state", "usb_serial"):
        if sec.has(key):
            raise sec.error(key, "only applies to a simulated token (match.simulate)")
    vid = sec.optional_integer("vid", low=0, high=0xFFFF)
    pid = sec.optional_integer("pid", low=0, high=0xFFFF)
    serial = sec.string("serial")  # text: YAML turns `serial: 0012345` into a number
    port = sec.string("port")
    if port is not None and not _USB_PORT_PATH.fullmatch(port):
        raise sec.error(
            "port",
            f'expected a usb port path such as "1-1.2" (bus-port.port, as the server\'s '
            f"device.identity_fallback log line or /sys/bus/usb/devices names it), got {port!r}",
        )
    if vid is None and pid is None and serial is None and port is None:
        raise ConfigError(sec.path, sec.prefix, "needs vid/pid/serial/port or simulate")
    return TokenMatch(vid=vid, pid=pid, serial=serial, port=port)


def _parse_timeouts(sec: Section) -> TokenTimeouts:
    """The token's `timeouts` section; every wait bounded, frame_s never beyond max_s."""
    default = TokenTimeouts()
    frame_s = sec.number("frame_s", 0.0, minimum=MIN_TOKEN_FRAME_S) if sec.has("frame_s") else None
    max_s = sec.number("max_s", default.max_s, minimum=1.0)
    for key, value in (("frame_s", frame_s), ("max_s", max_s)):
        if value is not None and value > MAX_TOKEN_WAIT_S:
            raise sec.error(key, f"{value:g} s is more than the {MAX_TOKEN_WAIT_S:g} s a card wait may take")
    if frame_s is not None and frame_s > max_s:
        raise sec.error(
            "frame_s",
            f"{frame_s:g} s is longer than max_s ({max_s:g} s), the bound on the whole exchange: "
            "raise max_s too, or lower frame_s",
        )
    return TokenTimeouts(frame_s=frame_s, max_s=max_s)


def _parse_policy(sec: Section, match: TokenMatch) -> PolicyConfig:
    family = sec.string("family") or default_family(simulate=match.simulate, vid=match.vid)
    if family not in FAMILIES:
        raise sec.error("family", f"unknown card family {family!r}; one of: {', '.join(FAMILIES)}")
    raw = sec.raw.get("allow_ins")
    if raw is not None and not isinstance(raw, list):
        raise sec.error("allow_ins", f"expected a list of instruction bytes such as [0xD6], got {raw!r}")
    allow_ins = tuple(_instruction(sec, i, v) for i, v in enumerate(raw or ()))
    return PolicyConfig(allow_management=sec.names("allow_management"), family=family, allow_ins=allow_ins)


def _instruction(sec: Section, index: int, value: object) -> int:
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


def _parse_tokens(root: Section) -> tuple[TokenConfig, ...]:
    raw = root.require("tokens")
    if not isinstance(raw, list) or not raw:
        raise root.error("tokens", "expected a non-empty list of tokens")
    tokens: list[TokenConfig] = []
    for i, item in enumerate(raw):
        keys = ("name", "match", "allow", "policy", "timeouts", "server_pin", "speculation")
        sec = Section(item, root.path, f"tokens[{i}]", keys)
        name = sec.string("name", required=True)
        assert name is not None
        if len(name) > MAX_TOKEN_NAME_LENGTH or not name.isprintable():
            raise sec.error("name", f"must be printable and at most {MAX_TOKEN_NAME_LENGTH} characters")
        if any(t.name == name for t in tokens):
            raise sec.error("name", f"duplicate token name {name!r}")
        sec.require("match")
        match_keys = ("vid", "pid", "serial", "port", "simulate", "state", "usb_serial")
        match = _parse_match(sec.section("match", match_keys))
        policy = _parse_policy(sec.section("policy", ("allow_management", "family", "allow_ins")), match)
        timeouts = _parse_timeouts(sec.section("timeouts", ("frame_s", "max_s")))
        allow = sec.names("allow")
        server_pin = None
        if sec.has("server_pin"):
            pin_sec = server_pin_section(sec)
            server_pin = parse_server_pin(pin_sec, allow=allow, family=policy.family)
        speculation = sec.raw.get("speculation", True)
        if not isinstance(speculation, bool):
            raise sec.error("speculation", f"expected true or false, got {speculation!r}")
        tokens.append(
            TokenConfig(
                name=name,
                match=match,
                allow=allow,
                policy=policy,
                timeouts=timeouts,
                server_pin=server_pin,
                speculation=speculation,
            )
        )
    return tuple(tokens)


def _parse_tls(root: Section) -> TlsConfig:
    root.require("tls")
    sec = root.section("tls", ("ca", "cert", "key", "crl"))
    ca, cert, key = (sec.required_file(k) for k in ("ca", "cert", "key"))
    return TlsConfig(ca=ca, cert=cert, key=key, crl=sec.file("crl"))


def _parse_sections(root: Section) -> dict[str, Any]:
    lease = root.section("lease", ("linger_s", "idle_timeout_s", "max_hold_s", "queue_timeout_s"))
    guard = root.section("pin_guard", ("min_retries_left", "max_failures", "state"))
    limits = root.section(
        "limits", ("max_connections", "max_handshakes", "handshake_timeout_s", "grace_period_s")
    )
    d_lease, d_guard, d_limits = LeaseConfig(), PinGuardConfig(), LimitsConfig()
    return {
        "lease": LeaseConfig(**{k: lease.number(k, getattr(d_lease, k)) for k in lease.known}),
        "pin_guard": PinGuardConfig(
            min_retries_left=guard.integer("min_retries_left", d_guard.min_retries_left, low=0, high=15),
            max_failures=guard.integer("max_failures", d_guard.max_failures, low=1, high=1000),
            state=guard.file("state"),
        ),
        "audit": _parse_audit(root.section("audit", ("path", "max_bytes", "keep"))),
        "control": ControlConfig(socket=root.section("control", ("socket",)).file("socket")),
        "limits": LimitsConfig(
            max_connections=limits.integer("max_connections", d_limits.max_connections, low=1, high=100_000),
            max_handshakes=limits.integer("max_handshakes", d_limits.max_handshakes, low=1, high=10_000),
            handshake_timeout_s=limits.number("handshake_timeout_s", d_limits.handshake_timeout_s),
            grace_period_s=limits.number("grace_period_s", d_limits.grace_period_s),
        ),
        "heartbeat_s": root.number("heartbeat_s", DEFAULT_HEARTBEAT_S),
        "metrics": _parse_metrics(root.section("metrics", ("listen",))),
    }


def _parse_audit(sec: Section) -> AuditConfig:
    d = AuditConfig()
    return AuditConfig(
        path=sec.file("path"),
        max_bytes=sec.integer("max_bytes", d.max_bytes, low=4096, high=2**40),
        keep=sec.integer("keep", d.keep, low=1, high=1000),
    )


def _parse_metrics(sec: Section) -> MetricsConfig:
    listen = sec.raw.get("listen")
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
    root = Section(mapping, str(path), "", _TOP_LEVEL)
    listen = root.raw.get("listen")
    if listen is None:
        host, port = "0.0.0.0", DEFAULT_PORT  # noqa: S104 - DESIGN §6: a token host serves the network
    else:
        host, port = parse_listen(listen, str(path), "listen")
    return ServerConfig(
        path=path,
        host=host,
        port=port,
        tls=_parse_tls(root),
        tokens=_parse_tokens(root),
        admins=root.names("admins"),
        **_parse_sections(root),
    )


def load_server_config(path: Path) -> ServerConfig:
    """Read and validate the YAML file at `path`.

    Raises:
        ConfigError: the file is missing, is not YAML, or is not a valid server config.
    """

    return parse_server_config(load_yaml(path), path)


def load_server_pins(config: ServerConfig) -> ServerConfig:
    """`config` with each token's server-held PIN read (issue 16): only the daemon calls this, at
    start and on every reload; admin tools read the config without the PINs.

    Raises:
        ConfigError: a PIN file or credential that is there but must not be used.
    """
    tokens = tuple(
        t if t.server_pin is None
        else replace(t, server_pin=load_server_pin(t.server_pin, config.path, f"tokens[{i}].server_pin"))
        for i, t in enumerate(config.tokens)
    )  # fmt: skip
    return replace(config, tokens=tokens)
