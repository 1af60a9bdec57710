"""One client connection, after its TLS handshake (DESIGN §3, style-anchors §3.4).

Theory of operation
-------------------
`serve_session` is a firewall: it catches the failures a connection is expected to have (the
peer breaks the protocol, the socket dies, the greeting never comes) and logs exactly one
`session.closed` line with the reason and counters; only a bug escapes as `session.crashed`.

The greeting (docs/protocol.md §4): we speak first, `Welcome` or `Refused` (an identity on no
token's allow list and not an admin is refused before it sees anything); the client answers
`ClientHello`; only then do we register the session with the hub and send a `TokenStatus` per
token it may see. Three tasks then share the connection:

- the reader dispatches the client's messages to the token managers; silence for
  `HEARTBEAT_MISSES` heartbeat intervals ends the session (`heartbeat_lost`);
- the writer is the only task that writes: it drains the session's bounded outbox, into
  which everyone (token tasks, the reader, the pinger) `push()`es without waiting. A full
  outbox means the client is not reading: the session ends (`slow_client`) instead of making
  anyone wait;
- the pinger pushes a `Ping` every heartbeat interval.

Whatever ends the session, its `finally` detaches it from every token (sync, so it cannot be
lost or blocked): its lease ends and its queue slots go.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio

from bridge_server import SERVER_SOFTWARE
from bridge_server.net.admin import wire_result
from bridge_server.net.hub import Hub, Identity, Subscriber
from bridge_server.net.reload import REVOKED_REASON
from bridge_server.tokens.leases import EndReason
from bridge_server.tokens.manager import TokenManager
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode, RemoteProtocolError
from protocol.runtime.framed import FramedConnection

log = structlog.get_logger(__name__)

OUTBOX_CAPACITY: Final = 64
FAREWELL_TIMEOUT_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every session shares: the hub, the tokens (index = token_id) and the policy."""

    hub: Hub
    tokens: Sequence[TokenManager]
    admins: tuple[str, ...] = ()
    heartbeat_s: float = 10.0
    dispatcher: Any = None  # bridge_server.net.admin.AdminDispatcher: answers AdminRequest from admins
    audit: Any = None  # bridge_server.guard.audit.AuditLog: connection and admin events


async def audit_event(
    ctx: SessionContext, event: str, identity: Identity | None = None, **fields: Any
) -> None:
    """Append an audit line (docs/guardrails.md); shielded, so a closing session still records it."""
    if ctx.audit is None:
        return
    if identity is not None:
        fields.update(client_id=identity.name, names=list(identity.names))
        fields["fingerprint"] = identity.fingerprint_sha256
    with trio.CancelScope(shield=True):
        await ctx.audit.record(event, **fields)


def is_admin(identity: Identity, admins: tuple[str, ...]) -> bool:
    return any(n in admins for n in identity.names)


def may_use_any(identity: Identity, tokens: Sequence[TokenManager]) -> bool:
    return any(n in t.config.allow for t in tokens for n in identity.names)


async def send_refusal(stream: trio.abc.Stream, code: CloseCode, reason: str, message: str) -> None:
    """Send `Refused` as the first frame (TLS 1.3 rejections are only seen on the first read)."""
    framed = FramedConnection(stream, BridgeConnection(Role.SERVER))
    msg = wire.Refused(version=wire.PROTOCOL_VERSION, code=code, reason=reason, message=message)
    with trio.move_on_after(FAREWELL_TIMEOUT_S):
        await framed.send(msg)


