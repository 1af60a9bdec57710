"""Where the command policy, the PIN guard and the audit log meet the APDU path (one per token).

The token task owns one `Guardrails`. For every command APDU of a lease:

1. `screen(raw, holder)` (sync, called by `VirtualReader` before the card): the command
   policy, then the PIN guard; a refusal is answered with its status word and never reaches
   the card;
2. `observe(raw, rapdu, holder)` (sync, after the card answered, before the answer goes back
   to the client): the PIN guard learns the SW; a changed guard state is saved before we
   answer, so a crash right after a wrong PIN does not forget it;
3. `record(events)` (async, after the answer went back): audit lines.

Only the command header, "has data" and the status word are looked at here; no APDU data is
kept, logged or audited (DESIGN §4).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from bridge_server.audit import AuditLog
from bridge_server.command_policy import check_command, may_manage
from bridge_server.config import PolicyConfig, ServerConfig
from bridge_server.pin_guard import Attempt, Engaged, PinGuard, PinGuardStore, checklist
from protocol.apdu import PIN_INS, ApduClass, CommandApdu, classify, describe_sw
from protocol.errors import ConfigError, MalformedApduError

log = structlog.get_logger(__name__)

_CLA_CHAINING: Final = 0x10
_INTERESTING: Final = PIN_INS | {0x47, 0xDA, 0xDB, 0xE4, 0x86, 0x87, 0x88, 0x2A}


@dataclass(frozen=True, slots=True)
class Holder:
    """The identity a lease belongs to, as policy needs it."""

    name: str
    names: tuple[str, ...]
    admin: bool
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Screened:
    """A command refused before the card: the SW the client gets and why."""

    sw: int
    kind: str  # "policy" | "pin_guard"
    ins: int
    detail: str


@dataclass(frozen=True, slots=True)
class _Header:
    cla: int
    ins: int
    p2: int
    has_data: bool
    kind: ApduClass


def _header(raw: bytes) -> _Header | None:
    if len(raw) < 4 or raw[1] not in _INTERESTING:
        return None
    try:
        apdu = CommandApdu.parse(raw)
    except MalformedApduError:
        # Unparseable but PIN-class: treat as carrying data (the guard must not be bypassed).
        return _Header(raw[0], raw[1], raw[3], len(raw) > 5, ApduClass.OTHER)
    return _Header(apdu.cla, apdu.ins, apdu.p2, bool(apdu.data), classify(apdu))


class Guardrails:
    """Policy, PIN guard and audit for one token. See the module docstring."""

    def __init__(
        self,
        token: str,
        *,
        policy: PolicyConfig | None = None,
        guard: PinGuard | None = None,
        store: PinGuardStore | None = None,
        audit: AuditLog | None = None,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        self.token = token
        self.policy = policy or PolicyConfig()
        self.guard = guard if guard is not None else PinGuard()
        self.store = store or PinGuardStore(None)
        self.audit = audit or AuditLog(None)
        self._wall = wall_time
        self.private_key_ops = 0  # this lease's successful private-key operations

    def screen(self, raw: bytes, holder: Holder) -> Screened | None:
        manager = may_manage(holder.names, admin=holder.admin, allow_management=self.policy.allow_management)
        ins = raw[1] if len(raw) >= 4 else None  # the allow list judges every command, by INS
        refusal = check_command(ins, manager=manager, allowed=self.policy.allowed)
        if refusal is not None:
            return Screened(
                refusal.sw, "policy", refusal.ins, f"{refusal.command} is not allowed for {holder.name!r}"
            )
        head = _header(raw)
        if head is None:
            return None
        sw = self.guard.check(self.token, head.ins, head.p2, head.has_data)
        if sw is not None:
            return Screened(sw, "pin_guard", head.ins, "the PIN guard is engaged")
        return None

    def observe(self, raw: bytes, rapdu: bytes, holder: Holder) -> list[Attempt | Engaged]:
        head = _header(raw)
        if head is None or len(rapdu) < 2:
            return []
        sw = rapdu[-2] << 8 | rapdu[-1]
        if (
            head.kind is ApduClass.PRIVATE_KEY
            and not head.cla & _CLA_CHAINING
            and (sw == 0x9000 or sw >> 8 == 0x61)
        ):
            self.private_key_ops += 1
        if head.ins not in PIN_INS:
            return []
        before = self.guard.to_json()
        events = self.guard.observe(
            self.token, head.ins, head.p2, head.has_data, sw, holder=holder.name, now=self._wall()
        )
        if self.guard.to_json() != before:
            self.save()
        return events

    def save(self) -> None:
        try:
            self.store.save(self.guard)
        except OSError as exc:
            # The in-memory guard still holds; say loudly that a restart would forget it.
            log.error("pin_guard.save_failed", token=self.token, path=str(self.store.path), error=str(exc))

    async def record(self, event: str, **fields: Any) -> bool:
        """Append an audit line; False when it had to wait because the log is unwritable."""
        return await self.audit.record(event, token=self.token, **fields)

    async def record_guard_events(self, events: list[Attempt | Engaged], holder: Holder) -> None:
        for ev in events:
            if isinstance(ev, Attempt):
                await self.record(
                    "pin.verified", client_id=holder.name, lease_epoch=holder.epoch, ins=f"{ev.ins:02X}",
                    reference=ev.ref, sw=f"{ev.sw:04X}", outcome=ev.outcome, retries_left=ev.retries_left,
                    failures=ev.failures,
                )  # fmt: skip
                log.info(
                    "pin.verified",
                    token=self.token,
                    client_id=holder.name,
                    sw=f"{ev.sw:04X}",
                    outcome=ev.outcome,
                )
            else:
                await self.record(
                    "pin_guard.engaged", client_id=holder.name, reference=ev.ref, reason=ev.reason,
                    retries_left=ev.retries_left, failures=ev.failures,
                )  # fmt: skip
                log.warning(
                    "pin_guard.engaged", token=self.token, client_id=holder.name, reason=ev.reason,
                    retries_left=ev.retries_left, failures=ev.failures,
                )  # fmt: skip

    async def record_refusal(self, refused: Screened, holder: Holder) -> None:
        await self.record(
            "command.refused", client_id=holder.name, lease_epoch=holder.epoch, ins=f"{refused.ins:02X}",
            sw=f"{refused.sw:04X}", reason=refused.kind, detail=refused.detail,
        )  # fmt: skip
        log.warning(
            "command.refused", token=self.token, client_id=holder.name, ins=f"{refused.ins:02X}",
            sw=f"{refused.sw:04X}", reason=refused.kind,
        )  # fmt: skip

    def notice(self, refused: Screened) -> str:
        """What the client's log shows next to the status word."""
        if refused.kind == "pin_guard":
            return (
                f"PIN commands for token {self.token!r} are refused by the server's PIN guard "
                f"(answered {describe_sw(refused.sw)}) so the card cannot lock; "
                "fix the PIN in the CI secret, "
                f"then an operator runs `tokenbridge pin-guard reset {self.token}`"
            )
        return (
            f"{refused.detail} on token {self.token!r} (answered {describe_sw(refused.sw)}); "
            "list the identity in `admins` or the token's policy.allow_management to permit it, "
            "or add the instruction to the token's policy.allow_ins (docs/guardrails.md)"
        )


