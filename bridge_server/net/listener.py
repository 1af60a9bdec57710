"""The TLS listener: accept, handshake under limits, identify, hand over to a session.

Limits (DESIGN §5, every wait has a deadline and every queue a bound; issue 13 item 2):
- before its handshake a connection is unauthenticated and must not cost an allowed client
  its place. `HandshakeBook` (bridge_server/net/admission.py) bounds connections that are still
  sending their ClientHello or waiting for a slot, in total and per source address, and an
  arrival over a bound evicts the oldest such connection instead of being refused;
- the first TLS record (the ClientHello) must be complete within `FIRST_FLIGHT_TIMEOUT_S`;
- at most `max_handshakes` TLS handshakes in flight; a slot held for `SLOT_EVICT_AFTER_S`
  goes to the next ClientHello in line;
- each handshake under `handshake_timeout_s` from accept; a failed one is logged as
  `tls.handshake_failed` with the peer and an operator-readable reason;
- at most `max_connections` authenticated sessions (counted only after the handshake); one more
  gets `Refused(TOO_MANY_CONNECTIONS)`, so the client sees why instead of a silent close.

We wrap accepted TCP streams in `trio.SSLStream` ourselves (not `trio.SSLListener`) so the
handshake runs explicitly under its deadline and the limits (reliability-anchors §3.1).
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Final

import structlog
import trio

from bridge_server.config import LimitsConfig
from bridge_server.net.admission import MAX_FIRST_RECORD, HandshakeBook, first_record_size
from bridge_server.net.hub import Identity
from bridge_server.net.session import SessionContext, audit_event, send_refusal, serve_session
from protocol.errors import CloseCode, TlsSetupError
from protocol.runtime.address import Address
from protocol.runtime.tls import describe_handshake_error, peer_identity
from protocol.vocabulary import RefusalReason

log = structlog.get_logger(__name__)


def describe_peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "unknown"
    return str(Address(str(host), port))


def peer_host(stream: trio.abc.Stream) -> str:
    """The peer's address without the port: the unit of the per-source handshake bound."""
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "unknown"
    except OSError:
        return "unknown"


def cert_serial(tls: trio.SSLStream[trio.abc.Stream]) -> int | None:
    """The peer certificate's serial number (a CRL reload drops sessions by serial)."""
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        return None
    return x509.load_der_x509_certificate(der).serial_number


MAX_SERIAL_OCTETS: Final = 20  # RFC 5280 §4.1.2.2


