"""The client's tunnel to tokenbridge-server.

Theory of operation
-------------------
`Tunnel.run` keeps one TLS 1.3 connection to the server for the life of the daemon. Each
attempt: TCP connect, TLS handshake (our client certificate; the server's certificate and
name are verified against the deployment CA before any frame is read), then the server's
first frame says Welcome or Refused. After Welcome we send ClientHello and the connection is
open. A failed attempt is logged with its reason in operator words and retried forever after
a capped, jittered exponential backoff.

While open, one receive loop owns the connection: it updates the token table from
TokenStatus frames and completes the one pending operation a reader may have per token (a
lease request, or one CCID exchange: vpcd is synchronous per slot, so there is never more
than one). A heartbeat task sends Ping every interval the server gave us; the receive loop
drops the connection (best-effort Goodbye) when nothing at all was heard for exactly three
intervals (docs/protocol.md §6).

When the connection ends, every pending operation fails with TunnelDown, every lease is
forgotten and tokens are marked absent, so the vpcd links remove their cards: a dropped
tunnel mid-APDU becomes a reader error on the build VM, never an invented status word.

Readers wait for changes with `wait_changed()` (an Event swapped on every change).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from bridge_client.backoff import Backoff
from bridge_client.errors import CardFailure, LeaseError, TunnelDown, TunnelRefused
from bridge_client.speculation import PrefetchedChain, SpeculationCache
from bridge_client.tunnel_state import Pending, TokenState, TunnelStatus
from protocol import ccid
from protocol.connection import ConnectionClosed
from protocol.errors import CloseCode, RemoteProtocolError
from protocol.runtime.address import Address
from protocol.runtime.connect import ConnectFailed, ConnectRefused, connect, describe_connect_error
from protocol.runtime.framed import FramedConnection
from protocol.speculation import Step
from protocol.wire import (
    CcidFrame,
    ErrorMessage,
    Goodbye,
    LeaseEnded,
    LeaseExchange,
    LeaseGranted,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    Ping,
    Pong,
    Prefetched,
    SpeculationPaths,
    TokenStatus,
    Welcome,
)

log = structlog.get_logger(__name__)

SOFTWARE = "tokenbridge-client/0.1.0"
# Lease endings the client caused itself (docs/protocol.md §5.3; the server's reasons are
# bridge_server.tokens.leases.EndReason). Any other ending (idle_timeout, max_hold, revoked,
# token_gone, device_error, shutdown, ...) means the server powered the card off under the
# application's feet: its login state is gone, so the reader must show a removal.
NORMAL_LEASE_ENDINGS = frozenset({"released", "linger_expired"})
MISSED_HEARTBEATS = 3
GOODBYE_TIMEOUT_S = 1.0
_SEND_FAILED = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)
_DOWN = (TunnelDown, RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)
# ErrorMessage codes that answer a CCID frame; they must not fail a pending lease request.
_FRAME_ERRORS = frozenset({"lease_required", "stale_epoch", "bad_ccid", "pin_guard", "command_refused"})


class _HeartbeatLost(TunnelDown):
    """Nothing heard from the server for MISSED_HEARTBEATS intervals."""


@dataclass
class Tunnel:
    """Keeps the connection to the server and serves the local readers."""

    host: str
    port: int
    server_name: str
    ssl_context: ssl.SSLContext
    token_names: list[str]
    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout_s: float = 10.0
    # How the TCP connection is opened; tests pass a memory-stream factory.
    open_stream: Callable[[str, int], Awaitable[trio.abc.Stream]] = trio.open_tcp_stream

    def __post_init__(self) -> None:
        self.tokens: dict[str, TokenState] = {n: TokenState(n) for n in self.token_names}
        self.status = TunnelStatus()
        self._changed = trio.Event()
        self._conn: FramedConnection | None = None
        self._leases: dict[int, Pending] = {}
        self._exchanges: dict[int, Pending] = {}
        self._seq: dict[int, int] = {}
        self._ping_sent: dict[int, float] = {}
        self._nonce = 0
        # Issue 17: taught paths and the prefetched GET RESPONSE chain, per token name.
        self.speculation = {n: SpeculationCache() for n in self.token_names}
        self.prefetched = {n: PrefetchedChain() for n in self.token_names}

    # -- state shared with readers -------------------------------------------------------
    async def wait_changed(self) -> None:
        """Return at the next change of tunnel or token state."""
        await self._changed.wait()

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _by_id(self, token_id: int) -> TokenState | None:
        for tok in self.tokens.values():
            if tok.token_id == token_id:
                return tok
        return None

    # -- the connection loop ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect forever."""
        task_status.started()
        while True:
            self.status.state = "connecting"
            self.status.attempts += 1
            self._notify()
            try:
                await self._connect_and_serve()
                reason = "connection closed by server"
            except TunnelRefused as exc:
                reason = str(exc)
                self.status.state = "refused"
            except ConnectFailed as exc:
                reason = str(exc)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                reason = describe_connect_error(exc, self.address)
            except RemoteProtocolError as exc:
                reason = f"protocol error from server: {exc}"
            except TunnelDown as exc:
                reason = str(exc)
            delay = self.backoff.next_delay()
            if self.status.state != "refused":
                self.status.state = "retrying"
            self.status.reason = reason
            self._notify()
            log.warning(
                "tunnel.disconnected",
                peer=str(self.address),
                reason=reason,
                retry_in_s=round(delay, 2),
            )
            await trio.sleep(delay)

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    async def _connect_and_serve(self) -> None:
        with trio.fail_after(self.connect_timeout_s):
            try:
                greeted = await connect(
                    self.address,
                    self.ssl_context,
                    server_name=self.server_name,
                    software=SOFTWARE,
                    open_stream=self.open_stream,
                )
            except ConnectRefused as exc:
                raise TunnelRefused(exc.code, exc.message) from exc
        try:
            await self._serve(greeted.conn, greeted.welcome)
        finally:
            self._teardown()
            await greeted.aclose()

    async def _serve(self, conn: FramedConnection, first: Welcome) -> None:
        self._conn = conn
        self.backoff.reset()
        self.status.state, self.status.reason = "connected", ""
        self.status.server, self.status.identity = first.server, first.identity
        self.status.connected_since = time.time()
        self.status.connects += 1
        self._notify()
        log.info("tunnel.connected", peer=str(self.address), server=first.server, client_id=first.identity)
        interval = max(0.05, first.heartbeat_interval)
        # Errors are caught inside the nursery body: trio's strict exception groups would
        # otherwise wrap them and `run` could not tell a dropped tunnel from a bug.
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat, conn, interval)
            try:
                await self._receive_loop(conn, interval)
            except _DOWN as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if isinstance(error, _HeartbeatLost):
            # Only now, with the pinger stopped: nothing may follow a Goodbye on the wire.
            with trio.move_on_after(GOODBYE_TIMEOUT_S), contextlib.suppress(*_SEND_FAILED):
                await conn.send(Goodbye(code=CloseCode.HEARTBEAT_TIMEOUT, reason="heartbeat_lost"))
        if error is not None:
            raise error

    def _teardown(self) -> None:
        self._conn = None
        self.status.connected_since = None
        down = TunnelDown("tunnel to the server is down")
        for pending in [*self._leases.values(), *self._exchanges.values()]:
            pending.fail(down)
        self._leases.clear()
        self._exchanges.clear()
        for tok in self.tokens.values():
            if tok.epoch is not None:
                tok.lost_generation += 1
            tok.epoch = tok.token_id = tok.queue_position = tok.lease_since = None
            tok.present = False
            self._lease_over(tok.name)
            self.speculation[tok.name].teach(())  # a new connection is taught afresh
        self._notify()

    async def _heartbeat(self, conn: FramedConnection, interval: float) -> None:
        """Ping every interval; a broken send is left to the receive loop to notice."""
        while True:
            await trio.sleep(interval)
            self._nonce = (self._nonce + 1) % 2**64
            self._ping_sent = {self._nonce: trio.current_time()}
            try:
                await conn.send(Ping(nonce=self._nonce))
            except _SEND_FAILED:
                return

    async def _receive_loop(self, conn: FramedConnection, interval: float) -> None:
        silence = MISSED_HEARTBEATS * interval
        while True:
            msg: object = None
            with trio.move_on_after(silence):
                msg = await conn.receive()
            if msg is None:
                log.warning("tunnel.heartbeat_lost", peer=str(self.address), silent_s=silence)
                raise _HeartbeatLost(
                    f"heartbeat lost: nothing heard from the server for {silence:g} s "
                    f"({MISSED_HEARTBEATS} heartbeat intervals); network or server stalled"
                )
            if isinstance(msg, ConnectionClosed):
                return
            if isinstance(msg, Goodbye):
                log.info("tunnel.goodbye", code=int(msg.code), reason=msg.reason)
                return
            # P5: a Pong or LeaseRelease to a server that stopped reading would block this loop
            # outside its silence deadline; the same bound applies to what it sends.
            with trio.move_on_after(silence) as stalled:
                await self._dispatch(conn, msg)
            if stalled.cancelled_caught:
                log.warning("tunnel.heartbeat_lost", peer=str(self.address), silent_s=silence)
                raise _HeartbeatLost(
                    f"heartbeat lost: the server took nothing we sent for {silence:g} s "
                    f"({MISSED_HEARTBEATS} heartbeat intervals); network or server stalled"
                )

    async def _dispatch(self, conn: FramedConnection, msg: object) -> None:
        if isinstance(msg, Ping):
            await conn.send(Pong(nonce=msg.nonce))
        elif isinstance(msg, Pong):
            sent = self._ping_sent.pop(msg.nonce, None)
            if sent is not None:
                self.status.rtt_ms = round((trio.current_time() - sent) * 1000, 3)
        elif isinstance(msg, TokenStatus):
            self._on_token_status(msg)
        elif isinstance(msg, LeaseQueued):
            tok = self._by_id(msg.token_id)
            if tok is not None:
                tok.queue_position = msg.position
                log.info("lease.queued", token=tok.name, position=msg.position)
        elif isinstance(msg, LeaseGranted):
            if not self._on_granted(msg):
                # Nobody waits any more (the reader gave up queueing): hand it straight back
                # rather than sit on it until the server's idle timeout.
                log.info("lease.returned_unused", token_id=msg.token_id, lease_epoch=msg.epoch)
                await conn.send(LeaseRelease(token_id=msg.token_id, epoch=msg.epoch))
        elif isinstance(msg, LeaseEnded):
            self._on_lease_ended(msg)
        elif isinstance(msg, SpeculationPaths | Prefetched):
            self._on_speculation(msg)
        elif isinstance(msg, CcidFrame):
            pending = self._exchanges.pop(msg.token_id, None)
            if pending is not None:
                pending.resolve(msg)
        elif isinstance(msg, ErrorMessage):
            self._on_error(msg)

    def _on_speculation(self, msg: SpeculationPaths | Prefetched) -> None:
        tok = self._by_id(msg.token_id)
        if tok is None:
            return
        if isinstance(msg, SpeculationPaths):
            self.speculation[tok.name].teach(msg.paths)
            log.info("speculation.taught", token=tok.name, paths=len(msg.paths))
            self._notify()
        elif tok.epoch == msg.epoch:  # the chain that follows the next CCID answer of this lease
            self.prefetched[tok.name].load(msg.steps)

    def _lease_over(self, name: str) -> None:
        """No lease any more: the next APDU meets a freshly reset card (issue 17)."""
        self.prefetched[name].clear()
        self.speculation[name].restart()

    def _on_token_status(self, msg: TokenStatus) -> None:
        tok = self.tokens.get(msg.name)
        if tok is None:
            return  # a token no reader of ours is configured for
        was_usable = tok.usable
        tok.token_id, tok.present, tok.allowed = msg.token_id, msg.present, msg.allowed
        tok.server_state = msg.state
        if msg.atr:
            tok.atr = bytes(msg.atr)
        if not (msg.present and msg.allowed):
            if tok.epoch is not None:
                tok.epoch = tok.lease_since = None
                tok.lost_generation += 1
                self._lease_over(tok.name)
            # Nothing more will answer a request for an absent or forbidden token.
            gone = LeaseError(msg.state or "token_absent", "the token is no longer usable")
            self._fail_pending(msg.token_id, gone)
        if was_usable != tok.usable:
            log.info("token.changed", token=tok.name, present=msg.present, allowed=msg.allowed)
        self._notify()

    def _on_granted(self, msg: LeaseGranted) -> bool:
        """Record a grant; False when no reader wants it any more."""
        tok = self._by_id(msg.token_id)
        pending = self._leases.pop(msg.token_id, None)
        if tok is None or pending is None:
            return False
        tok.epoch, tok.queue_position, tok.lease_since = msg.epoch, None, time.time()
        if msg.atr:
            tok.atr = bytes(msg.atr)
        log.info("lease.granted", token=tok.name, lease_epoch=msg.epoch)
        pending.resolve(msg.epoch)
        self._notify()
        return True

    def _on_lease_ended(self, msg: LeaseEnded) -> None:
        tok = self._by_id(msg.token_id)
        if tok is None or tok.epoch != msg.epoch:
            return
        tok.epoch = tok.lease_since = None
        self._lease_over(tok.name)
        if msg.reason not in NORMAL_LEASE_ENDINGS:
            tok.lost_generation += 1
        pending = self._exchanges.pop(msg.token_id, None)
        if pending is not None:
            pending.fail(LeaseError(msg.reason, "the lease ended during an exchange"))
        log.info("lease.ended", token=tok.name, lease_epoch=msg.epoch, reason=msg.reason)
        self._notify()

    def _on_error(self, msg: ErrorMessage) -> None:
        log.warning("server.error", code=msg.code, message=msg.message, token_id=msg.token_id)
        if msg.token_id is None:
            return
        error = LeaseError(msg.code, msg.message)
        if msg.code in _FRAME_ERRORS:  # about a CCID frame (maybe a late one): not our lease request
            if msg.token_id in self._leases:
                # A LeaseExchange not granted yet: its command has not run, so this error is
                # about a frame of the lease that just ended (sent before it, answered before it).
                return
            pending = self._exchanges.pop(msg.token_id, None)
            if pending is not None:
                pending.fail(error)
            return
        if msg.code == "already_leased" and msg.token_id in self._leases:
            return  # we are queued (or the grant is on its way): keep waiting for LeaseGranted
        self._fail_pending(msg.token_id, error)

    def _fail_pending(self, token_id: int, error: BaseException) -> None:
        for table in (self._leases, self._exchanges):
            pending = table.pop(token_id, None)
            if pending is not None:
                pending.fail(error)

    # -- operations for readers --------------------------------------------------------------
    def _require(self, name: str) -> tuple[FramedConnection, TokenState, int]:
        conn, tok = self._conn, self.tokens[name]
        if conn is None or tok.token_id is None:
            raise TunnelDown("tunnel to the server is down")
        return conn, tok, tok.token_id

    async def acquire_lease(self, name: str) -> int:
        """Return our lease epoch for token `name`, queueing for it if needed.

        Callers bound the wait with `trio.fail_after(queue_timeout)`.
        """
        conn, tok, token_id = self._require(name)
        if tok.epoch is not None:
            return tok.epoch
        pending = self._leases.get(token_id)
        if pending is None:
            pending = self._leases[token_id] = Pending()
            await conn.send(LeaseRequest(token_id=token_id))
            log.info("lease.requested", token=name)
        try:
            epoch = await pending.wait()
        except trio.Cancelled:
            # The caller stopped waiting (queue deadline): forget the request so that a late
            # grant is given back at once (see _dispatch).
            if self._leases.get(token_id) is pending:
                del self._leases[token_id]
            raise
        assert isinstance(epoch, int)
        return epoch

    async def release_lease(self, name: str) -> None:
        """Give the lease back now (best effort)."""
        conn, tok, token_id = self._require(name)
        if tok.epoch is not None:
            await conn.send(LeaseRelease(token_id=token_id, epoch=tok.epoch))

    def next_seq(self, token_id: int) -> int:
        seq = self._seq.get(token_id, 0)
        self._seq[token_id] = (seq + 1) % 256
        return seq

    async def lease_exchange(self, name: str, deferred: tuple[Step, ...], build: object) -> ccid.CcidMessage:
        """Request the lease and send one CCID command in one message (`LeaseExchange`, issue 17).

        The server replays `deferred` (steps already answered from a taught path) on the card
        before the command, and ends the lease as `card_changed` on any difference, which fails
        this call with LeaseError. Callers bound the wait (queue) with `trio.fail_after`.
        """
        conn, tok, token_id = self._require(name)
        if tok.epoch is not None or token_id in self._leases or token_id in self._exchanges:
            raise CardFailure(f"a lease request or exchange with {name} is already under way")
        seq = self.next_seq(token_id)
        command = build(seq)  # type: ignore[operator]
        lease = self._leases[token_id] = Pending()
        pending = self._exchanges[token_id] = Pending()
        try:
            await conn.send(LeaseExchange(token_id=token_id, deferred=deferred, message=command.encode()))
            log.info("lease.requested", token=name, deferred=len(deferred))
            await lease.wait()
            frame = await pending.wait()
        finally:
            # Cancelled (queue deadline, reader gone): a late grant is handed back (see _dispatch)
            for table, mine in ((self._leases, lease), (self._exchanges, pending)):
                if table.get(token_id) is mine:
                    del table[token_id]
        return _checked(frame, seq)

    async def exchange(self, name: str, build: object) -> ccid.CcidMessage:
        """Send one CCID command under our lease and return the server's CCID response.

        `build` is a callable taking the bSeq and returning the CcidMessage to send.
        Raises TunnelDown, LeaseError (lease lost) or CardFailure (reader-level failure).
        """
        conn, tok, token_id = self._require(name)
        if tok.epoch is None:
            raise LeaseError("lease_required", "no lease held for this token")
        if token_id in self._exchanges:
            raise CardFailure(f"an exchange with {name} is already in flight")
        seq = self.next_seq(token_id)
        command = build(seq)  # type: ignore[operator]
        pending = self._exchanges[token_id] = Pending()
        try:
            await conn.send(CcidFrame(token_id=token_id, epoch=tok.epoch, message=command.encode()))
            frame = await pending.wait()
        finally:
            # Cancelled (the reader went away): forget it, or the next exchange would be
            # refused as "already in flight" until the tunnel reconnects.
            if self._exchanges.get(token_id) is pending:
                del self._exchanges[token_id]
        return _checked(frame, seq)


def _checked(frame: object, seq: int) -> ccid.CcidMessage:
    """The server's CCID answer to our command `seq`, or CardFailure."""
    assert isinstance(frame, CcidFrame)
    try:
        response = ccid.decode_message(frame.message)
    except RemoteProtocolError as exc:
        raise CardFailure(f"malformed CCID response from server: {exc}") from exc
    if response.seq != seq:
        raise CardFailure(f"CCID response bSeq {response.seq} does not match command bSeq {seq}")
    if response.command_status != ccid.CommandStatus.OK:
        raise CardFailure(f"reader error from server: bError 0x{response.error:02X}")
    return response
