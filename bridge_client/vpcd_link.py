"""One local vpcd reader slot showing one remote token.

Theory of operation
-------------------
vpcd (vsmartcard's pcscd driver) listens on 127.0.0.1:35963+n; a card is "inserted" while a
card side is connected to that port and answers get-ATR with a non-empty ATR, and "removed"
when that connection closes (protocol-reference §2.4). We therefore hold the connection
exactly while the card is usable: the tunnel is up, the server reports the token present,
and this client is allowed to use it. Anything else closes it and pcscd sees a removal.

vpcd's messages and our answers:
* get-ATR (04, pcscd polls it a few times a second): answered locally from the ATR the
  server reported; never forwarded, never empty.
* power on (01) / reset (02): no reply. Without a lease nothing happens (pcscd powers a new
  card up just to read its ATR). Under a lease we forward IccPowerOn: the server cold-resets
  the card, so a reset on the VM is a reset on the token.
* power off (00): no reply. Under a lease we forward IccPowerOff; the server releases the
  lease after its linger unless the card is used again.
* an APDU: without a lease, first the taught paths (bridge_client/speculation.py, issue 17):
  an APDU on a path is answered from it and deferred; the first one off the path goes out as
  `LeaseExchange` (lease request + deferred steps + this XfrBlock in one message, waiting in
  the server's queue, bounded by queue_timeout_s). Deferred steps left when the application
  pauses for `flush_after_s` or sends a power event go out the same way, so the card sees
  every APDU. Under a lease, a GET RESPONSE the server already ran is answered from that
  chain; anything else is one XfrBlock. Any failure (tunnel down, lease lost, a replay that
  found the card changed, reader error) closes the vpcd connection: pcscd reports a reader
  error and the card removed; we never invent a status word.

A lease that ends for any reason but our own release/linger also closes the connection, so
an application that believed it was logged in sees the card go away instead of a silently
reset card.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from bridge_client.backoff import Backoff
from bridge_client.errors import CardFailure, LeaseError, TunnelError
from bridge_client.speculation import SpeculationCache
from bridge_client.tunnel import Tunnel
from bridge_client.tunnel_state import TokenState
from protocol import NEED_DATA, ccid
from protocol.apdu import redact
from protocol.errors import RemoteProtocolError
from protocol.runtime.address import Address
from protocol.runtime.connect import connect_error_cause
from protocol.runtime.logging import RepeatLimiter, debug_enabled
from protocol.runtime.metrics import WAIT_BUCKETS_S, DurationHistogram
from protocol.vpcd import DEFAULT_PORT, MAX_ATR_LENGTH, Apdu, Closed, Control, VpcdCardSide, VpcdControl

log = structlog.get_logger(__name__)

RECEIVE_SIZE = 65536 + 2
VPCD_REPLY_TIMEOUT_S = 10.0  # pcscd takes a reply at once; this long means it is stuck


@dataclass
class ReaderStatus:
    state: str = "waiting"  # waiting, connecting, inserted, vpcd_unreachable
    reason: str = "waiting for the token"
    apdus: int = 0
    local_answers: int = 0  # APDUs answered from a taught path or a prefetched chain (issue 17)
    inserted_since: float | None = None
    # Lease request to grant, as this reader waited (for /metrics; the server has its own).
    lease_wait: DurationHistogram = field(default_factory=lambda: DurationHistogram(WAIT_BUCKETS_S))


@dataclass
class VpcdLink:
    """Shows token `token` as a card in the vpcd slot at host:port."""

    tunnel: Tunnel
    token: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    queue_timeout_s: float = 900.0
    # Deferred (speculatively answered) APDUs go to the card after this pause at the latest.
    flush_after_s: float = 0.5
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.25, max_s=5.0))
    # How the vpcd connection is opened; tests pass a memory-stream factory.
    open_stream: Callable[[str, int], Awaitable[trio.abc.Stream]] = trio.open_tcp_stream
    # `vpcd.unreachable` is logged the first time, then once per this many seconds at most
    # (with `repeated=N`): a vpcd that stays down must not fill the journal.
    unreachable_log_interval_s: float = 60.0

    def __post_init__(self) -> None:
        self.status = ReaderStatus()
        self._repeats = RepeatLimiter(self.unreachable_log_interval_s, clock=trio.current_time)
        self._flush_at = 0.0  # deferred APDUs go to the card at this trio time at the latest

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def _tok(self) -> TokenState:
        return self.tunnel.tokens[self.token]

    def _usable(self) -> bool:
        return self.tunnel.connected and self._tok.usable

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            while not self._usable():
                self.status.state, self.status.reason = "waiting", self._why_unusable()
                await self.tunnel.wait_changed()
            try:
                stream = await self.open_stream(self.host, self.port)
            except OSError as exc:
                delay = self.backoff.next_delay()
                self.status.state = "vpcd_unreachable"
                cause = connect_error_cause(exc)
                why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
                self.status.reason = (
                    f"cannot connect to vpcd at {self.address}: {why} (is pcscd running "
                    "with vsmartcard-vpcd, and is this the slot's port?)"
                )
                repeated = self._repeats.check("vpcd.unreachable")
                if repeated is not None:
                    log.warning(
                        "vpcd.unreachable",
                        token=self.token,
                        port=self.port,
                        reason=self.status.reason,
                        retry_in_s=round(delay, 2),
                        repeated=repeated,
                    )
                await trio.sleep(delay)
                continue
            if (repeated := self._repeats.clear("vpcd.unreachable")) is not None:
                log.info("vpcd.reachable", token=self.token, port=self.port, repeated=repeated)
            self.backoff.reset()
            try:
                await self._serve(stream)
            finally:
                await trio.aclose_forcefully(stream)
                self.status.inserted_since = None

    def _why_unusable(self) -> str:
        tok = self._tok
        if not self.tunnel.connected:
            return f"tunnel down: {self.tunnel.status.reason or 'connecting'}"
        if tok.token_id is None:
            return (
                f"the server offers no token named {self.token!r} to this client (check the name, "
                "and that this client is on the token's allow list)"
            )
        if not tok.present:
            return "token absent on the server"
        if not tok.allowed:
            return "this client is not allowed to use the token"
        return "token has no ATR yet"

    async def _serve(self, stream: trio.abc.Stream) -> None:
        generation = self._tok.lost_generation
        self.status.state, self.status.reason = "inserted", ""
        self.status.inserted_since = trio.current_time()
        log.info("reader.inserted", token=self.token, port=self.port)
        reason = "vpcd closed the connection"
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal reason
                while self._usable() and self._tok.lost_generation == generation:
                    await self.tunnel.wait_changed()
                reason = self._why_unusable() if not self._usable() else "lease lost"
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await self._vpcd_loop(stream)
            except (TunnelError, trio.TooSlowError) as exc:
                reason = (
                    f"exchange failed: {exc}"
                    if not isinstance(exc, trio.TooSlowError)
                    else ("gave up waiting in the lease queue")
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
                reason = f"vpcd connection error: {exc}"
            nursery.cancel_scope.cancel()
        log.info("reader.removed", token=self.token, port=self.port, reason=reason, apdus=self.status.apdus)

    async def _vpcd_loop(self, stream: trio.abc.Stream) -> None:
        card = VpcdCardSide()
        while True:
            event = card.next_event()
            if event is NEED_DATA:
                data = await self._receive(stream)
                _quickack(stream)
                card.receive_data(bytes(data))
                continue
            if isinstance(event, Closed):
                return
            if isinstance(event, Control):
                reply = await self._on_control(card, event.code)
            elif isinstance(event, Apdu):
                reply = card.send_response(await self._on_apdu(event.data))
            else:  # pragma: no cover - exhaustive
                raise AssertionError(event)
            if reply:
                # P5: pcscd reads each reply right after its command; one it does not take
                # within the deadline means pcscd is stuck: drop the link, it reconnects.
                with trio.move_on_after(VPCD_REPLY_TIMEOUT_S) as stuck:
                    await stream.send_all(reply)
                if stuck.cancelled_caught:
                    raise trio.BrokenResourceError(
                        f"vpcd did not take our reply within {VPCD_REPLY_TIMEOUT_S:g} s"
                    )

    @property
    def _cache(self) -> SpeculationCache:
        return self.tunnel.speculation[self.token]

    async def _receive(self, stream: trio.abc.Stream) -> bytes | bytearray:
        """vpcd's next bytes; deferred APDUs go to the card when the application pauses."""
        if self._cache.deferred:
            # A deadline from the last deferred APDU: pcscd's get-ATR polls must not push it back.
            with trio.move_on_at(self._flush_at):
                return await stream.receive_some(RECEIVE_SIZE)
            await self._lease_exchange(lambda seq: ccid.get_slot_status(seq))
        return await stream.receive_some(RECEIVE_SIZE)

    async def _lease_exchange(self, build: Callable[[int], ccid.CcidMessage]) -> ccid.CcidMessage:
        """Lease request + deferred steps + this command in one message (issue 17)."""
        deferred = self._cache.take_deferred()
        asked_at = trio.current_time()
        with trio.fail_after(self.queue_timeout_s):
            answer = await self.tunnel.lease_exchange(self.token, deferred, build)
        # For /metrics: the grant travels with the first answer, so the wait ends with it.
        self.status.lease_wait.observe(trio.current_time() - asked_at)
        return answer

    async def _on_control(self, card: VpcdCardSide, code: VpcdControl) -> bytes:
        tok = self._tok
        if code == VpcdControl.GET_ATR:
            return card.send_atr(tok.atr)
        log.debug("vpcd.control", token=self.token, code=code.name, leased=tok.epoch is not None)
        if tok.epoch is None and not self._cache.deferred:
            self._cache.restart()  # still no lease: the next APDU meets a freshly reset card
            return b""
        generation = tok.lost_generation
        power_off = code == VpcdControl.POWER_OFF
        # POWER_ON / RESET under a lease: the server cold-resets the card
        build = ccid.icc_power_off if power_off else ccid.icc_power_on
        try:
            if tok.epoch is None:  # deferred APDUs wait: they reach the card before this event
                response = await self._lease_exchange(lambda seq: build(seq))
            else:
                response = await self.tunnel.exchange(self.token, lambda seq: build(seq))
        except LeaseError:
            if tok.epoch is None and tok.lost_generation == generation:
                # The lease ended normally (its linger ran out) while this power event was on its
                # way: nothing is lost, and the next APDU's new lease starts with a cold reset,
                # which is what this power event asked for. Keep the card in the reader.
                return b""
            raise
        # Only a plausible ATR replaces the cached one: send_atr() refuses 0 or > 33 bytes, and
        # that error would end the reader task (tests/fuzz ATR-length table, reliability §7.2 B4).
        if not power_off and 1 <= len(response.data) <= MAX_ATR_LENGTH:
            tok.atr = response.data
        return b""

    async def _on_apdu(self, apdu: bytes) -> bytes:
        local = self._local_answer(apdu)
        if local is not None:
            self.status.apdus += 1
            self.status.local_answers += 1
            self._flush_at = trio.current_time() + self.flush_after_s
            return local
        if debug_enabled(__name__):  # per APDU: skip building the event at INFO
            log.debug("apdu.sent", token=self.token, apdu=redact(apdu))
        if self._tok.epoch is None:
            response = await self._lease_exchange(lambda seq: ccid.xfr_block(seq, apdu))
        else:
            response = await self.tunnel.exchange(self.token, lambda seq: ccid.xfr_block(seq, apdu))
        if len(response.data) < 2:
            # vpcd needs an R-APDU with a status word; we never invent one.
            raise CardFailure(f"server answered an APDU with {len(response.data)} bytes (no status word)")
        self.status.apdus += 1
        return response.data

    def _local_answer(self, apdu: bytes) -> bytes | None:
        """The answer known without the network: a taught path (no lease) or the prefetched
        GET RESPONSE chain (under a lease); ChainBroken (a CardFailure) removes the card."""
        if self._tok.epoch is None:
            return self._cache.answer(apdu)
        return self.tunnel.prefetched[self.token].answer(apdu)


def _quickack(stream: trio.abc.Stream) -> None:
    """Acknowledge vpcd's writes at once.

    Measured with the simulator's direct mode: without it every APDU waits ~40 ms for our
    delayed ACK (vpcd's small writes are held back by Nagle until then). Linux clears
    TCP_QUICKACK after use, hence after every receive; other platforms lack the option.
    """
    # PLATFORM: TCP_QUICKACK is Linux-only; getattr keeps Windows/macOS working without it.
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None and isinstance(stream, trio.SocketStream):
        stream.setsockopt(socket.IPPROTO_TCP, quickack, 1)