def check_leaf(tls: trio.SSLStream[trio.abc.Stream], identity: Identity) -> None:
    """S1: a client presents a leaf certificate, never a CA's (OpenSSL accepts CA:TRUE as a leaf),
    and B8: its serial number fits RFC 5280 (OpenSSL accepts a kilobyte-long one).

    Raises:
        TlsSetupError: naming the certificate and how to get a proper one.
    """
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        return
    cert = x509.load_der_x509_certificate(der)
    # RFC 5280 §4.1.2.2: at most 20 octets (the DER INTEGER, sign octet included). OpenSSL
    # accepts any length; no CA of ours issues more (tests/faults/test_malformed_client_certs.py).
    serial_octets = cert.serial_number.bit_length() // 8 + 1
    if serial_octets > MAX_SERIAL_OCTETS:
        raise TlsSetupError(
            f"client certificate {identity.name!r} has a {serial_octets}-octet serial number "
            f"(RFC 5280 allows {MAX_SERIAL_OCTETS}): reissue it with `tokenbridge pki issue-client`"
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return
    if constraints.value.ca:
        raise TlsSetupError(
            f"client certificate {identity.name!r} is a CA certificate (basicConstraints CA:TRUE); "
            "a client must present a leaf: issue one with `tokenbridge pki issue-client`"
        )


FIRST_FLIGHT_TIMEOUT_S: Final = 2.0  # a client sends its ClientHello right after connecting
SLOT_EVICT_AFTER_S: Final = 1.0  # a real handshake needs a few round trips, not seconds
MAX_WAITING_PER_HANDSHAKE: Final = 16  # waiting connections per handshake slot, in total
MAX_WAITING_PER_SOURCE: Final = 128  # one source address cannot fill the whole waiting room alone
TARPIT_S: Final = 5.0  # an identity banned for flooding waits this long for its Refused
TARPIT_PER_IDENTITY: Final = 8  # connections held at once per banned identity; more are refused at once
FAILURE_LINES_PER_S: Final = 10  # tls.handshake_failed lines; the rest are summed up
EVICTED: Final = "evicted by newer connections before its handshake could finish"


class PrefixedStream(trio.abc.Stream):
    """`inner` with `prefix` (bytes already read from it) replayed first."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return bytes(data)
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def read_first_record(stream: trio.abc.Stream) -> bytes:
    """The bytes of the peer's first TLS record (less at EOF or when it is not TLS)."""
    head = b""
    while (need := first_record_size(head)) is None or len(head) < need:
        chunk = await stream.receive_some(MAX_FIRST_RECORD)
        if not chunk:
            break
        head += chunk
    return head


class ConnectionHandler:
    """The per-connection handler given to `trio.serve_listeners`."""

    def __init__(
        self, ssl_context: Callable[[], ssl.SSLContext], limits: LimitsConfig, ctx: SessionContext
    ) -> None:
        self._ssl_context = ssl_context  # a callable so a reload can swap the context
        self._limits = limits
        self._ctx = ctx
        self.book = HandshakeBook(
            max_waiting=MAX_WAITING_PER_HANDSHAKE * limits.max_handshakes,
            max_waiting_per_source=MAX_WAITING_PER_SOURCE,
            max_handshakes=limits.max_handshakes,
            evict_after_s=SLOT_EVICT_AFTER_S,
        )
        self._scopes: dict[int, trio.CancelScope] = {}  # pending handshakes, to evict them
        self._slot_freed = trio.lowlevel.ParkingLot()
        self._keys = itertools.count()
        self._unlogged: Counter[str] = Counter()  # failures past the log budget, by reason
        self._log_window_end, self._logged = -math.inf, 0
        self._tarpit: Counter[str] = Counter()  # connections held per banned identity
        self.connections = 0  # authenticated sessions
        self.peak_handshakes = 0  # most handshakes in flight at once, for tests
        self.refusals: Counter[str] = Counter()  # failed handshakes by reason, for /metrics

    @property
    def session_context(self) -> SessionContext:
        """What every new session is given; open sessions keep the one they started with."""
        return self._ctx

    @session_context.setter
    def session_context(self, ctx: SessionContext) -> None:
        self._ctx = ctx

    @property
    def pending(self) -> int:
        """Connections accepted whose handshake has not finished."""
        return len(self._scopes)

    async def __call__(self, stream: trio.abc.Stream) -> None:
        peer = describe_peer(stream)
        try:
            tls = await self._handshake(stream, peer)
            if tls is None:
                return
            stream = tls
            try:
                identity = peer_identity(tls)
                check_leaf(tls, identity)
            except TlsSetupError as exc:  # a certificate made for another role, a CA's (or none)
                await send_refusal(tls, CloseCode.NOT_AUTHORIZED, RefusalReason.CERTIFICATE_PURPOSE, str(exc))
                raise
            if self.connections >= self._limits.max_connections:
                await self._refuse_busy(tls, identity, peer)
                return
            if await self._refuse_penalized(tls, identity, peer):
                return
            self.connections += 1
            try:
                await serve_session(tls, identity, self._ctx, peer=peer, cert_serial=cert_serial(tls))
            finally:
                self.connections -= 1
        except TlsSetupError as exc:  # no peer certificate: cannot happen with CERT_REQUIRED
            self._note_failure(peer, str(exc))
        finally:
            await trio.aclose_forcefully(stream)

    async def _refuse_busy(self, tls: trio.SSLStream[trio.abc.Stream], identity: Identity, peer: str) -> None:
        reason = RefusalReason.TOO_MANY_CONNECTIONS
        log.warning("session.refused", peer=peer, client_id=identity.name, reason=str(reason))
        await audit_event(self._ctx, "connection.refused", identity, peer=peer, reason=str(reason))
        await send_refusal(
            tls, CloseCode.TOO_MANY_CONNECTIONS, reason,
            f"the server already has {self._limits.max_connections} connections; retry later",
        )  # fmt: skip

    async def _refuse_penalized(
        self, tls: trio.SSLStream[trio.abc.Stream], identity: Identity, peer: str
    ) -> bool:
        """An identity ejected for flooding is refused until its ban ends (flood_limits.PenaltyBox).

        The refusal comes after up to `TARPIT_S` of silence (a few connections per identity at
        a time), so a client that reconnects at once costs one handshake per `TARPIT_S`.
        """
        name, penalties = identity.name, self._ctx.hub.penalties
        remaining = penalties.remaining(name, trio.current_time())
        if remaining is None:
            return False
        reason = RefusalReason.TOO_MANY_REQUESTS
        if penalties.first_refusal(name):  # once per ban: a reconnect loop must not fill the log
            log.warning("session.refused", peer=peer, client_id=name, reason=str(reason))
            await audit_event(self._ctx, "connection.refused", identity, peer=peer, reason=str(reason))
        if self._tarpit[name] < TARPIT_PER_IDENTITY:
            self._tarpit[name] += 1
            try:
                await trio.sleep(min(remaining, TARPIT_S))
            finally:
                self._tarpit[name] -= 1
                if not self._tarpit[name]:
                    del self._tarpit[name]
        left = math.ceil(penalties.remaining(name, trio.current_time()) or 0)
        await send_refusal(
            tls, CloseCode.TOO_MANY_REQUESTS, reason,
            f"this client was disconnected for repeating refused requests; retry in {left} s",
        )  # fmt: skip
        return True

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> trio.SSLStream[trio.abc.Stream] | None:
        key = next(self._keys)
        scope = self._scopes[key] = trio.CancelScope()
        self._evict(self.book.arrive(key, peer_host(stream), trio.current_time()))
        reason = EVICTED
        try:
            with scope:
                # The deadline counts from accept, queueing for a slot included (B7).
                with trio.fail_after(self._limits.handshake_timeout_s):
                    return await self._run_handshake(key, stream)
        except trio.TooSlowError as exc:
            reason = str(exc) or "handshake timed out"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = describe_handshake_error(exc)
        finally:
            del self._scopes[key]
            if self.book.leave(key):
                self._slot_freed.unpark()
        self._note_failure(peer, reason)
        return None

    def _note_failure(self, peer: str, reason: str) -> None:
        """Count a failed handshake; log it, but at most `FAILURE_LINES_PER_S` lines a second.

        Unauthenticated peers fail at their own pace (a flood evicts or drops thousands a
        second): past the budget the rest are counted and summed up in one line per reason.
        """
        self.refusals[reason] += 1
        now = trio.current_time()
        if now >= self._log_window_end:
            if self._unlogged:
                log.warning(
                    "tls.handshake_failures_suppressed",
                    count=self._unlogged.total(),
                    reasons=dict(self._unlogged),
                )
            self._unlogged.clear()
            self._log_window_end, self._logged = now + 1.0, 0
        if self._logged < FAILURE_LINES_PER_S:
            self._logged += 1
            log.warning("tls.handshake_failed", peer=peer, reason=reason)
        else:
            self._unlogged[reason] += 1

    async def _run_handshake(self, key: int, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        first_flight = min(FIRST_FLIGHT_TIMEOUT_S, self._limits.handshake_timeout_s)
        with trio.move_on_after(first_flight) as hello_wait:
            head = await read_first_record(stream)
        if hello_wait.cancelled_caught:
            raise trio.TooSlowError("handshake timed out before a complete ClientHello")
        self.book.hello_received(key)
        await self._wait_slot(key)
        replay: trio.abc.Stream = PrefixedStream(stream, head)
        tls = trio.SSLStream(replay, self._ssl_context(), server_side=True)
        await tls.do_handshake()
        return tls

    async def _wait_slot(self, key: int) -> None:
        while True:
            answer = self.book.want_slot(key, trio.current_time())
            self._evict(answer.evicted)
            if answer.granted:
                self.peak_handshakes = max(self.peak_handshakes, self.book.handshaking)
                return
            with trio.move_on_at(answer.retry_at if answer.retry_at is not None else math.inf):
                await self._slot_freed.park()

    def _evict(self, keys: tuple[int, ...]) -> None:
        for key in keys:
            self._scopes[key].cancel()


async def run_listener(
    handler: ConnectionHandler,
    *,
    host: str,
    port: int,
    shutdown: trio.Event,
    grace_period_s: float,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown`, then stop accepting and give sessions `grace_period_s` to end.

    `task_status.started()` gets the bound listeners (port 0 picks a free port).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as sessions:
        async with trio.open_nursery() as acceptors:
            await acceptors.start(partial(trio.serve_listeners, handler, listeners, handler_nursery=sessions))
            addresses = [Address(*lst.socket.getsockname()[:2]) for lst in listeners]
            log.info("server.listening", addresses=[str(a) for a in addresses])  # "127.0.0.1:7447"
            task_status.started(listeners)
            await shutdown.wait()
            log.info("server.stopping", grace_period=grace_period_s, sessions=len(sessions.child_tasks))
            acceptors.cancel_scope.cancel()  # stop accepting; closes the listeners
        # hypercorn's pattern: sessions get a deadline, not an immediate cancel.
        sessions.cancel_scope.deadline = trio.current_time() + grace_period_s
