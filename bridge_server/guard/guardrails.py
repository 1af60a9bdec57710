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
kept, logged or audited (DESIGN §4). "Has data" and the SW only say something about a whole
command, so a chained PIN command (CLA b5, ISO 7816-4 §5.4.1) is refused before anything else,
for admins too: the card would compare the PIN at the end of the chain, while each link looks
like a success (9000) or a status query (no data) on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from bridge_server.config import PolicyConfig, ServerConfig
from bridge_server.guard.audit import AuditLog
from bridge_server.guard.command_policy import check_command, may_manage
from bridge_server.guard.pin_guard import REFUSAL_SW, Attempt, Engaged, PinGuard, PinGuardStore, checklist
from bridge_server.guard.server_pin_config import ServerPinConfig
from bridge_server.guard.server_pin_rails import ServerPinRails
from protocol.apdu import (
    PIN_INS,
    SW_CONDITIONS_NOT_SATISFIED,
    ApduClass,
    CommandApdu,
    classify,
    describe_sw,
    is_chained,
)
from protocol.errors import ConfigError, MalformedApduError

log = structlog.get_logger(__name__)

_INTERESTING: Final = PIN_INS | {0x47, 0xDA, 0xDB, 0xE4, 0x86, 0x87, 0x88, 0x2A}


@dataclass(frozen=True, slots=True)
class Holder:
    """The identity a lease belongs to, as policy needs it."""

    name: str
    names: tuple[str, ...]
    admin: bool
    epoch: int = 0
    fingerprint: str = ""  # SHA-256 of the holder's certificate, for attributable audit lines

    def audit_fields(self) -> dict[str, Any]:
        """Who, as every audit line about a client names it: identity, SANs and fingerprint (S11)."""
        return {"client_id": self.name, "names": list(self.names), "fingerprint": self.fingerprint}


@dataclass(frozen=True, slots=True)
class Screened:
    """A command refused before the card: the SW the client gets and why."""

    sw: int
    kind: str  # "policy" | "pin_guard" | "pin_chaining" | "pin_guard_unsaved" (state not saved)
    # | "server_pin" (guard/server_pin.py refused it) | "server_pin_missing" (no PIN loaded)
    ins: int
    detail: str


