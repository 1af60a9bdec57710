"""Token manager: one task per configured token, the only code that touches its card.

Theory of operation
-------------------
`TokenManager.run` is a single loop that owns the card driver, so card access is serialised
by construction. Sessions hand it commands through one bounded inbox (lease request,
release, CCID frame) and it answers by `push()`ing wire messages into the sessions' own
bounded outboxes, never awaiting a client. Disconnects use `detach()`, which is sync and
cannot be lost (a session's `finally` must not block): the loop applies pending detaches
before anything else it does.

Policy lives in `LeaseBook` (pure); this loop sleeps until the next lease deadline or the
next presence poll (at most `POLL_INTERVAL_S`), whichever is first, and turns the book's
events into card actions and messages:

- `Granted`: cold-reset the card (power off, power on) so nothing from an earlier lease
  survives (DESIGN §4 isolation, CVE-2023-40660), then send `LeaseGranted` with the fresh ATR;
- `Ended`: send `LeaseEnded` and power the card off, so a verified PIN dies with the lease;
- `Queued` / `Dequeued` / `Refusal`: tell the client.

Presence: every poll asks the driver whether the slot is there; a `DeviceError` or an empty
slot means the token is gone (the holder's lease ends with `token_gone`, every session that
may see the token gets `TokenStatus(present=False)`). While absent, each poll tries to
reopen the device; the same serial resumes, a different one is refused and logged.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Final, assert_never

import structlog
import trio

from bridge_server.config import LeaseConfig, TokenConfig
from bridge_server.errors import DeviceError, DeviceGoneError
from bridge_server.guard.flood_guard import FloodGuard
from bridge_server.guard.guardrails import Guardrails, Holder
from bridge_server.guard.pin_guard import Attempt, Engaged
from bridge_server.net.hub import Hub, Subscriber
from bridge_server.tokens.commands import (
    CheckServerPin,
    Command,
    ReleaseLease,
    RequestLease,
    ResetToken,
    RevokeLease,
    SessionCommand,
    Shutdown,
    SubmitFrame,
    Wake,
)
from bridge_server.tokens.device import CardOpener, OpenedCard, TokenDevice
from bridge_server.tokens.epochs import EpochStore
from bridge_server.tokens.leases import (
    Dequeued,
    Ended,
    EndReason,
    Granted,
    LeaseBook,
    LeaseEvent,
    Queued,
    Refusal,
)
from bridge_server.tokens.pin_check import answer_check
from bridge_server.tokens.speculation import PathRecorder, SpeculationBook, replay_matches
from bridge_server.tokens.stats import TokenStats
from bridge_server.tokens.virtual_reader import FrameResult, VirtualReader
from protocol import wire
from protocol.apdu import SW_UNKNOWN, redact
from protocol.ccid import CcidMessage, MessageType, decode_message, xfr_block
from protocol.display import TokenState
from protocol.errors import MalformedCcidMessageError
from protocol.speculation import MAX_STEPS, LeaseExchange, Step, get_response_for, speculable_command
from protocol.vocabulary import ErrorCode

if TYPE_CHECKING:  # the simulator is a test and demo feature: no import at run time
    from bridge_server.simulator.usb_token import SimulatedToken

log = structlog.get_logger(__name__)

POLL_INTERVAL_S: Final = 1.0  # presence is checked at least this often (issue: unplug seen within 1 s)
INBOX_CAPACITY: Final = 64
CLEANUP_TIMEOUT_S: Final = 5.0


_WAKE: Final = Wake()


class TokenManager:
    """One token: its device, its leases, its card. See the module docstring."""

    def __init__(
        self,
        token_id: int,
        config: TokenConfig,
        lease: LeaseConfig,
        hub: Hub,
        opener: CardOpener,
        *,
        first_epoch: int,
        simulated: SimulatedToken | None = None,
        guardrails: Guardrails | None = None,
        epochs: EpochStore | None = None,
    ) -> None:
        self.token_id = token_id
        self._epochs = epochs
        # Command policy, PIN guard and audit (bridge_server/guard/guardrails.py); on by default.
        self.rails = guardrails or Guardrails(config.name, policy=config.policy, server_pin=config.server_pin)
        self.flood = FloodGuard(config.name, self.rails, hub.penalties)  # repeated refusals (issue 13 item 3)
        self._holder: Holder | None = None
        self.config = config
        self.name = config.name
        self.hub = hub
        self.simulated = simulated  # SimulatedToken when `match.simulate`: evidence for tests
        self.book = LeaseBook(
            linger_s=lease.linger_s,
            idle_timeout_s=lease.idle_timeout_s,
            max_hold_s=lease.max_hold_s,
            first_epoch=first_epoch,
            present=False,
        )
        self.queue_timeout_s = lease.queue_timeout_s
        self.atr = b""
        self.device = TokenDevice(config.name, opener, config.match.serial, self.rails)
        self._reader: VirtualReader | None = None
        self._send, self._inbox = trio.open_memory_channel[Command](INBOX_CAPACITY)
        self._drops: dict[int, EndReason] = {}
        self._status_changed = False
        self._stopped = False
        self._leases_ended = trio.Event()  # shutdown: every lease ended (the card is powered off next)
        self._in_flight: trio.CancelScope | None = None  # the exchange at the card, if any
        self._abort_at: float | None = None  # shutdown: when an exchange at the card is abandoned
        self.stats = TokenStats()  # counters for `status` and /metrics
        # Issue 17 (docs/performance.md): taught paths, replay of deferred steps, GET RESPONSE
        # prefetch, round trips per lease.
        self.spec = SpeculationBook(enabled=config.speculation)
        self._recorder: PathRecorder | None = None
        self._batches: dict[int, LeaseExchange] = {}  # conn_id -> its LeaseExchange, until granted
        self._granted_batch: tuple[Subscriber, int, LeaseExchange] | None = None
        self.round_trips = 0  # of the current lease: its request and every CCID frame

    @property
    def _card(self) -> OpenedCard | None:
        return self.device.card

    def reconfigure(self, config: TokenConfig, lease: LeaseConfig) -> None:
        """A config reload: new allow list, command policy and lease timings (not `match`).

        The policy is screened per APDU, so it applies to the running lease from its next
        command; everyone who could see the token before or now gets its new `TokenStatus`.
        """
        before = self.config
        self.config = config
        self.book.set_timeouts(
            linger_s=lease.linger_s, idle_timeout_s=lease.idle_timeout_s, max_hold_s=lease.max_hold_s
        )
        self.queue_timeout_s = lease.queue_timeout_s
        self.rails.policy = config.policy
        self.rails.server_pin.configure(config.server_pin)  # re-read on every reload (issue 16)
        self.spec.enabled = config.speculation
        if not config.speculation and self.spec.forget():
            self._teach()
        if before.allow != config.allow:
            for sub in self.hub:
                if sub.admin or sub.may_use(before.allow) or sub.may_use(config.allow):
                    sub.push(self.status_for(sub))

    # -- session-facing API ----------------------------------------------------

    @property
    def present(self) -> bool:
        return self._card is not None

    def may_see(self, sub: Subscriber) -> bool:
        return sub.admin or sub.may_use(self.config.allow)

    def status_for(self, sub: Subscriber) -> wire.TokenStatus:
        state = str(TokenState.of(present=self.present, leased=self.book.holder is not None))
        return wire.TokenStatus(
            token_id=self.token_id,
            name=self.name,
            present=self.present,
            allowed=sub.may_use(self.config.allow),
            atr=self.atr if self.present else b"",
            state=state,
        )

    async def request_lease(self, sub: Subscriber, batch: LeaseExchange | None = None) -> None:
        await self._send.send(RequestLease(sub, batch))

    def speculation_for(self, sub: Subscriber) -> wire.SpeculationPaths | None:
        """The taught paths for a client allowed to use the token (None: nothing to teach)."""
        if not sub.may_use(self.config.allow) or not self.spec.paths or not self.spec.enabled:
            return None
        return self.spec.message(self.token_id)

    async def release_lease(self, sub: Subscriber, epoch: int) -> None:
        await self._send.send(ReleaseLease(sub, epoch))

    async def submit_frame(self, sub: Subscriber, epoch: int, raw: bytes) -> None:
        await self._send.send(SubmitFrame(sub, epoch, raw))

    def detach(self, conn_id: int, reason: EndReason = EndReason.DISCONNECTED) -> None:
        """Forget a connection (sync, never lost): its lease ends and its queue slot goes."""
        self._drops[conn_id] = reason
        # If the inbox is full the loop still applies drops before its next command.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._send.send_nowait(_WAKE)

    async def shutdown(self, *, abort_after_s: float = 0.0) -> None:
        """End every lease with `shutdown`, power the card off and make `run` return (F8).

        An exchange at the card gets `abort_after_s` to finish; then it is abandoned and its
        client gets an explicit CCID failure (CMD_ABORTED), never a status word. Returns once
        every lease has ended (the caller bounds the wait); the card is powered off after that,
        shielded, as soon as it answers (a busy card queues the power-off behind its work)."""
        self._abort_at = trio.current_time() + abort_after_s
        if self._in_flight is not None:
            self._in_flight.deadline = min(self._in_flight.deadline, self._abort_at)
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send.send(Shutdown())
        await self._leases_ended.wait()

    async def revoke_lease(self) -> None:
        """Admin: end the current lease with `revoked` (the card is powered off as usual)."""
        await self._send.send(RevokeLease())

    async def reset_token(self) -> None:
        """Admin: end the lease, release the USB device and open it again (fresh power cycle)."""
        await self._send.send(ResetToken())

    def queue_view(self) -> list[tuple[int, str, float | None]]:
        """The waiters in order: (conn_id, identity, queued since in trio time or None)."""
        out = []
        for conn_id in self.book.waiting:
            sub = self.hub.get(conn_id)
            out.append((conn_id, sub.name if sub else "?", self.stats.queued_since(conn_id)))
        return out

    def snapshot(self) -> dict[str, Any]:
        holder = self.book.holder
        return {
            "token_id": self.token_id,
            "present": self.present,
            "serial": self.device.serial,
            "atr": self.atr.hex(),
            "holder": holder.identity if holder else None,
            "epoch": holder.epoch if holder else None,
            "apdus": holder.apdus if holder else 0,
            "queue": len(self.book.waiting),
            "pin_guard": self.rails.guard.status(self.name),
            "server_pin": self.rails.server_pin.status(self.rails.guard),
            "round_trips": self.round_trips if holder else 0,
            "speculation": self.spec.snapshot(),
        }

    # -- the loop ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._try_attach()
        task_status.started()
        try:
            await self._loop()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
                await self._stop()

    async def _loop(self) -> None:
        next_poll = trio.current_time() + POLL_INTERVAL_S
        while not self._stopped:
            await self._apply_drops()
            await self._apply(self.book.tick(trio.current_time()))
            deadline = self.book.next_deadline()
            cmd: Command | None = None
            with trio.move_on_at(min(next_poll, math.inf if deadline is None else deadline)):
                cmd = await self._inbox.receive()
            if cmd is not None:
                await self._handle(cmd)
            if trio.current_time() >= next_poll:
                await self.rails.audit.aretry()  # an unwritable audit log resumes by itself
                await self._poll_presence()
                next_poll = trio.current_time() + POLL_INTERVAL_S

    async def _handle(self, cmd: Command) -> None:
        match cmd:
            case Shutdown():
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
                    await self._stop()  # shielded: the card is powered off even as the server's deadline hits
            case RevokeLease() | ResetToken():
                await self._apply(self.book.end(trio.current_time(), EndReason.REVOKED))
                if isinstance(cmd, ResetToken) and self._card is not None:
                    log.warning("token.reset", token=self.name, reason="admin request")
                    await self._apply(await self._lose_card("reset by an admin"))
                    await self._try_attach()
            case Wake():
                pass  # the loop applies pending detaches first
            case CheckServerPin():
                await self._check_server_pin(cmd)
            case RequestLease() | ReleaseLease() | SubmitFrame():
                sub = cmd.sub
                if sub.closed or sub.conn_id in self._drops or self.flood.ejected(sub.conn_id):
                    return  # a command that raced its session's end
                await self._from_session(cmd, sub, trio.current_time())
            case _:
                assert_never(cmd)  # mypy: a new command type must be handled here

    async def _from_session(self, cmd: SessionCommand, sub: Subscriber, now: float) -> None:
        match cmd:
            case RequestLease(batch=batch):
                await self._request(sub, now, batch)
            case ReleaseLease(epoch=epoch):
                await self._apply(self.book.release(sub.conn_id, epoch, now))
            case SubmitFrame(epoch=epoch, raw=raw):
                await self._frame(sub, epoch, raw)

    async def _request(self, sub: Subscriber, now: float, batch: LeaseExchange | None = None) -> None:
        if not sub.may_use(self.config.allow):
            self._error(sub, ErrorCode.NOT_ALLOWED, f"{sub.name!r} may not use token {self.name!r}")
            return
        if self.book.knows(sub.conn_id):  # a duplicate costs no audit line (issue 13 item 3)
            self._error(
                sub, ErrorCode.ALREADY_LEASED, f"this connection already holds or waits for {self.name!r}"
            )
            await self.flood.duplicate_request(sub, now)
            return
        # DESIGN §4: no lease that the audit log cannot record (the line waits and is retried).
        if not await self.rails.record("lease.requested", **_who(sub).audit_fields(), conn_id=sub.conn_id):
            msg = f"no new leases on {self.name!r}: {self.rails.audit.problem}; retried automatically"
            self._error(sub, ErrorCode.AUDIT_UNAVAILABLE, msg)
            return
        self.stats.requested(sub.conn_id, now)
        if batch is not None:
            self._batches[sub.conn_id] = batch  # run once granted (_run_batch)
        events = self.book.request(sub.conn_id, sub.name, now, queue_timeout=self.queue_timeout_s)
        await self._apply(events)

    async def _frame(self, sub: Subscriber, epoch: int, raw: bytes, *, count: bool = True) -> None:
        refusal = self.book.check_frame(sub.conn_id, epoch)
        if refusal is not None:
            self._error(sub, refusal, f"no lease with epoch {epoch} on token {self.name!r}")
            return
        try:
            msg = decode_message(raw)
        except MalformedCcidMessageError as exc:
            self._error(sub, ErrorCode.BAD_CCID, str(exc))
            return
        self.round_trips += count  # a LeaseExchange's command rode on its request (issue 17)
        done = await self._at_card(sub, epoch, msg)
        if done is None:
            return
        result, guard_events = done
        now = trio.current_time()
        holder = self._holder or _who(sub, epoch)
        chain, chain_failure = await self._prefetch(sub, epoch, msg.data, result)
        if chain:  # before the answer it follows: the client keeps it for the next GET RESPONSEs
            sub.push(wire.Prefetched(token_id=self.token_id, epoch=epoch, steps=tuple(chain)))
        sub.push(wire.CcidFrame(token_id=self.token_id, epoch=epoch, message=result.response.encode()))
        if result.refused is not None:
            pin = result.refused.kind == "pin_guard"
            code = ErrorCode.PIN_GUARD if pin else ErrorCode.COMMAND_REFUSED
            sub.push(wire.ErrorMessage(code=code, message=self.rails.notice(result.refused)))
            await self.flood.refused(sub, result.refused, holder, now)
        await self.rails.record_guard_events(guard_events, holder)
        if result.powered_off:
            self.book.note_power_off(now)
        failure = result.failure or chain_failure
        if failure is not None:
            await self._device_failed(failure, during=msg.msg_type)

    async def _at_card(
        self, sub: Subscriber, epoch: int, msg: CcidMessage
    ) -> tuple[FrameResult, list[Attempt | Engaged]] | None:
        """Run one CCID command and count it (lease book, stats, path recorder, PIN guard: the
        caller records the guard's events); None when shutdown abandoned it."""
        assert self._reader is not None  # a holder always has a reader (set on grant)
        reader = self._reader
        with trio.CancelScope(deadline=math.inf if self._abort_at is None else self._abort_at) as scope:
            self._in_flight = scope
            try:
                result = await reader.execute(msg)
            finally:
                self._in_flight = None
        if scope.cancelled_caught:
            await self._abandoned(sub, epoch, msg, reader)
            return None
        self.book.note_frame(trio.current_time(), apdu=result.apdu)
        if result.apdu:
            self.stats.apdu(msg.data, result.response.data)
        self._record_step(msg, result)
        holder = self._holder or _who(sub, epoch)
        guard_events: list[Attempt | Engaged] = []
        if result.apdu:
            guard_events = self.rails.observe(msg.data, result.response.data, holder)
        elif result.answer_lost:  # the card may have counted it: the guard counts it too
            guard_events = self.rails.observe(msg.data, SW_UNKNOWN.to_bytes(2, "big"), holder)
        return result, guard_events

    def _record_step(self, msg: CcidMessage, result: FrameResult) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            recorder.note(msg.data, result.response.data if result.apdu and result.failure is None else None)
        elif msg.msg_type is MessageType.PC_to_RDR_IccPowerOff or (
            msg.msg_type is MessageType.PC_to_RDR_IccPowerOn and (recorder.steps or not recorder.open)
        ):
            recorder.interrupt()  # a power cycle mid-lease: later steps are not "from power-on"

    async def _card_apdu(self, sub: Subscriber, epoch: int, command: bytes) -> FrameResult | None:
        """One APDU the server sends itself (replay, prefetch), counted like the client's own."""
        done = await self._at_card(sub, epoch, xfr_block(0, command))
        if done is None:
            return None
        result, guard_events = done
        await self.rails.record_guard_events(guard_events, self._holder or _who(sub, epoch))
        return result

    async def _prefetch(
        self, sub: Subscriber, epoch: int, command: bytes, result: FrameResult
    ) -> tuple[list[Step], DeviceError | None]:
        """The GET RESPONSE chain the client will ask for next (protocol/speculation.py)."""
        chain: list[Step] = []
        if not (self.spec.enabled and result.apdu and result.failure is None):
            return chain, None
        response = result.response.data
        while len(chain) < MAX_STEPS and (next_command := get_response_for(command, response)) is not None:
            step = await self._card_apdu(sub, epoch, next_command)
            if step is None or step.failure is not None or not step.apdu:
                return chain, None if step is None else step.failure
            command, response = next_command, step.response.data
            chain.append((command, response))
            self.spec.prefetched += 1
        return chain, None

    async def _run_batch(self, sub: Subscriber, epoch: int, batch: LeaseExchange) -> None:
        """A `LeaseExchange` was granted: replay its deferred steps, check each, run its command."""
        for index, (command, promised) in enumerate(batch.deferred):
            holder = self.book.holder
            if holder is None or holder.epoch != epoch:
                return  # the lease ended meanwhile (revoked, unplugged, shutdown)
            if not speculable_command(command):  # never taught, so never deferred: fail closed
                await self._card_changed(sub, epoch, index, command)
                return
            result = await self._card_apdu(sub, epoch, command)
            if result is None:
                return
            if result.failure is not None:
                await self._device_failed(result.failure, during=MessageType.PC_to_RDR_XfrBlock)
                return
            if not replay_matches(promised, result.response.data if result.apdu else None):
                await self._card_changed(sub, epoch, index, command)
                return
            self.spec.hits += 1
        await self._frame(sub, epoch, batch.message, count=False)

    async def _card_changed(self, sub: Subscriber, epoch: int, index: int, command: bytes) -> None:
        """A replayed step got another answer than the client gave: end the lease (issue 17)."""
        self.spec.mismatches += 1
        log.warning(
            "speculation.mismatch", token=self.name, client_id=sub.name, lease_epoch=epoch, step=index,
            apdu=redact(command),
        )  # fmt: skip
        holder = self._holder or _who(sub, epoch)
        await self.rails.record(
            "speculation.mismatch", **holder.audit_fields(), lease_epoch=epoch, step=index
        )
        await self._apply(self.book.end(trio.current_time(), EndReason.CARD_CHANGED))

    def _teach(self) -> None:
        """Send the token's paths (or their withdrawal) to every client allowed to use it."""
        msg = self.spec.message(self.token_id)
        for sub in self.hub:
            if sub.may_use(self.config.allow):
                sub.push(msg)

    async def check_server_pin(self, actor: str) -> dict[str, Any]:
        """Admin `pin test`: the answer of `pin_check.check_server_pin` (or why it did not run)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        await self._send.send(CheckServerPin(actor, send))
        async with receive:
            return await receive.receive()

    async def _check_server_pin(self, cmd: CheckServerPin) -> None:
        holder = self.book.holder
        busy = "absent" if self._card is None else f"leased by {holder.identity}" if holder else None
        driver = None if self._card is None else self._card.driver
        answer, failure = await answer_check(driver, self.rails, cmd.actor, self.config.policy.family, busy)
        if failure is not None:
            await self._device_failed(failure, during=None)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            cmd.reply.send_nowait(answer)

    async def _abandoned(self, sub: Subscriber, epoch: int, msg: CcidMessage, reader: VirtualReader) -> None:
        """Shutdown abandoned this exchange: an explicit failure, and a PIN counts as tried."""
        log.warning("apdu.abandoned", token=self.name, client_id=sub.name, reason="server shutting down")
        sub.push(wire.CcidFrame(token_id=self.token_id, epoch=epoch, message=reader.aborted(msg).encode()))
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:  # the card may have counted a VERIFY
            holder = self._holder or _who(sub, epoch)
            events = self.rails.observe(msg.data, SW_UNKNOWN.to_bytes(2, "big"), holder)
            await self.rails.record_guard_events(events, holder)

    # -- events -> actions -------------------------------------------------------

    async def _apply(self, events: list[LeaseEvent]) -> None:
        pending = list(events)
        await self._run_events(pending)
        if self._status_changed:  # after the LeaseEnded messages, so a client sees the cause first
            self._status_changed = False
            self._broadcast_status()
        granted, self._granted_batch = self._granted_batch, None
        if granted is not None:  # after the events: a replay may end this lease and grant the next
            await self._run_batch(*granted)

    async def _run_events(self, pending: list[LeaseEvent]) -> None:
        while pending:
            event = pending.pop(0)
            if isinstance(event, Granted):
                pending += await self._grant(event)
            elif isinstance(event, Ended):
                pending += await self._ended(event)
            elif isinstance(event, Queued):
                self._push(event.conn_id, wire.LeaseQueued(token_id=self.token_id, position=event.position))
            elif isinstance(event, Dequeued):
                self.stats.forget(event.conn_id)
                self._batches.pop(event.conn_id, None)
                # queue_timeout and shutdown are words of both vocabularies (protocol/vocabulary.py)
                code = ErrorCode(event.reason.value)
                self._error_to(event.conn_id, code, f"lease request for {self.name!r} ended")
            elif isinstance(event, Refusal):
                self._error_to(event.conn_id, event.code, f"lease rule on token {self.name!r}: {event.code}")

    async def _grant(self, event: Granted) -> list[LeaseEvent]:
        now = trio.current_time()
        sub = self.hub.get(event.conn_id)
        batch = self._batches.pop(event.conn_id, None)
        if sub is None or sub.closed or self._card is None:
            return self.book.drop(event.conn_id, now, EndReason.DISCONNECTED)
        driver = self._card.driver
        if self._epochs is not None:
            self._epochs.note_granted(self.name, event.epoch)  # persisted before any client sees it
        try:
            # DESIGN §4: cold reset before every grant; nothing crosses from one lease to the next.
            await driver.power_off()
            atr = await driver.power_on()
        except DeviceError as exc:
            return await self._device_failed(exc, during=None, apply=False)
        self.atr = atr
        holder = self._holder = _who(sub, event.epoch)
        self.rails.private_key_ops = 0
        self._reader = VirtualReader(
            driver, atr, screen=lambda raw: self.rails.screen(raw, holder),
            rewrite=lambda raw: self.rails.server_pin.apdu(raw, holder.names),
        )  # fmt: skip
        if self.simulated is not None:
            self.simulated.current_epoch = event.epoch
        sub.push(wire.LeaseGranted(token_id=self.token_id, epoch=event.epoch, atr=atr))
        self._recorder, self.round_trips = PathRecorder(atr), 1
        if batch is not None:
            self._granted_batch = (sub, event.epoch, batch)
        self.stats.granted(event.conn_id, now)
        await self.rails.record(
            "lease.granted", **holder.audit_fields(), conn_id=event.conn_id, lease_epoch=event.epoch
        )
        log.info(
            "lease.granted",
            token=self.name,
            client_id=event.identity,
            conn_id=event.conn_id,
            lease_epoch=event.epoch,
        )
        return []

    async def _ended(self, event: Ended) -> list[LeaseEvent]:
        self._reader = None
        recorder, self._recorder = self._recorder, None
        self.stats.round_trips_total += self.round_trips
        if self.simulated is not None:
            self.simulated.current_epoch = None
        msg = wire.LeaseEnded(token_id=self.token_id, epoch=event.epoch, reason=event.reason)
        self._push(event.conn_id, msg)
        if recorder is not None and self.spec.learn(recorder) and not self._stopped:
            self._teach()  # after the LeaseEnded: the holder learns why first
        self.stats.ended(event.held_s, str(event.reason))
        who = self._holder.audit_fields() if self._holder is not None else {"client_id": event.identity}
        self._holder = None
        await self.flood.lease_ended(who, event.epoch, trio.current_time())
        await self.rails.record(
            "lease.released", **who, conn_id=event.conn_id, lease_epoch=event.epoch,
            reason=str(event.reason), duration_ms=round(event.held_s * 1000), apdus=event.apdus,
            private_key_ops=self.rails.private_key_ops,
        )  # fmt: skip
        log.info(
            "lease.ended",
            token=self.name,
            client_id=event.identity,
            conn_id=event.conn_id,
            lease_epoch=event.epoch,
            duration_ms=round(event.held_s * 1000),
            apdus=event.apdus,
            round_trips=self.round_trips,
            reason=str(event.reason),
        )
        if self._card is not None and event.reason is not EndReason.TOKEN_GONE and not self._stopped:
            # (at shutdown `device.shut_down()` powers it off, after every lease has ended)
            try:
                await self._card.driver.power_off()  # the verified PIN dies with the lease
            except DeviceError as exc:
                return await self._device_failed(exc, during=None, apply=False)
        return []

    async def _device_failed(
        self, exc: DeviceError, *, during: MessageType | None, apply: bool = True
    ) -> list[LeaseEvent]:
        """The card failed: end the lease; if the device is gone, mark the token absent."""
        now = trio.current_time()
        log.warning(
            "device.failed", token=self.name, error=str(exc), msg_type=during.name if during else None
        )
        if isinstance(exc, DeviceGoneError):
            events = await self._lose_card(str(exc))
        else:
            events = self.book.end(now, EndReason.DEVICE_ERROR)
        if apply:
            await self._apply(events)
            return []
        return events

    # -- presence ----------------------------------------------------------------

    async def _poll_presence(self) -> None:
        if self._card is None:
            await self._try_attach()
            return
        why = await self.device.probe()
        if why is not None:
            await self._apply(await self._lose_card(why))

    async def _lose_card(self, why: str) -> list[LeaseEvent]:
        self._reader = None
        if self.spec.forget():  # a re-plugged token may hold other content
            self._teach()
        await self.device.forget(why)
        self._status_changed = True
        return self.book.set_present(False, trio.current_time())

    async def _try_attach(self) -> None:
        atr = await self.device.attach()
        if atr is None:
            return
        self.atr = atr
        self._broadcast_status()
        await self._apply(self.book.set_present(True, trio.current_time()))

    async def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._apply(self.book.shutdown(trio.current_time()))
        self._leases_ended.set()
        await self.device.shut_down()
        self._send.close()

    # -- helpers -------------------------------------------------------------------

    async def _apply_drops(self) -> None:
        drops, self._drops = self._drops, {}
        for conn_id, reason in drops.items():
            self.stats.forget(conn_id)
            self._batches.pop(conn_id, None)
            self.flood.forget(conn_id)
            await self._apply(self.book.drop(conn_id, trio.current_time(), reason))

    def _broadcast_status(self) -> None:
        for sub in self.hub:
            if self.may_see(sub):
                sub.push(self.status_for(sub))

    def _push(self, conn_id: int, msg: wire.Message) -> None:
        sub = self.hub.get(conn_id)
        if sub is not None:
            sub.push(msg)

    def _error(self, sub: Subscriber, code: ErrorCode, message: str) -> None:
        sub.push(wire.ErrorMessage(code=code, message=message, token_id=self.token_id))

    def _error_to(self, conn_id: int, code: ErrorCode, message: str) -> None:
        self._push(conn_id, wire.ErrorMessage(code=code, message=message, token_id=self.token_id))


def _who(sub: Subscriber, epoch: int = 0) -> Holder:
    """The certificate-derived identity a lease and its audit lines belong to (S11)."""
    ident = sub.identity
    return Holder(sub.name, ident.names, sub.admin, epoch, fingerprint=ident.fingerprint_sha256)
