"""What every session of the server shares, and the typed ports a session talks to.

`SessionContext` holds the hub, the tokens and the policy; `AdminHandler` and `AuditSink` are
Protocols rather than imports of `bridge_server.net.admin` / `bridge_server.guard.audit`, because admin.py
reaches the server that builds this context (an import cycle). Split from session.py so the
session module holds only the connection's tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias

import trio

from bridge_server.net.hub import Hub, Identity
from bridge_server.tokens.manager import TokenManager

__all__ = [
    "NO_ADMIN_ACTIONS",
    "AdminAnswer",
    "AdminHandler",
    "AuditSink",
    "NoAdminActions",
    "SessionContext",
    "audit_event",
    "is_admin",
    "may_use_any",
]

AdminAnswer: TypeAlias = tuple[bool, dict[str, Any], str]
"""(ok, JSON result, error) for one admin action."""


class AdminHandler(Protocol):
    """Answers admins' `AdminRequest`s: `bridge_server.net.admin.AdminDispatcher` fits (a Protocol,
    because admin.py imports the server that imports this module)."""

    async def handle(self, action: str, args: Mapping[str, Any] | None, *, actor: str) -> AdminAnswer: ...


class AuditSink(Protocol):
    """Where connection and admin events go: `bridge_server.guard.audit.AuditLog` fits."""

    async def record(self, event: str, **fields: Any) -> bool: ...


class NoAdminActions:
    """The `AdminHandler` of a context built without one (tests): every action is refused."""

    async def handle(self, action: str, args: Mapping[str, Any] | None, *, actor: str) -> AdminAnswer:
        return False, {}, f"action {action[:64]!r}: this server answers no admin actions"


NO_ADMIN_ACTIONS: Final = NoAdminActions()


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every session shares: the hub, the tokens (index = token_id) and the policy."""

    hub: Hub
    tokens: Sequence[TokenManager]
    admins: tuple[str, ...] = ()
    heartbeat_s: float = 10.0
    dispatcher: AdminHandler = NO_ADMIN_ACTIONS  # answers AdminRequest from admins
    audit: AuditSink | None = None  # connection and admin events (docs/guardrails.md)


async def audit_event(
    ctx: SessionContext, event: str, identity: Identity | None = None, **fields: Any
) -> None:
    """Append an audit line (docs/guardrails.md); shielded, so a closing session still records it."""
    if ctx.audit is None:
        return
    if identity is not None:
        fields.update(client_id=identity.name, names=list(identity.names))
        fields["fingerprint"] = getattr(identity, "fingerprint_sha256", None)
    with trio.CancelScope(shield=True):
        await ctx.audit.record(event, **fields)


def is_admin(identity: Identity, admins: tuple[str, ...]) -> bool:
    return any(n in admins for n in identity.names)


def may_use_any(identity: Identity, tokens: Sequence[TokenManager]) -> bool:
    return any(n in t.config.allow for t in tokens for n in identity.names)
