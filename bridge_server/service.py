"""Running as a systemd service: STATUS= lines and the SIGHUP config reload.

`status_line()` and `plan_reload()` are pure (sync-testable); `report_status()` and
`reload_config()` apply them to a running `BridgeServer`.

What SIGHUP can change without a restart (issue 8): each token's allow list and command
policy (`policy.allow_management`, `family`, `allow_ins`), the admins, and the lease timings.
Rights apply to open sessions at once (issue 13, `bridge_server/net/rights.py`): a session whose
rights shrank is dropped or loses its lease, and the `reload.applied` line names it. Everything
else in server.yaml (listen address, the tokens themselves and their `match`, pin_guard, audit,
control, limits, heartbeat) is bound to open sockets, files or devices: a change is logged as
`reload.needs_restart` and ignored until the next restart.
The TLS material (certificate, key, CRL) is reloaded by `BridgeServer.reload_tls()`.
The log level is the `--log-level` option, not part of the config file.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

import structlog
import trio

from bridge_server.config import ServerConfig, TokenConfig, load_server_config, load_server_pins
from bridge_server.net.hub import Hub
from bridge_server.net.reload import ReloadOutcome
from bridge_server.net.rights import apply_rights
from bridge_server.tokens.manager import TokenManager
from protocol.display import TokenState
from protocol.errors import ConfigError
from protocol.runtime.sdnotify import Notifier

log = structlog.get_logger(__name__)

STATUS_INTERVAL_S: Final = 1.0  # how often the STATUS= line is recomputed (sent only on change)
MAX_STATUS_LENGTH: Final = 200

# Top-level sections that need a restart when they change (see the module docstring).
_RESTART_SECTIONS: Final = ("pin_guard", "audit", "control", "limits", "heartbeat_s")


TokenLine = tuple[str, bool, str | None] | tuple[str, bool, str | None, bool, bool]


def token_state(
    name: str, present: bool, holder: str | None, guarded: bool = False, locked: bool = False
) -> str:
    """`codesign idle`, `codesign leased by build-vm-01`, `codesign guarded, leased by build-vm-01`,
    `codesign absent`: the words of `tokenbridge status` (protocol.display.TokenState)."""
    state = TokenState.of(present=present, leased=holder is not None, guarded=guarded, locked=locked)
    if state is TokenState.LEASED:
        return f"{name} leased by {holder}"
    if holder is not None and state is not TokenState.ABSENT:
        return f"{name} {state}, leased by {holder}"
    return f"{name} {state}"


def status_line(tokens: Iterable[TokenLine], connections: int) -> str:
    """One STATUS= text: each token's state (name, present, holder[, guarded, locked]) and the
    number of connections."""
    parts = [token_state(*t) for t in tokens]
    text = f"{'; '.join(parts)}; {connections} connection(s)"
    return text if len(text) <= MAX_STATUS_LENGTH else text[: MAX_STATUS_LENGTH - 3] + "..."


class Reconfigurable(Protocol):
    """What a reload reads and replaces (`BridgeServer`; tests pass a namespace with these)."""

    config: ServerConfig  # setting it hands the new config to the server's other parts

    @property
    def hub(self) -> Hub: ...

    @property
    def tokens(self) -> Sequence[TokenManager]: ...


class Service(Reconfigurable, Protocol):
    shutdown_requested: trio.Event
    config_reload: ReloadOutcome  # the last SIGHUP's config outcome, for /metrics

    def reload_tls(self) -> bool: ...


def _guard_flags(token: TokenManager) -> tuple[bool, bool]:
    """(engaged, locked) from the token's PIN guard; a guard that cannot say is not shown."""
    try:
        guard = token.rails.guard.status(token.name)
    except Exception:  # the STATUS= task must not die with the guard (like `status`)
        return False, False
    return bool(guard.get("engaged")), bool(guard.get("locked"))


def server_status(server: Reconfigurable) -> str:
    tokens: list[TokenLine] = [
        (t.name, t.present, t.book.holder.identity if t.book.holder else None, *_guard_flags(t))
        for t in server.tokens
    ]
    return status_line(tokens, sum(1 for _ in server.hub))


async def report_status(server: Service, notifier: Notifier) -> None:
    """Send `STATUS=` whenever the text changes (polled: token tasks have no change event)."""
    last = server_status(server)  # READY=1 carried this one
    while not server.shutdown_requested.is_set():
        text = server_status(server)
        if text != last:
            notifier.notify(STATUS=text)
            last = text
        await trio.sleep(STATUS_INTERVAL_S)


