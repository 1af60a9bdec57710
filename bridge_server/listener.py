"""The TLS listener: accept, handshake under limits, identify, hand over to a session.

Limits (DESIGN §5, every wait has a deadline and every queue a bound):
- at most `max_handshakes` TLS handshakes in flight (a `CapacityLimiter`): a flood of slow
  handshakes queues at the limiter instead of costing CPU for all of them at once;
- each handshake under `handshake_timeout_s`; a failed one is logged as
  `tls.handshake_failed` with the peer and an operator-readable reason;
- at most `max_connections` sessions; one more gets `Refused(TOO_MANY_CONNECTIONS)` after its
  handshake, so the client sees why instead of a silent close.

We wrap accepted TCP streams in `trio.SSLStream` ourselves (not `trio.SSLListener`) so the
handshake runs explicitly under its deadline and the limiter (reliability-anchors §3.1).
"""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Callable
from functools import partial

import structlog
import trio

from bridge_server.config import LimitsConfig
from bridge_server.session import SessionContext, audit_event, send_refusal, serve_session
from protocol.errors import CloseCode, TlsSetupError
from protocol.runtime.tls import describe_handshake_error, peer_identity

log = structlog.get_logger(__name__)


def describe_peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "unknown"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def cert_serial(tls: trio.SSLStream[trio.abc.Stream]) -> int | None:
    """The peer certificate's serial number (a CRL reload drops sessions by serial)."""
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        return None
    return x509.load_der_x509_certificate(der).serial_number


class ConnectionHandler:
    """The per-connection handler given to `trio.serve_listeners`."""

    def __init__(
        self, ssl_context: Callable[[], ssl.SSLContext], limits: LimitsConfig, ctx: SessionContext
    ) -> None:
        self._ssl_context = ssl_context  # a callable so a reload can swap the context
        self._limits = limits
        self._ctx = ctx
        self._handshakes = trio.CapacityLimiter(limits.max_handshakes)
        self.connections = 0
        self.refusals: Counter[str] = Counter()  # failed handshakes by reason, for /metrics

    @property
    def session_context(self) -> SessionContext:
        """What every new session is given; open sessions keep the one they started with."""
        return self._ctx

    @session_context.setter
    def session_context(self, ctx: SessionContext) -> None:
        self._ctx = ctx

    async def __call__(self, stream: trio.abc.Stream) -> None:
        peer = describe_peer(stream)
        self.connections += 1
        try:
            tls = await self._handshake(stream, peer)
            if tls is None:
                return
            stream = tls
            identity = peer_identity(tls)
            if self.connections > self._limits.max_connections:
                log.warning(
                    "session.refused", peer=peer, client_id=identity.name, reason="too_many_connections"
                )
                await audit_event(
                    self._ctx, "connection.refused", identity, peer=peer, reason="too_many_connections"
                )
                await send_refusal(
                    tls, CloseCode.TOO_MANY_CONNECTIONS, "too_many_connections",
                    f"the server already has {self._limits.max_connections} connections; retry later",
                )  # fmt: skip
                return
            await serve_session(tls, identity, self._ctx, peer=peer, cert_serial=cert_serial(tls))
        except TlsSetupError as exc:  # no peer certificate: cannot happen with CERT_REQUIRED
            log.warning("tls.handshake_failed", peer=peer, reason=str(exc))
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> trio.SSLStream[trio.abc.Stream] | None:
        tls = trio.SSLStream(stream, self._ssl_context(), server_side=True)
        try:
            # The deadline counts from accept, queueing for a slot included: otherwise a flood
            # of silent connections is reaped only max_handshakes per timeout (B7).
            with trio.fail_after(self._limits.handshake_timeout_s):
                async with self._handshakes:
                    await tls.do_handshake()
        except trio.TooSlowError:
            log.warning("tls.handshake_failed", peer=peer, reason="handshake timed out")
            self.refusals["handshake timed out"] += 1
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = describe_handshake_error(exc)
            log.warning("tls.handshake_failed", peer=peer, reason=reason)
            self.refusals[reason] += 1
            return None
        return tls


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
            addresses = [lst.socket.getsockname() for lst in listeners]
            log.info("server.listening", addresses=[str(a) for a in addresses])
            task_status.started(listeners)
            await shutdown.wait()
            log.info("server.stopping", grace_period=grace_period_s, sessions=len(sessions.child_tasks))
            acceptors.cancel_scope.cancel()  # stop accepting; closes the listeners
        # hypercorn's pattern: sessions get a deadline, not an immediate cancel.
        sessions.cancel_scope.deadline = trio.current_time() + grace_period_s