@dataclass(frozen=True, slots=True)
class _Header:
    cla: int
    ins: int
    p2: int
    has_data: bool
    kind: ApduClass

    @property
    def chained(self) -> bool:
        return is_chained(self.cla)


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
        server_pin: ServerPinConfig | None = None,
    ) -> None:
        self.token = token
        self.server_pin = ServerPinRails(token, server_pin)  # issue 16
        self.policy = policy or PolicyConfig()
        self.guard = guard if guard is not None else PinGuard()
        self.store = store or PinGuardStore(None)
        self.audit = audit or AuditLog(None)
        self._wall = wall_time
        self.private_key_ops = 0  # this lease's successful private-key operations

    def screen(self, raw: bytes, holder: Holder) -> Screened | None:
        self.server_pin.take_substituted()  # a mark left by an exchange that never got observed dies here
        head = _header(raw)
        if head is not None and head.chained and head.ins in PIN_INS:
            return self._check_pin(head)  # before the policy: the same answer for everybody
        manager = may_manage(holder.names, admin=holder.admin, allow_management=self.policy.allow_management)
        ins = raw[1] if len(raw) >= 4 else None  # the allow list judges every command, by INS
        refusal = check_command(ins, manager=manager, allowed=self.policy.allowed)
        if refusal is not None:
            return Screened(
                refusal.sw, "policy", refusal.ins, f"{refusal.command} is not allowed for {holder.name!r}"
            )
        if head is None:
            return None
        return self._check_pin(head) or self._check_server_pin(raw, head, holder)

    def _check_server_pin(self, raw: bytes, head: _Header, holder: Holder) -> Screened | None:
        refused = self.server_pin.screen(raw, holder.names) if head.ins in PIN_INS else None
        return (
            None
            if refused is None
            else Screened(SW_CONDITIONS_NOT_SATISFIED, refused[0], head.ins, refused[1])
        )

    def _check_pin(self, head: _Header) -> Screened | None:
        sw = self.guard.check(self.token, head.ins, head.p2, head.has_data, chained=head.chained)
        if sw is not None:
            if head.chained:
                return Screened(sw, "pin_chaining", head.ins, "a chained PIN command is refused")
            return Screened(sw, "pin_guard", head.ins, "the PIN guard is engaged")
        if head.ins in PIN_INS and head.has_data and not self._state_saved():
            return Screened(REFUSAL_SW, "pin_guard_unsaved", head.ins, self.store.problem)
        return None

    def state_saved(self) -> bool:
        """`_state_saved` for a PIN command the server sends itself (`tokenbridge pin test`)."""
        return self._state_saved()

    def _state_saved(self) -> bool:
        """Fail closed: a PIN command reaches the card only once the guard's state was just saved.

        One small write before each PIN presentation proves that the failure it may cause can be
        persisted too (a full disk refuses the command instead of spending an unrecorded retry).
        """
        if self.store.path is not None:
            self.save()
        return not self.store.problem

    def observe(self, raw: bytes, rapdu: bytes, holder: Holder) -> list[Attempt | Engaged]:
        substituted = self.server_pin.take_substituted()  # this answer is to the server-held PIN
        head = _header(raw)
        if head is None or len(rapdu) < 2:
            return []
        sw = rapdu[-2] << 8 | rapdu[-1]
        if head.kind is ApduClass.PRIVATE_KEY and not head.chained and (sw == 0x9000 or sw >> 8 == 0x61):
            self.private_key_ops += 1
        if head.ins not in PIN_INS:
            return []
        before = self.guard.to_json()
        events = self.guard.observe(
            self.token, head.ins, head.p2, head.has_data, sw, holder=holder.name, now=self._wall(),
            chained=head.chained,
        )  # fmt: skip
        if substituted:
            events = self.server_pin.after_observe(events, self.guard, self._wall())
        if self.guard.to_json() != before:
            self.save()
        return events

    def save(self) -> None:
        was_failing = bool(self.store.problem)
        try:
            self.store.save(self.guard)
        except OSError as exc:
            # The in-memory guard still holds and `screen` refuses PIN commands until a save
            # succeeds; say loudly (once) that a restart would forget this change.
            if not was_failing:
                log.error(
                    "pin_guard.save_failed", token=self.token, path=str(self.store.path), reason=str(exc)
                )
            return
        if was_failing:
            log.warning(
                "pin_guard.saved", token=self.token, path=str(self.store.path), reason="writable again"
            )

    async def record(self, event: str, **fields: Any) -> bool:
        """Append an audit line; False when it had to wait because the log is unwritable."""
        return await self.audit.record(event, token=self.token, **fields)

    async def record_guard_events(self, events: list[Attempt | Engaged], holder: Holder) -> None:
        for ev in events:
            if isinstance(ev, Attempt):
                await self.record(
                    "pin.verified", **holder.audit_fields(), lease_epoch=holder.epoch, ins=f"{ev.ins:02X}",
                    reference=ev.ref, sw=f"{ev.sw:04X}", outcome=ev.outcome, retries_left=ev.retries_left,
                    failures=ev.failures, **({"server_pin": True} if ev.server_pin else {}),
                )  # fmt: skip
                log.info(
                    "pin.verified",
                    token=self.token,
                    client_id=holder.name,
                    sw=f"{ev.sw:04X}",
                    outcome=ev.outcome,
                    **({"server_pin": True} if ev.server_pin else {}),
                )
            else:
                await self.record(
                    "pin_guard.engaged", **holder.audit_fields(), reference=ev.ref, reason=ev.reason,
                    retries_left=ev.retries_left, failures=ev.failures,
                )  # fmt: skip
                log.warning(
                    "pin_guard.engaged", token=self.token, client_id=holder.name, reason=ev.reason,
                    retries_left=ev.retries_left, failures=ev.failures,
                )  # fmt: skip

    async def record_refusal(self, refused: Screened, holder: Holder) -> None:
        await self.record(
            "command.refused", **holder.audit_fields(), lease_epoch=holder.epoch, ins=f"{refused.ins:02X}",
            sw=f"{refused.sw:04X}", reason=refused.kind, detail=refused.detail,
        )  # fmt: skip
        log.warning(
            "command.refused", token=self.token, client_id=holder.name, ins=f"{refused.ins:02X}",
            sw=f"{refused.sw:04X}", reason=refused.kind,
        )  # fmt: skip

    def notice(self, refused: Screened) -> str:
        """What the client's log shows next to the status word."""
        if refused.kind == "pin_guard_unsaved":
            return (
                f"PIN commands for token {self.token!r} are refused (answered {describe_sw(refused.sw)}) "
                "because the server cannot save the PIN guard's state; "
                "an operator frees space on the server's state disk (see `tokenbridge status`)"
            )
        if refused.kind == "pin_guard":
            return (
                f"PIN commands for token {self.token!r} are refused by the server's PIN guard "
                f"(answered {describe_sw(refused.sw)}) so the card cannot lock; "
                "fix the PIN in the CI secret, "
                f"then an operator runs `tokenbridge pin-guard reset {self.token}`"
            )
        if refused.kind.startswith("server_pin"):
            # Missing: why (a path on the server) is for the operator's status, not the client.
            why = (
                "the server has no PIN loaded for it"
                if refused.kind == "server_pin_missing"
                else refused.detail
            )
            return (
                f"the server-held PIN of token {self.token!r} was not used: {why} "
                f"(answered {describe_sw(refused.sw)}, nothing reached the card); identities in "
                "server_pin.for log in with the placeholder PIN 000000 (docs/client.md)"
            )
        if refused.kind == "pin_chaining":
            return (
                f"a chained PIN command (ISO 7816-4 command chaining, CLA bit 0x10) on token "
                f"{self.token!r} is refused by the server (answered {describe_sw(refused.sw)}) and never "
                "reached the card; send VERIFY/CHANGE REFERENCE DATA/RESET RETRY COUNTER as one APDU "
                "(extended length if it does not fit)"
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
    else:
        try:  # probe: on a full disk PIN commands are refused from the start, not after one is lost
            store.save(guard)
        except OSError:
            log.error("pin_guard.save_failed", path=str(store.path), reason=store.problem)
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