class _Session:
    def __init__(self, framed: FramedConnection, sub: Subscriber, ctx: SessionContext) -> None:
        self.framed = framed
        self.sub = sub
        self.ctx = ctx
        self.reason: str | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.ccid_frames = 0
        self._nonces = itertools.count(1)
        self._ping_sent: tuple[int, float] | None = None  # (nonce, trio time) of the last Ping

    async def run(self, outbox: trio.MemoryReceiveChannel[Any]) -> None:
        hello_timeout = self.ctx.heartbeat_s * wire.HEARTBEAT_MISSES
        identity = self.sub.identity
        await self.framed.send(
            wire.Welcome(
                version=wire.PROTOCOL_VERSION,
                server=SERVER_SOFTWARE,
                identity=identity.name,
                heartbeat_interval=self.ctx.heartbeat_s,
            )
        )
        event: object = None
        with trio.move_on_after(hello_timeout):
            event = await self.framed.receive()
        if event is None:
            self.reason = "hello_timeout"
            return
        if isinstance(event, wire.ConnectionClosed | wire.Goodbye):  # Goodbye may come first (tests/fuzz)
            self.reason = "closed_before_hello"
            return
        # The state machine guarantees the client's first frame is ClientHello.
        self._opened(event)
        with self.sub.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, outbox)
                nursery.start_soon(self._pinger)
                nursery.start_soon(self._reader)

    def _opened(self, hello: object) -> None:
        software = getattr(hello, "software", "")
        log.info("session.opened", client_id=self.sub.name, software=software, admin=self.sub.admin)
        self.ctx.hub.add(self.sub)
        for token in self.ctx.tokens:
            if token.may_see(self.sub):
                self.sub.push(token.status_for(self.sub))

    def _finish(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.sub.cancel_scope.cancel()

    async def _writer(self, outbox: trio.MemoryReceiveChannel[Any]) -> None:
        async for msg in outbox:
            if self.reason is not None:
                # The session is ending (e.g. the reader is sending its heartbeat Goodbye): a
                # Ping queued at the same instant must not follow the Goodbye (tests/fuzz).
                return
            await self.framed.send(msg)
            self.frames_out += 1
            if isinstance(msg, wire.Goodbye):
                self._finish(msg.reason)
                return

    async def _pinger(self) -> None:
        while True:
            await trio.sleep(self.ctx.heartbeat_s)
            nonce = next(self._nonces) & 0xFFFFFFFF
            self._ping_sent = (nonce, trio.current_time())
            self.sub.push(wire.Ping(nonce=nonce))

    async def _reader(self) -> None:
        silence = self.ctx.heartbeat_s * wire.HEARTBEAT_MISSES
        while True:
            with trio.move_on_after(silence):
                event = await self.framed.receive()
                self.frames_in += 1
                if not await self._dispatch(event):
                    return
                continue
            await self._say_goodbye(CloseCode.HEARTBEAT_TIMEOUT, str(EndReason.HEARTBEAT_LOST))
            return

    async def _say_goodbye(self, code: CloseCode, reason: str) -> None:
        self.reason = reason
        with trio.move_on_after(FAREWELL_TIMEOUT_S):
            await self.framed.send(wire.Goodbye(code=code, reason=reason))
        self._finish(reason)

    async def _dispatch(self, event: object) -> bool:
        """Handle one message; False when the session is over."""
        if isinstance(event, wire.ConnectionClosed):
            self._finish("client_closed")
            return False
        if isinstance(event, wire.Goodbye):
            self._finish(f"client_goodbye: {event.reason}"[:200])
            return False
        if isinstance(event, wire.Ping):
            self.sub.push(wire.Pong(nonce=event.nonce))
        elif isinstance(event, wire.LeaseRequest | wire.LeaseRelease | wire.CcidFrame):
            await self._to_token(event)
        elif isinstance(event, wire.AdminRequest):
            self.sub.push(await self._admin(event))
        elif isinstance(event, wire.Pong) and self._ping_sent and self._ping_sent[0] == event.nonce:
            self.sub.rtt_ms = round((trio.current_time() - self._ping_sent[1]) * 1000, 1)
        elif isinstance(event, wire.ErrorMessage):
            log.warning("client.reported_error", code=event.code, error=event.message[:200])
        return True  # Pong: hearing it is all the heartbeat needs

    async def _to_token(self, msg: wire.LeaseRequest | wire.LeaseRelease | wire.CcidFrame) -> None:
        tokens = self.ctx.tokens
        if not 0 <= msg.token_id < len(tokens) or not tokens[msg.token_id].may_see(self.sub):
            self.sub.push(
                wire.ErrorMessage(
                    code="unknown_token",
                    token_id=msg.token_id,
                    message=f"no token with id {msg.token_id}",
                )
            )
            return
        token = tokens[msg.token_id]
        try:
            if isinstance(msg, wire.LeaseRequest):
                await token.request_lease(self.sub)
            elif isinstance(msg, wire.LeaseRelease):
                await token.release_lease(self.sub, msg.epoch)
            else:
                self.ccid_frames += 1
                await token.submit_frame(self.sub, msg.epoch, msg.message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.sub.push(
                wire.ErrorMessage(
                    code="shutting_down", token_id=msg.token_id, message="the server is shutting down"
                )
            )

    async def _admin(self, req: wire.AdminRequest) -> wire.AdminResponse:
        if not self.sub.admin:
            log.warning("admin.refused", action=req.action[:64])
            await audit_event(self.ctx, "admin.refused", self.sub.identity, action=req.action[:64])
            return wire.AdminResponse(
                request_id=req.request_id, ok=False, result={}, error=f"{self.sub.name!r} is not an admin"
            )
        if self.ctx.dispatcher is not None:
            ok, result, error = await self.ctx.dispatcher.handle(req.action, req.args, actor=self.sub.name)
            if req.action != "status":  # reads are not admin actions
                await audit_event(self.ctx, "admin.action", self.sub.identity, action=req.action[:64], ok=ok)
            ok, result, error = wire_result(ok, result, error)
            return wire.AdminResponse(request_id=req.request_id, ok=ok, result=result, error=error)
        if req.action == "status":
            result = {
                "tokens": {t.name: t.snapshot() for t in self.ctx.tokens},
                "sessions": len(self.ctx.hub),
            }
            return wire.AdminResponse(request_id=req.request_id, ok=True, result=result)
        return wire.AdminResponse(
            request_id=req.request_id,
            ok=False,
            result={},
            error=f"action {req.action[:64]!r} is not implemented yet",
        )


async def serve_session(
    stream: trio.abc.Stream,
    identity: Identity,
    ctx: SessionContext,
    *,
    peer: str,
    cert_serial: int | None = None,
) -> None:
    """Run one authenticated connection to its end; never raises for a misbehaving client."""
    try:
        await _serve_session(stream, identity, ctx, peer=peer, cert_serial=cert_serial)
    finally:
        await trio.aclose_forcefully(stream)  # the session owns its stream: EOF tells the client


async def _serve_session(
    stream: trio.abc.Stream, identity: Identity, ctx: SessionContext, *, peer: str, cert_serial: int | None
) -> None:
    conn_id = ctx.hub.next_conn_id()
    with structlog.contextvars.bound_contextvars(conn_id=conn_id, peer=peer, client_id=identity.name):
        admin = is_admin(identity, ctx.admins)
        if not admin and not may_use_any(identity, ctx.tokens):
            log.warning("session.refused", reason="not_allowed", names=list(identity.names))
            await audit_event(ctx, "connection.refused", identity, peer=peer, reason="not_allowed")
            await send_refusal(
                stream,
                CloseCode.NOT_AUTHORIZED,
                "not_allowed",
                f"certificate {identity.name!r} is on no token's allow list of this server; "
                "ask an operator to add it to tokens[].allow",
            )
            return
        send_channel, receive_channel = trio.open_memory_channel[Any](OUTBOX_CAPACITY)
        sub = Subscriber(conn_id, identity, send_channel, admin=admin, peer=peer, cert_serial=cert_serial)
        session = _Session(FramedConnection(stream, BridgeConnection(Role.SERVER)), sub, ctx)
        started = trio.current_time()
        reason = "closed"
        await audit_event(ctx, "connection.accepted", identity, peer=peer, conn_id=conn_id, admin=admin)
        try:
            await session.run(receive_channel)
        except Exception as exc:  # the firewall: one client never takes the server down
            reason = await _classify_failure(exc, session)
        finally:
            sub.closed = True
            reason = sub.close_reason or session.reason or reason
            drop = _END_REASONS.get(reason, EndReason.DISCONNECTED)
            for token in ctx.tokens:
                token.detach(conn_id, drop)
            ctx.hub.remove(sub)
            send_channel.close()
            log.info(
                "session.closed",
                reason=reason,
                duration_ms=round((trio.current_time() - started) * 1000),
                frames_in=session.frames_in,
                frames_out=session.frames_out,
                ccid_frames=session.ccid_frames,
            )
            await audit_event(ctx, "connection.closed", identity, conn_id=conn_id, reason=reason)


# How a session's close reason ends its lease (anything else: disconnected).
_END_REASONS: Final = {
    str(EndReason.HEARTBEAT_LOST): EndReason.HEARTBEAT_LOST,
    REVOKED_REASON: EndReason.REVOKED,  # S3: the certificate was revoked while connected
}


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _classify_failure(exc: Exception, session: _Session) -> str:
    """The close reason for an exception out of a session (flattening the nursery's groups)."""
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
    remote = next((e for e in leaves if isinstance(e, RemoteProtocolError)), None)
    if remote is not None:
        log.warning("session.protocol_error", error=str(remote), close_code=remote.close_code.name)
        with trio.move_on_after(FAREWELL_TIMEOUT_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await session.framed.send(wire.Goodbye(code=remote.close_code, reason=str(remote)[:200]))
        return "protocol_error"
    if leaves and all(isinstance(e, trio.BrokenResourceError | trio.ClosedResourceError) for e in leaves):
        return "connection_lost"
    log.error("session.crashed", exc_info=exc)
    return "crashed"
