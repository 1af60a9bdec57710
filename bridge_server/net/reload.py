"""Reload TLS material (CRL, certificate, key, CA) without a restart, and drop revoked sessions.

`TlsReloader` owns the server's current `ssl.SSLContext`. `reload()` builds a fresh context
from the configured files; if that fails (a half-written CRL, a key that does not match) the
old context stays in force and the failure is logged loudly (`tls.reload_failed`), so a bad
file never takes the server off the air. New handshakes use the new context at once (the
listener asks for the context per connection). After a successful reload every live session
whose certificate serial is on the new CRL is told `Goodbye(REVOKED)` and closed.

`watch()` polls the files' mtimes every `POLL_INTERVAL_S` (inotify would be a dependency and
misses atomic renames on some file systems); SIGHUP calls `BridgeServer.reload_tls()` directly.

The CRL in force ages while the server runs (F13). `crl_next_update` is the loaded CRL's
`next_update`; each poll `check_crl()` compares it with the clock and logs once per change:
`crl.expiring` (warning, from `CRL_WARNING_S` before) and `crl.expired` (error). Past
`next_update`, OpenSSL itself refuses every new handshake (`VERIFY_CRL_CHECK_LEAF` checks the
CRL's validity period at each verification: "crl expired" in the refusal counters), so the
server fails closed; a fresh CRL file is picked up by the watcher and handshakes resume. Status
and metrics show the same state (`tokenbridge_crl_next_update_seconds`, `tokenbridge_crl_stale`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
import trio
from cryptography import x509

from bridge_server.config import TlsConfig
from bridge_server.net.hub import Hub
from protocol import wire
from protocol.errors import CloseCode, TlsSetupError
from protocol.runtime.tls import server_context

log = structlog.get_logger(__name__)

POLL_INTERVAL_S: Final = 1.0
REVOKED_REASON: Final = "certificate_revoked"
FAREWELL_S: Final = 2.0  # how long a revoked session's Goodbye may take before the session is cut
CRL_WARNING_S: Final = 7 * 86400.0  # warn a week ahead: `tokenbridge pki crl` re-signs it


def crl_next_update(crl_path: Path | None) -> datetime | None:
    """The CRL's `next_update` (None without a CRL, without the field, or when unreadable)."""
    if crl_path is None:
        return None
    try:
        return x509.load_pem_x509_crl(crl_path.read_bytes()).next_update_utc
    except (OSError, ValueError):
        return None


def crl_state(next_update: datetime | None, now: datetime) -> str:
    """`fresh`, `expiring` (within `CRL_WARNING_S`) or `stale` (past next_update; fail closed)."""
    if next_update is None:
        return "fresh"
    left = (next_update - now).total_seconds()
    if left <= 0:
        return "stale"
    return "expiring" if left <= CRL_WARNING_S else "fresh"


def revoked_serials(crl_path: Path | None) -> frozenset[int]:
    """Serial numbers on the CRL (empty without one or when unreadable)."""
    if crl_path is None:
        return frozenset()
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError):
        return frozenset()
    return frozenset(r.serial_number for r in crl)


def _mtimes(paths: list[Path]) -> tuple[float | None, ...]:
    out: list[float | None] = []
    for p in paths:
        try:
            out.append(p.stat().st_mtime_ns)
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass
class ReloadOutcome:
    """The last reload of one kind (TLS files here, the config in `service.reload_service`), for
    /metrics: `ok` whether the last attempt succeeded, `success_at` the wall time of the last
    success (the start counts as the first)."""

    success_at: float
    ok: bool = True
    attempts: int = 0

    def record(self, ok: bool, wall: float) -> None:
        self.attempts += 1
        self.ok = ok
        if ok:
            self.success_at = wall


