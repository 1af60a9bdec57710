"""The read-only view of a running server that status, metrics and admin take.

`BridgeServer` (bridge_server/app.py) implements it; the consumers import this module instead
of the server, so the dependencies point one way: app -> admin/status/metrics -> view -> the
parts (tokens, hub, audit, PIN guard, epochs). Tests hand in small fakes that have these fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from bridge_server.config import ServerConfig
from bridge_server.guard.audit import AuditLog
from bridge_server.guard.pin_guard import PinGuard, PinGuardStore
from bridge_server.net.hub import Hub
from bridge_server.net.reload import ReloadOutcome
from bridge_server.tokens.epochs import EpochStore
from bridge_server.tokens.manager import TokenManager


class ServerView(Protocol):
    """What a running server shows (all read-only) and the one action the admin asks of it."""

    @property
    def config(self) -> ServerConfig: ...

    @property
    def started_at(self) -> float:
        """Wall-clock start time (seconds since the epoch)."""

    @property
    def tokens(self) -> Sequence[TokenManager]: ...

    @property
    def hub(self) -> Hub:
        """The connected sessions (iterate for `Subscriber`s)."""

    @property
    def audit(self) -> AuditLog: ...

    @property
    def pin_guard(self) -> PinGuard: ...

    @property
    def guard_store(self) -> PinGuardStore: ...

    @property
    def epochs(self) -> EpochStore: ...

    @property
    def tls_refusals(self) -> Mapping[str, int]:
        """Handshakes refused since start, by reason."""

    @property
    def crl_next_update(self) -> datetime | None:
        """`next_update` of the CRL in force (None without a CRL); past it, handshakes fail."""

    @property
    def config_reload(self) -> ReloadOutcome:
        """The last SIGHUP's config reload (the start counts as a success)."""

    @property
    def tls_reload(self) -> ReloadOutcome:
        """The last reload of certificate, key and CRL (SIGHUP or a file change)."""

    def listen_addresses(self) -> list[str]: ...

    def reset_pin_guard(self, token: str, actor: str) -> dict[str, Any]:
        """Clear `token`'s PIN guard (persisted, audited); raises KeyError for an unknown token."""