# -- server-wide pieces -------------------------------------------------------------------------


def guard_state_path(config: ServerConfig) -> Path | None:
    """`pin_guard.state`, else `pin-guard.json` next to the audit log, else None (memory only)."""
    if config.pin_guard.state is not None:
        return config.pin_guard.state
    if config.audit.path is not None:
        return config.audit.path.with_name("pin-guard.json")
    return None


def open_guard(config: ServerConfig) -> tuple[PinGuard, PinGuardStore]:
    """The PIN guard with its saved state. Raises ConfigError for an unreadable state file."""
    guard = PinGuard(
        min_retries_left=config.pin_guard.min_retries_left, max_failures=config.pin_guard.max_failures
    )
    store = PinGuardStore(guard_state_path(config))
    try:
        store.load(guard)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        # Refusing to start beats silently forgetting an engaged guard.
        raise ConfigError(
            str(config.path), "pin_guard.state",
            f"cannot read the PIN guard state {store.path}: {exc}; "
            "fix it, or move it aside (that clears the guard)",
        ) from None  # fmt: skip
    if store.path is None:
        log.warning("pin_guard.not_persisted", reason="neither pin_guard.state nor audit.path is configured")
    engaged = [t for t in guard.tokens if guard.engaged(t)]
    if engaged:
        log.warning("pin_guard.engaged_at_start", tokens=engaged, path=str(store.path))
    return guard, store


def reset_guard(rails: Guardrails, actor: str) -> dict[str, Any]:
    """Operator action: clear the guard of `rails.token`, persist, audit; says what to check first."""
    before = rails.guard.reset(rails.token)
    rails.save()
    rails.audit.append(
        "pin_guard.cleared", token=rails.token, actor=actor,
        was={k: {"failures": v.failures, "retries_left": v.retries_left, "engaged": v.engaged,
                 "locked": v.locked, "reason": v.reason} for k, v in before.items()},
    )  # fmt: skip
    log.warning(
        "pin_guard.cleared",
        token=rails.token,
        actor=actor,
        was_engaged=any(v.engaged for v in before.values()),
    )
    return {
        "token": rails.token,
        "cleared": bool(before),
        "was_engaged": any(v.engaged for v in before.values()),
        "locked": any(v.locked for v in before.values()),
        "check_first": checklist(rails.token, before),
        "message": f"PIN guard of {rails.token!r} cleared by {actor}",
    }
