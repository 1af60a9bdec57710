"""One client connection, after its TLS handshake (DESIGN §3, style-anchors §3.4).

Theory of operation
-------------------
`serve_session` is a firewall: it catches the failures a connection is expected to have (the
peer breaks the protocol, the socket dies, the greeting never comes) and logs exactly one
`session.closed` line with the reason and counters; only a bug escapes as `session.crashed`.

The greeting (docs/protocol.md §4): we speak first, `Welcome` or `Refused` (an identity on no
token's allow list and not an admin is refused before it sees anything); the client answers
`ClientHello`; only then do we register the session with the hub and send a `TokenStatus` per
token it may see. Three tasks share the connection:

- the writer is the only task that writes, from the `Welcome` to the last `Goodbye`: it
  drains the session's bounded outbox, into which everyone (token tasks, the reader, the
  pinger) `push()`es without waiting. A full outbox means the client is not reading: the
  session ends (`slow_client`) instead of making anyone wait. A task that decides the session
  is over (heartbeat lost, protocol error) calls the sync `_say_goodbye`: the writer finishes
  the frame it is sending, drops what is queued and sends that `Goodbye` (bounded by
  `FAREWELL_TIMEOUT_S`), so no frame is ever written by two tasks or cut in half;
- the reader (first the greeting, then the session) dispatches the client's messages to the
  token managers; silence for `HEARTBEAT_MISSES` heartbeat intervals ends the session
  (`heartbeat_lost`);
- the pinger pushes a `Ping` every heartbeat interval.

Whatever ends the session, its `finally` detaches it from every token (sync, so it cannot be
lost or blocked): its lease ends and its queue slots go.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Final

import structlog
import trio

from bridge_server import SERVER_SOFTWARE
from bridge_server.net.admin import wire_result
from bridge_server.net.hub import Identity, Subscriber
from bridge_server.net.reload import REVOKED_REASON
from bridge_server.net.session_context import SessionContext, audit_event, is_admin, may_use_any
from bridge_server.tokens.leases import EndReason
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode, LocalProtocolError, RemoteProtocolError
from protocol.runtime.framed import FramedConnection
from protocol.vocabulary import ErrorCode, RefusalReason

# SessionContext and its helpers live in session_context.py; re-exported for existing importers.
__all__ = [
    "FAREWELL_TIMEOUT_S",
    "OUTBOX_CAPACITY",
    "SERVER_SOFTWARE",
    "SessionContext",
    "audit_event",
    "is_admin",
    "may_use_any",
    "send_refusal",
    "serve_session",
]

log = structlog.get_logger(__name__)

OUTBOX_CAPACITY: Final = 64
FAREWELL_TIMEOUT_S: Final = 1.0


async def send_refusal(stream: trio.abc.Stream, code: CloseCode, reason: RefusalReason, message: str) -> None:
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
        self._farewell: wire.Goodbye | None = None  # set by _say_goodbye, sent by the writer
        self._writer_waiting = trio.CancelScope()  # the writer's wait for its outbox
        self._welcome_sent = trio.Event()  # we speak first: nothing is read before Welcome is out

    async def run(self, outbox: trio.MemoryReceiveChannel[wire.Message]) -> None:
        with self.sub.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, outbox)  # from here on, the only task that writes
                self.sub.push(
                    wire.Welcome(
                        version=wire.PROTOCOL_VERSION,
                        server=SERVER_SOFTWARE,
                        identity=self.sub.identity.name,
                        heartbeat_interval=self.ctx.heartbeat_s,
                    )
                )
                hello = await self._greeting()
                if hello is None:
                    return  # _greeting has ended the session (or asked the writer for a Goodbye)
                self._opened(hello)
                nursery.start_soon(self._pinger)
                nursery.start_soon(self._reader)

    async def _greeting(self) -> wire.Message | None:
        """The client's first frame (the state machine allows only ClientHello), or None."""
        await self._welcome_sent.wait()  # our state machine must be OPEN before ClientHello arrives
        event: wire.Message | wire.ConnectionClosed | None = None
        with trio.move_on_after(self.ctx.heartbeat_s * wire.HEARTBEAT_MISSES):
            event = await self._receive()
        if self.reason is not None:  # a protocol error: the writer says goodbye
            return None
        if event is None:
            self._finish("hello_timeout")
            return None
        if isinstance(event, wire.ConnectionClosed | wire.Goodbye):  # Goodbye may come first (tests/fuzz)
            self._finish("closed_before_hello")
            return None
        return event

    def _opened(self, hello: object) -> None:
        software = getattr(hello, "software", "")
        log.info("session.opened", client_id=self.sub.name, software=software, admin=self.sub.admin)
        self.ctx.hub.add(self.sub)
        for token in self.ctx.tokens:
            if token.may_see(self.sub):
                self.sub.push(token.status_for(self.sub))
                paths = token.speculation_for(self.sub)  # issue 17: what it learnt before we came
                if paths is not None:
                    self.sub.push(paths)

    def _finish(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.sub.cancel_scope.cancel()

    async def _writer(self, outbox: trio.MemoryReceiveChannel[wire.Message]) -> None:
        """The only task that writes: the outbox in order, or the farewell once one is asked for."""
        while self._farewell is None:
            with trio.CancelScope() as self._writer_waiting:
                msg = await outbox.receive()
            if self._farewell is not None or self.reason is not None:
                # The session is ending (e.g. the reader asked for its heartbeat Goodbye): a
                # Ping queued at the same instant must not follow the Goodbye (tests/fuzz).
                break
            try:
                await self.framed.send(msg)
            except LocalProtocolError:
                if self._farewell is None:
                    raise  # a bug: we built an illegal message
                break  # the client broke the protocol while we waited for the send lock
            self.frames_out += 1
            if isinstance(msg, wire.Welcome):
                self._welcome_sent.set()
            elif isinstance(msg, wire.Goodbye):
                self._finish(msg.reason)
                return
        if self._farewell is not None:
            await self._send_farewell(self._farewell)

    async def _send_farewell(self, goodbye: wire.Goodbye) -> None:
        with trio.move_on_after(FAREWELL_TIMEOUT_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.framed.send(goodbye)
                self.frames_out += 1
        self._finish(goodbye.reason)

    def _say_goodbye(self, code: CloseCode, text: str, *, reason: str) -> None:
        """Ask the writer to send `Goodbye` next, and nothing after it; the session then ends.

        Sync: whoever decides the session is over (the reader) never writes itself. The writer
        finishes the frame it may be sending, skips its queued messages and sends the Goodbye;
        the whole farewell is bounded by `FAREWELL_TIMEOUT_S`.
        """
        if self.reason is None:
            self.reason = reason
        if self._farewell is None:
            self._farewell = wire.Goodbye(code=code, reason=text)
        self._writer_waiting.cancel()
        scope = self.sub.cancel_scope
        scope.deadline = min(scope.deadline, trio.current_time() + FAREWELL_TIMEOUT_S)

    async def _receive(self) -> wire.Message | wire.ConnectionClosed | None:
        """The next event from the client, or None after a protocol error (Goodbye asked for)."""
        try:
            return await self.framed.receive()
        except RemoteProtocolError as remote:
            log.warning("session.protocol_error", error=str(remote), close_code=remote.close_code.name)
            self._say_goodbye(remote.close_code, str(remote)[:200], reason="protocol_error")
            return None

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
                event = await self._receive()
                if event is None:
                    return  # a protocol error: the writer says goodbye
                self.frames_in += 1
                if not await self._dispatch(event):
                    return
                continue
            lost = str(EndReason.HEARTBEAT_LOST)
            self._say_goodbye(CloseCode.HEARTBEAT_TIMEOUT, lost, reason=lost)
            return

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
        elif isinstance(event, wire.LeaseRequest | wire.LeaseExchange | wire.LeaseRelease | wire.CcidFrame):
            await self._to_token(event)
        elif isinstance(event, wire.AdminRequest):
            self.sub.push(await self._admin(event))
        elif isinstance(event, wire.Pong) and self._ping_sent and self._ping_sent[0] == event.nonce:
            self.sub.rtt_ms = round((trio.current_time() - self._ping_sent[1]) * 1000, 1)
        elif isinstance(event, wire.ErrorMessage):
            log.warning("client.reported_error", code=event.code, error=event.message[:200])
        return True  # Pong: hearing it is all the heartbeat needs

    async def _to_token(
        self, msg: wire.LeaseRequest | wire.LeaseExchange | wire.LeaseRelease | wire.CcidFrame
    ) -> None:
        tokens = self.ctx.tokens
        if not 0 <= msg.token_id < len(tokens) or not tokens[msg.token_id].may_see(self.sub):
            self.sub.push(
                wire.ErrorMessage(
                    code=ErrorCode.UNKNOWN_TOKEN,
                    token_id=msg.token_id,
                    message=f"no token with id {msg.token_id}",
                )
            )
            return
        token = tokens[msg.token_id]
        try:
            if isinstance(msg, wire.LeaseRequest):
                await token.request_lease(self.sub)
            elif isinstance(msg, wire.LeaseExchange):
                self.ccid_frames += 1
                await token.request_lease(self.sub, msg)
            elif isinstance(msg, wire.LeaseRelease):
                await token.release_lease(self.sub, msg.epoch)
            else:
                self.ccid_frames += 1
                await token.submit_frame(self.sub, msg.epoch, msg.message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.sub.push(
                wire.ErrorMessage(
                    code=ErrorCode.SHUTTING_DOWN,
                    token_id=msg.token_id,
                    message="the server is shutting down",
                )
            )

    async def _admin(self, req: wire.AdminRequest) -> wire.AdminResponse:
        if not self.sub.admin:
            log.warning("admin.refused", action=req.action[:64])
            await audit_event(self.ctx, "admin.refused", self.sub.identity, action=req.action[:64])
            return wire.AdminResponse(
                request_id=req.request_id, ok=False, result={}, error=f"{self.sub.name!r} is not an admin"
            )
        ok, result, error = await self.ctx.dispatcher.handle(req.action, req.args, actor=self.sub.name)
        if req.action != "status":  # reads are not admin actions
            await audit_event(self.ctx, "admin.action", self.sub.identity, action=req.action[:64], ok=ok)
        ok, result, error = wire_result(ok, result, error)
        return wire.AdminResponse(request_id=req.request_id, ok=ok, result=result, error=error)


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
            refusal = RefusalReason.NOT_ALLOWED
            log.warning("session.refused", reason=str(refusal), names=list(identity.names))
            await audit_event(ctx, "connection.refused", identity, peer=peer, reason=str(refusal))
            await send_refusal(
                stream,
                CloseCode.NOT_AUTHORIZED,
                refusal,
                f"certificate {identity.name!r} is on no token's allow list of this server; "
                "ask an operator to add it to tokens[].allow",
            )
            return
        send_channel, receive_channel = trio.open_memory_channel[wire.Message](OUTBOX_CAPACITY)
        sub = Subscriber(conn_id, identity, send_channel, admin=admin, peer=peer, cert_serial=cert_serial)
        session = _Session(FramedConnection(stream, BridgeConnection(Role.SERVER)), sub, ctx)
        started = trio.current_time()
        reason = "closed"
        await audit_event(ctx, "connection.accepted", identity, peer=peer, conn_id=conn_id, admin=admin)
        try:
            await session.run(receive_channel)
        except Exception as exc:  # the firewall: one client never takes the server down
            reason = _classify_failure(exc)
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


def _classify_failure(exc: Exception) -> str:
    """The close reason for an exception out of a session (flattening the nursery's groups).

    Nothing is written here: a protocol error the reader sees is answered by the writer
    (`_Session._say_goodbye`); one that still escapes is only logged.
    """
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
    remote = next((e for e in leaves if isinstance(e, RemoteProtocolError)), None)
    if remote is not None:
        log.warning("session.protocol_error", error=str(remote), close_code=remote.close_code.name)
        return "protocol_error"
    if leaves and all(isinstance(e, trio.BrokenResourceError | trio.ClosedResourceError) for e in leaves):
        return "connection_lost"
    log.error("session.crashed", exc_info=exc)
    return "crashed"