@dataclass
class ReloadPlan:
    """What a new config changes: applied live, or waiting for a restart."""

    config: ServerConfig  # the running config with the live-applicable changes
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    sessions_dropped: list[str] = field(default_factory=list)  # filled by apply_plan
    leases_ended: list[str] = field(default_factory=list)  # filled by apply_plan


def _token_changes(
    old: Sequence[TokenConfig], new: Sequence[TokenConfig]
) -> tuple[list[TokenConfig], list[str], list[str]]:
    """The running tokens with new allow lists and policies, what changed, what needs a restart."""
    by_name = {t.name: t for t in new}
    kept: list[TokenConfig] = []
    applied: list[str] = []
    restart: list[str] = []
    for tok in old:
        fresh = by_name.pop(tok.name, None)
        if fresh is None:
            restart.append(f"tokens: {tok.name} removed")
            kept.append(tok)
            continue
        if fresh.match != tok.match:
            restart.append(f"tokens: {tok.name}.match")
        if fresh.allow != tok.allow:
            applied.append(f"tokens: {tok.name}.allow")
        if fresh.policy != tok.policy:
            applied.append(f"tokens: {tok.name}.policy")
        if fresh.server_pin is not None or tok.server_pin is not None:
            applied.append(f"tokens: {tok.name}.server_pin (re-read)")
        if fresh.speculation != tok.speculation:  # issue 17: applied by TokenManager.reconfigure
            applied.append(f"tokens: {tok.name}.speculation")
        kept.append(replace(fresh, match=tok.match))
    restart.extend(f"tokens: {name} added" for name in by_name)
    return kept, applied, restart


def plan_reload(old: ServerConfig, new: ServerConfig) -> ReloadPlan:
    """Compare the running config with the file's new content (pure)."""
    tokens, applied, restart = _token_changes(old.tokens, new.tokens)
    if (new.host, new.port) != (old.host, old.port):
        restart.append("listen")
    if new.admins != old.admins:
        applied.append("admins")
    if new.lease != old.lease:
        applied.append("lease")
    if new.tls != old.tls:
        applied.append("tls (paths)")
    restart.extend(s for s in _RESTART_SECTIONS if getattr(new, s) != getattr(old, s))
    config = replace(old, tokens=tuple(tokens), admins=new.admins, lease=new.lease, tls=new.tls)
    return ReloadPlan(config=config, applied=applied, needs_restart=restart)


def apply_plan(server: Reconfigurable, plan: ReloadPlan) -> None:
    """Put the live-applicable part of `plan` into the running server's objects."""
    cfg = plan.config
    for manager, tok in zip(server.tokens, cfg.tokens, strict=True):
        manager.reconfigure(tok, cfg.lease)
    rights = apply_rights(server.hub, server.tokens, cfg.admins)
    plan.sessions_dropped, plan.leases_ended = rights.sessions_dropped, rights.leases_ended
    server.config = cfg


def reload_config(server: Reconfigurable) -> ReloadPlan | None:
    """Re-read the server's config file and apply what can change live.

    A file that does not parse or validate changes nothing and is logged as `reload.failed`.
    """
    path = server.config.path
    try:
        new = load_server_pins(load_server_config(path))  # re-reads each server-held PIN (issue 16)
    except ConfigError as exc:
        log.error("reload.failed", what="config", path=str(path), reason=str(exc), kept="the running config")
        return None
    plan = plan_reload(server.config, new)
    apply_plan(server, plan)
    if plan.needs_restart:
        log.warning(
            "reload.needs_restart",
            path=str(path),
            changed=plan.needs_restart,
            reason="these settings apply at the next restart: systemctl restart tokenbridge-server",
        )
    log.info(
        "reload.applied", what="config", path=str(path), changed=plan.applied,
        sessions_dropped=plan.sessions_dropped, leases_ended=plan.leases_ended,
    )  # fmt: skip
    return plan


def reload_service(server: Service, notifier: Notifier) -> None:
    """SIGHUP: the live part of the config, then certificate, key and CRL (`reload_tls`)."""
    notifier.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
    server.config_reload.record(reload_config(server) is not None, time.time())
    server.reload_tls()  # logs tls.reloaded, or tls.reload_failed and keeps the old context
    notifier.notify(READY=1, STATUS=server_status(server))
