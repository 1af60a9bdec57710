"""The server's Prometheus metrics: one table, read from a `ServerView` at each scrape.

The counters are `bridge_server.tokens.stats.TokenStats` (fed by the token task) and the
server's parts; this module only reads them (protocol/runtime/metrics.py has the theory). The
endpoint is off unless `metrics: {listen: "127.0.0.1:9447"}` is configured; bind it to loopback
or a management network, it has no authentication.

To add a metric: one row in `SERVER_METRICS` below and one line in docs/status.md ("Metrics");
`tests/bridge_server/test_metrics.py` holds the two to each other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from cryptography import x509
from prometheus_client import CollectorRegistry

from bridge_server.net.reload import ReloadOutcome
from bridge_server.observe.status import crl_status, pin_guard_state
from bridge_server.tokens.manager import TokenManager
from bridge_server.view import ServerView
from protocol.runtime.cli import package_version
from protocol.runtime.metrics import (
    Metric,
    TableCollector,
    Value,
    counter,
    gauge,
    histogram,
    new_registry,
    samples,
)
from protocol.vocabulary import LeaseEndReason

__all__ = ["SERVER_METRICS", "server_registry", "server_rows"]

Rows = Iterable[tuple[Sequence[str], Value]]
TOKEN: Final = ("token",)


def per_token(read: Callable[[ServerView, TokenManager], Value]) -> Callable[[ServerView], Rows]:
    """One series per configured token, present (at 0) from the start."""
    return lambda s: [((t.name,), read(s, t)) for t in s.tokens]


def single(read: Callable[[ServerView], Value]) -> Callable[[ServerView], Rows]:
    return lambda s: [((), read(s))]


def _lease_ends(s: ServerView) -> Rows:
    """Every documented reason for every token, so a rate() works before the first one happens."""
    return [
        ((t.name, str(reason)), t.stats.lease_ends[str(reason)])
        for t in s.tokens
        for reason in LeaseEndReason
    ]


def _server_pin_ok(s: ServerView) -> Rows:
    """Issue 16: one series per token that has a server-held PIN configured."""
    rows: list[tuple[Sequence[str], Value]] = []
    for t in s.tokens:
        state = t.rails.server_pin.status(t.rails.guard)
        if state is not None:
            rows.append(((t.name,), state["state"] == "configured"))
    return rows


def _state_saved(s: ServerView) -> Rows:
    saved = {
        "audit": s.audit.available,
        "pin_guard": not s.guard_store.problem,
        "epochs": not s.epochs.problem,
    }
    return [((name,), ok) for name, ok in saved.items()]


def _crl(s: ServerView) -> dict[str, float] | None:
    crl = crl_status(s, dt.datetime.now(dt.UTC))
    if crl is None or s.crl_next_update is None:
        return None
    return {
        "seconds_left": float(crl["seconds_left"]),
        "stale": float(crl["state"] == "stale"),
        "timestamp": s.crl_next_update.timestamp(),
    }


def _crl_value(key: str) -> Callable[[ServerView], Rows]:
    def read(s: ServerView) -> Rows:
        crl = _crl(s)
        return [] if crl is None else [((), crl[key])]

    return read


def _certificate_expiry(s: ServerView) -> Rows:
    """`not_after` of the server and CA certificates on disk (what the next reload would load)."""
    rows: list[tuple[Sequence[str], Value]] = []
    for which, path in (("server", s.config.tls.cert), ("ca", s.config.tls.ca)):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue  # status names the unreadable file; no sample beats a wrong one
        rows.append(((which,), cert.not_valid_after_utc.timestamp()))
    return rows


def _reloads(read: Callable[[ReloadOutcome], Value]) -> Callable[[ServerView], Rows]:
    return lambda s: [(("config",), read(s.config_reload)), (("tls",), read(s.tls_reload))]


# fmt: off
SERVER_METRICS: Final[tuple[Metric[ServerView], ...]] = (
    gauge("tokenbridge_token_present", "1 when the token's USB device is attached", TOKEN,
          per_token(lambda s, t: t.present)),
    gauge("tokenbridge_token_refused_device",
          "1 while a device with another serial is plugged in where the token was (refused)", TOKEN,
          per_token(lambda s, t: t.device.refused_serial is not None)),
    gauge("tokenbridge_token_leased", "1 while a client holds the token's lease", TOKEN,
          per_token(lambda s, t: t.book.holder is not None)),
    gauge("tokenbridge_queue_length", "clients waiting for the token's lease", TOKEN,
          per_token(lambda s, t: len(t.book.waiting))),
    counter("tokenbridge_leases_total", "leases granted", TOKEN,
            per_token(lambda s, t: t.stats.leases_total)),
    counter("tokenbridge_lease_ends_total", "leases ended, by reason (docs/protocol.md §5.3)",
            ("token", "reason"), _lease_ends),
    histogram("tokenbridge_lease_wait_seconds", "time from a lease request to its grant", TOKEN,
              per_token(lambda s, t: t.stats.wait_seconds)),
    histogram("tokenbridge_lease_hold_seconds", "time from a lease grant to its end", TOKEN,
              per_token(lambda s, t: t.stats.hold_seconds)),
    counter("tokenbridge_apdus_total", "APDUs exchanged with the card", TOKEN,
            per_token(lambda s, t: t.stats.apdus_total)),
    counter("tokenbridge_signatures_total",
            "successful private-key signing operations (PIV GENERAL AUTHENTICATE, PSO COMPUTE DIGITAL "
            "SIGNATURE)", TOKEN, per_token(lambda s, t: t.stats.signatures_total)),
    gauge("tokenbridge_pin_guard_engaged", "1 while the PIN guard refuses PIN commands", TOKEN,
          per_token(lambda s, t: pin_guard_state(s, t.name).get("engaged") is True)),
    gauge("tokenbridge_server_pin_ok", "1 while a token's server-held PIN is loaded and not rejected", TOKEN,
          _server_pin_ok),
    # issue 17: round trips per lease = round_trips_total / lease_hold_seconds_count
    counter("tokenbridge_round_trips_total",
            "client messages waited on in ended leases (lease request or LeaseExchange, CCID frames)", TOKEN,
            per_token(lambda s, t: t.stats.round_trips_total)),
    counter("tokenbridge_speculative_hits_total",
            "deferred APDUs answered on the client and confirmed by replay on the card", TOKEN,
            per_token(lambda s, t: t.spec.hits)),
    counter("tokenbridge_replay_mismatches_total",
            "replays that found another answer: leases ended card_changed", TOKEN,
            per_token(lambda s, t: t.spec.mismatches)),
    counter("tokenbridge_prefetched_total", "GET RESPONSEs the server ran ahead of the client", TOKEN,
            per_token(lambda s, t: t.spec.prefetched)),
    gauge("tokenbridge_sessions", "connected client sessions", (), single(lambda s: len(s.hub))),
    gauge("tokenbridge_state_saved", "1 while the state file's last write succeeded (0: full disk?)",
          ("file",), _state_saved),
    gauge("tokenbridge_audit_truncated", "1 when the audit log was found cut or edited behind its anchor",
          (), single(lambda s: s.audit.truncated)),
    counter("tokenbridge_tls_refusals_total", "failed TLS handshakes, by reason", ("reason",),
            lambda s: [((reason,), n) for reason, n in sorted(s.tls_refusals.items())]),
    gauge("tokenbridge_certificate_expiry_timestamp_seconds",
          "not_after of the server and CA certificate files (unix time)", ("certificate",),
          _certificate_expiry),
    gauge("tokenbridge_crl_next_update_timestamp_seconds", "next_update of the CRL in force (unix time)",
          (), _crl_value("timestamp")),
    gauge("tokenbridge_crl_next_update_seconds",
          "seconds until the CRL in force passes next_update (negative: stale, new handshakes fail)",
          (), _crl_value("seconds_left")),
    gauge("tokenbridge_crl_stale", "1 once the CRL in force is past next_update (fail closed)", (),
          _crl_value("stale")),
    gauge("tokenbridge_reload_successful", "1 when the last reload (config or tls) succeeded", ("what",),
          _reloads(lambda o: o.ok)),
    gauge("tokenbridge_reload_last_success_timestamp_seconds",
          "when config or tls last loaded successfully (unix time; the start counts)", ("what",),
          _reloads(lambda o: o.success_at)),
)
# fmt: on


def server_registry(server: ServerView) -> CollectorRegistry:
    """The registry one server instance serves on /metrics (its own, not the process default)."""
    return new_registry(
        TableCollector(SERVER_METRICS, server), prefix="tokenbridge", version=package_version()
    )


def server_rows(server: ServerView) -> list[tuple[str, float, dict[str, str]]]:
    """The server's own samples (no process metrics) as `(name, value, labels)`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TableCollector(SERVER_METRICS, server))
    return samples(registry)
