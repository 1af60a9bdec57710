"""The token task's side of flood limits: audit less, and disconnect a client that keeps at it.

The decisions are in bridge_server/guard/flood_limits.py (pure); this applies them for one token:
writes the audit lines, logs, and ejects a client with `Goodbye(TOO_MANY_REQUESTS)`. After an
ejection the token task ignores that connection's queued commands until it is detached, and the
listener refuses the identity's new connections for a while (`PenaltyBox`, in the hub).
"""

from __future__ import annotations

from typing import Any

import structlog

from bridge_server.guard.flood_limits import (
    DUPLICATE_REQUESTS,
    REFUSED_COMMANDS,
    PenaltyBox,
    RateMeter,
    RefusalDigest,
)
from bridge_server.guard.guardrails import Guardrails, Holder, Screened
from bridge_server.net.hub import Subscriber
from protocol import wire
from protocol.errors import CloseCode

log = structlog.get_logger(__name__)

EJECTED_REASON = "too_many_requests"


class FloodGuard:
    """Duplicate lease requests and refused commands of one token. See the module docstring."""

    def __init__(self, token: str, rails: Guardrails, penalties: PenaltyBox) -> None:
        self.token = token
        self.rails = rails
        self.penalties = penalties
        self.duplicates = RateMeter(**DUPLICATE_REQUESTS)
        self.refusals = RateMeter(**REFUSED_COMMANDS)
        self.digest = RefusalDigest()
        self._ejected: set[int] = set()

    def ejected(self, conn_id: int) -> bool:
        return conn_id in self._ejected

    def forget(self, conn_id: int) -> None:
        self._ejected.discard(conn_id)

    async def duplicate_request(self, sub: Subscriber, now: float) -> None:
        """`sub` asked for a lease it already holds or waits for (answered, never audited)."""
        if not self.duplicates.take(sub.name, now):
            await self._eject(sub, "it kept re-sending LeaseRequest for a lease it holds or waits for", now)

    async def refused(self, sub: Subscriber, refused: Screened, holder: Holder, now: float) -> None:
        """The holder's command was refused: audit it (the first few) or count it."""
        if self.digest.note(refused.kind, refused.ins, now):
            await self.rails.record_refusal(refused, holder)
        elif self.digest.summary_due(now):
            await self.write_summary(holder.audit_fields(), holder.epoch, now)
        if not self.refusals.take(sub.name, now):
            await self._eject(sub, "it kept sending commands the server refuses", now)

    async def write_summary(self, who: dict[str, Any], epoch: int, now: float) -> None:
        """The refusals counted but not audited one by one (at lease end and every interval)."""
        fields = self.digest.take_summary(now)
        if fields is None:
            return
        await self.rails.record("command.refused_summary", **who, lease_epoch=epoch, **fields)
        log.warning("command.refused_summary", token=self.token, client_id=who.get("client_id"), **fields)

    async def lease_ended(self, who: dict[str, Any], epoch: int, now: float) -> None:
        """`who`: the holder's audit fields (`Holder.audit_fields`)."""
        await self.write_summary(who, epoch, now)
        self.digest = RefusalDigest()

    async def _eject(self, sub: Subscriber, why: str, now: float) -> None:
        if sub.conn_id in self._ejected:
            return
        self._ejected.add(sub.conn_id)
        self.penalties.ban(sub.name, now)
        log.warning("session.ejected", token=self.token, client_id=sub.name, conn_id=sub.conn_id, reason=why)
        await self.rails.record(
            "connection.ejected",
            client_id=sub.name,
            names=list(sub.identity.names),
            fingerprint=sub.identity.fingerprint_sha256,
            conn_id=sub.conn_id,
            reason=EJECTED_REASON,
            detail=why,
        )
        sub.push(wire.Goodbye(code=CloseCode.TOO_MANY_REQUESTS, reason=f"{EJECTED_REASON}: {why}"))
