"""Who is connected, and how token tasks reach them without ever blocking.

A `Subscriber` is one session as the token tasks see it: its identity, a bounded outbox and a
way to end it. Token tasks only ever `push()` (never await) into a subscriber's outbox: a
client that does not read its socket fills its own outbox and is disconnected
(`slow_client`), and nobody else waits for it (DESIGN §5: one bad client cannot starve the
server). The `Hub` is the registry: it hands out connection ids, finds subscribers by id and
counts connections for the listener's limit.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import TypeAlias

import structlog
import trio

from bridge_server.guard.flood_limits import PenaltyBox
from protocol.runtime.tls import PeerIdentity
from protocol.wire import Message

log = structlog.get_logger(__name__)

SLOW_CLIENT = "slow_client"


Identity: TypeAlias = PeerIdentity  # who a session is: its certificate's names, fingerprint, expiry


class Subscriber:
    """One connected session as seen by the token tasks."""

    def __init__(
        self,
        conn_id: int,
        identity: Identity,
        outbox: trio.MemorySendChannel[Message],
        *,
        admin: bool,
        peer: str = "",
        cert_serial: int | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.identity = identity
        self.admin = admin  # a config reload grants it live or drops the session (rights.py)
        self.peer = peer  # "host:port", for `status`
        self.cert_serial = cert_serial  # the client certificate's serial: a CRL reload drops revoked ones
        self.since = time.time()  # wall time, for `status`
        self.rtt_ms: float | None = None  # last heartbeat round trip (Ping -> Pong)
        self._outbox = outbox
        self.cancel_scope = trio.CancelScope()
        self.closed = False
        self.close_reason: str | None = None

    @property
    def name(self) -> str:
        return self.identity.name

    def may_use(self, allow: tuple[str, ...]) -> bool:
        """Whether one of the certificate's names is on a token's allow list."""
        return any(n in allow for n in self.identity.names)

    def push(self, msg: Message) -> bool:
        """Queue `msg` for the client without waiting; a full outbox ends the session."""
        if self.closed:
            return False
        try:
            self._outbox.send_nowait(msg)
        except trio.WouldBlock:
            log.warning("session.too_slow", conn_id=self.conn_id, client_id=self.name)
            self.close(SLOW_CLIENT)
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def farewell(self, goodbye: Message, reason: str, *, grace_s: float) -> None:
        """End the session with `goodbye` as its last message (sent within `grace_s`, else cut).

        From now on the session counts as closed (the tokens ignore its commands); its writer
        sends what is queued, then the Goodbye, and ends the session (session.py)."""
        pushed = self.push(goodbye)
        if self.close_reason is None:
            self.close_reason = reason
        self.closed = True
        if pushed:
            self.cancel_scope.deadline = min(self.cancel_scope.deadline, trio.current_time() + grace_s)
        else:
            self.cancel_scope.cancel()

    def close(self, reason: str) -> None:
        """End the session (from any task): its firewall logs `reason` and detaches it."""
        if self.close_reason is None:
            self.close_reason = reason
        self.closed = True
        self.cancel_scope.cancel()


class Hub:
    """Registry of live subscribers."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._subscribers: dict[int, Subscriber] = {}
        self.penalties = PenaltyBox()  # identities ejected for flooding (bridge_server/guard/flood_guard.py)

    def next_conn_id(self) -> int:
        return next(self._ids)

    def add(self, sub: Subscriber) -> None:
        self._subscribers[sub.conn_id] = sub

    def remove(self, sub: Subscriber) -> None:
        self._subscribers.pop(sub.conn_id, None)

    def get(self, conn_id: int) -> Subscriber | None:
        return self._subscribers.get(conn_id)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._subscribers.values()))

    def __len__(self) -> int:
        return len(self._subscribers)