class TlsReloader:
    """The current server context, rebuilt on demand from `tls`."""

    def __init__(
        self,
        tls: TlsConfig,
        hub: Hub,
        *,
        context: ssl.SSLContext | None = None,
        build: Callable[[TlsConfig], ssl.SSLContext] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.tls = tls
        self.hub = hub
        self._build = build or (lambda t: server_context(ca=t.ca, cert=t.cert, key=t.key, crl=t.crl))
        self._fixed = context is not None  # a context handed in by a test is never rebuilt
        self._context = context
        self.reloads = 0
        self._seen = _mtimes(self.paths)
        self.clock = clock
        self.outcome = ReloadOutcome(success_at=clock().timestamp())  # for /metrics
        self.crl_next_update: datetime | None = None  # of the CRL in the context in force
        self._crl_state = "fresh"

    @property
    def paths(self) -> list[Path]:
        return [p for p in (self.tls.ca, self.tls.cert, self.tls.key, self.tls.crl) if p is not None]

    def current(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = self._build(self.tls)  # first build: errors propagate (startup fails)
            self.crl_next_update = crl_next_update(self.tls.crl)
        return self._context

    def reload(self) -> bool:
        """Rebuild the context; keep the old one on failure. Then drop revoked sessions."""
        self._seen = _mtimes(self.paths)
        if self._fixed:
            return False
        try:
            fresh = self._build(self.tls)
        except (TlsSetupError, OSError, ssl.SSLError, ValueError) as exc:
            self.outcome.record(False, self.clock().timestamp())
            log.error(
                "tls.reload_failed",
                error=str(exc),
                reason="the previous certificates and crl stay in force; fix the file and it reloads",
            )
            return False
        self._context = fresh
        self.crl_next_update = crl_next_update(self.tls.crl)
        self.reloads += 1
        self.outcome.record(True, self.clock().timestamp())
        self.check_crl()
        dropped = self.drop_revoked()
        log.info("tls.reloaded", files=[str(p) for p in self.paths], dropped_sessions=dropped)
        return True

    def drop_revoked(self) -> int:
        """Close every session whose certificate serial is on the CRL; returns how many."""
        revoked = revoked_serials(self.tls.crl)
        dropped = 0
        for sub in self.hub:
            if sub.cert_serial is not None and sub.cert_serial in revoked:
                log.warning("session.revoked", conn_id=sub.conn_id, client_id=sub.name, reason=REVOKED_REASON)
                # S3: the Goodbye must reach the client before the session ends (a close() here
                # would cancel the writer first); the lease ends `revoked` (session.py).
                goodbye = wire.Goodbye(code=CloseCode.REVOKED, reason="certificate revoked")
                sub.farewell(goodbye, REVOKED_REASON, grace_s=FAREWELL_S)
                dropped += 1
        return dropped

    def crl_seconds_left(self) -> float | None:
        """Seconds until the CRL in force goes stale (negative once it has); None without one."""
        if self.crl_next_update is None:
            return None
        return (self.crl_next_update - self.clock()).total_seconds()

    def check_crl(self) -> str:
        """The CRL's state now; logs `crl.expiring` / `crl.expired` / `crl.fresh` once per change."""
        state = crl_state(self.crl_next_update, self.clock())
        if state != self._crl_state:
            self._crl_state = state
            due = self.crl_next_update.isoformat() if self.crl_next_update else None
            if state == "stale":
                log.error(
                    "crl.expired", crl=str(self.tls.crl), next_update=due,
                    reason="every new connection is refused until a fresh crl is published "
                    "(`tokenbridge pki crl`); connected clients stay",
                )  # fmt: skip
            elif state == "expiring":
                log.warning(
                    "crl.expiring", crl=str(self.tls.crl), next_update=due,
                    seconds_left=round(self.crl_seconds_left() or 0.0),
                    reason="re-sign it with `tokenbridge pki crl` before then or new connections are refused",
                )  # fmt: skip
            else:
                log.info("crl.fresh", crl=str(self.tls.crl), next_update=due)
        return state

    def changed(self) -> bool:
        return _mtimes(self.paths) != self._seen

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload whenever a file's mtime changes (checked every `POLL_INTERVAL_S`)."""
        task_status.started()
        while True:
            await trio.sleep(POLL_INTERVAL_S)
            if self.changed():
                log.info("tls.files_changed", files=[str(p) for p in self.paths])
                self.reload()
            self.check_crl()
