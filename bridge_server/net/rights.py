"""What a config reload does to the rights of open sessions (issue 13 item 6).

Rights are read from the running config at the moment they are used wherever that is cheap:
a token's allow list (`TokenManager.config`) and its command policy (`Guardrails.policy`, put in
place by `service.apply_plan`) are looked up per request and per APDU. Two things are fixed
earlier: a session's admin flag (`Subscriber.admin`, used for admin requests and for what the
session may see) and a lease's `Holder` (which carries that flag into the command policy for the
whole lease). So after a reload, `apply_rights()` walks the open sessions:

- an identity removed from `admins` loses its session (Goodbye NOT_AUTHORIZED, close reason
  `rights_changed`): the client reconnects and gets the rights the new config gives it;
- an identity on no token's allow list any more, and no admin, loses its session (it would be
  refused at connect);
- a session that holds or waits for a lease on a token whose allow list no longer names it loses
  that lease or queue slot (`LeaseEnded(revoked)`), and keeps its others;
- an identity added to `admins` gets the flag on its open session.

Dropping rather than editing a live session keeps one rule: what a session may do is what it was
given at connect under the config in force, never a mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from bridge_server.net.hub import Hub, Subscriber
from bridge_server.net.session import is_admin, may_use_any
from bridge_server.tokens.leases import EndReason
from bridge_server.tokens.manager import TokenManager
from protocol import wire
from protocol.errors import CloseCode

log = structlog.get_logger(__name__)

RIGHTS_CHANGED: Final = "rights_changed"


@dataclass
class RightsChange:
    """What `apply_rights` did, for the `reload.applied` log line."""

    sessions_dropped: list[str] = field(default_factory=list)
    leases_ended: list[str] = field(default_factory=list)
    admins_granted: list[str] = field(default_factory=list)


def lost_right(sub: Subscriber, admins: tuple[str, ...], tokens: Sequence[TokenManager]) -> str | None:
    """Why `sub` may not keep its session under the new config, or None (pure)."""
    admin = is_admin(sub.identity, admins)
    if sub.admin and not admin:
        return "no longer in admins"
    if not admin and not may_use_any(sub.identity, tokens):
        return "on no token's allow list any more"
    return None


def apply_rights(hub: Hub, tokens: Sequence[TokenManager], admins: tuple[str, ...]) -> RightsChange:
    """Bring every open session in line with `admins` and the tokens' current allow lists."""
    change = RightsChange()
    for sub in hub:
        if sub.closed:
            continue
        why = lost_right(sub, admins, tokens)
        if why is not None:
            _drop(sub, why)
            change.sessions_dropped.append(f"{sub.name} (conn {sub.conn_id}): {why}")
            continue  # the session's end detaches it from every token
        if not sub.admin and is_admin(sub.identity, admins):
            sub.admin = True
            change.admins_granted.append(sub.name)
        for manager in tokens:
            if _leased_or_queued(manager, sub.conn_id) and not sub.may_use(manager.config.allow):
                manager.detach(sub.conn_id, EndReason.REVOKED)
                change.leases_ended.append(f"{manager.name}: {sub.name} (conn {sub.conn_id})")
                log.warning(
                    "lease.rights_revoked", token=manager.name, client_id=sub.name, conn_id=sub.conn_id
                )
    return change


def _leased_or_queued(manager: TokenManager, conn_id: int) -> bool:
    holder = manager.book.holder
    return (holder is not None and holder.conn_id == conn_id) or conn_id in manager.book.waiting


def _drop(sub: Subscriber, why: str) -> None:
    log.warning("session.rights_revoked", conn_id=sub.conn_id, client_id=sub.name, reason=why)
    sub.push(wire.Goodbye(code=CloseCode.NOT_AUTHORIZED, reason=f"{why} (server config reloaded)"))
    sub.close(RIGHTS_CHANGED)
