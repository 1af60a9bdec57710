"""Counters the server keeps per token, and an opt-in Prometheus text endpoint.

The counters are `bridge_server.tokens.stats.TokenStats`, fed by the token task; `status` and
`/metrics` only read them. The endpoint is a tiny HTTP/1.0 server on
trio (no dependency): `GET /metrics` answers the Prometheus text format 0.0.4, anything else 404.
It is off unless `metrics: {listen: "127.0.0.1:9447"}` is configured; bind it to loopback or a
management network, it has no authentication.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Final

import structlog
import trio

from bridge_server.observe.status import crl_status, pin_guard_state
from bridge_server.tokens import speculation
from bridge_server.view import ServerView

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES: Final = 8192
REQUEST_TIMEOUT_S: Final = 5.0


# -- rendering -------------------------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, value: float, **labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value:g}" if inner else f"{name} {value:g}"


_HELP: Final = {
    "tokenbridge_token_present": ("gauge", "1 when the token's USB device is attached"),
    "tokenbridge_token_refused_device": (
        "gauge",
        "1 while a device with another serial is plugged in where the token was (refused)",
    ),
    "tokenbridge_token_leased": ("gauge", "1 while a client holds the token's lease"),
    "tokenbridge_queue_length": ("gauge", "clients waiting for the token's lease"),
    "tokenbridge_leases_total": ("counter", "leases granted"),
    "tokenbridge_lease_ends_total": ("counter", "leases ended, by reason"),
    "tokenbridge_lease_wait_seconds_sum": ("counter", "total time clients waited before a grant"),
    "tokenbridge_lease_hold_seconds_sum": ("counter", "total time leases were held"),
    "tokenbridge_lease_hold_seconds_count": ("counter", "leases whose hold time is in the sum"),
    "tokenbridge_apdus_total": ("counter", "APDUs exchanged with the card"),
    "tokenbridge_signatures_total": ("counter", "successful private-key operations"),
    "tokenbridge_pin_guard_engaged": ("gauge", "1 while the PIN guard refuses PIN commands"),
    "tokenbridge_sessions": ("gauge", "connected client sessions"),
    "tokenbridge_audit_truncated": (
        "gauge",
        "1 when the audit log was found cut or edited behind its anchor",
    ),
    "tokenbridge_state_saved": ("gauge", "1 while the state file's last write succeeded (0: full disk?)"),
    "tokenbridge_tls_refusals_total": ("counter", "failed TLS handshakes, by reason"),
    "tokenbridge_crl_next_update_seconds": (
        "gauge",
        "seconds until the CRL in force passes next_update (negative: stale, new handshakes fail)",
    ),
    "tokenbridge_crl_stale": ("gauge", "1 once the CRL in force is past next_update (fail closed)"),
    **speculation.METRICS_HELP,  # issue 17: round trips, speculative hits, replay mismatches
}


def render(rows: Iterable[tuple[str, float, dict[str, str]]]) -> str:
    """Prometheus text format for `(metric, value, labels)` rows, grouped with HELP/TYPE."""
    grouped: dict[str, list[str]] = {}
    for name, value, labels in rows:
        grouped.setdefault(name, []).append(_line(name, value, **labels))
    out: list[str] = []
    for name, lines in grouped.items():
        kind, text = _HELP.get(name, ("untyped", name))
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


def server_rows(server: ServerView) -> list[tuple[str, float, dict[str, str]]]:

    rows: list[tuple[str, float, dict[str, str]]] = []
    for tok in server.tokens:
        t = {"token": tok.name}
        s = tok.stats
        guard = pin_guard_state(server, tok.name)
        rows += [
            ("tokenbridge_token_present", float(tok.present), t),
            ("tokenbridge_token_refused_device", float(tok.device.refused_serial is not None), t),
            ("tokenbridge_token_leased", float(tok.book.holder is not None), t),
            ("tokenbridge_queue_length", float(len(tok.book.waiting)), t),
            ("tokenbridge_leases_total", float(s.leases_total), t),
            ("tokenbridge_lease_wait_seconds_sum", s.wait_seconds_sum, t),
            ("tokenbridge_lease_hold_seconds_sum", s.hold_seconds_sum, t),
            ("tokenbridge_lease_hold_seconds_count", float(s.holds), t),
            ("tokenbridge_apdus_total", float(s.apdus_total), t),
            ("tokenbridge_signatures_total", float(s.signatures_total), t),
            ("tokenbridge_pin_guard_engaged", float(guard.get("engaged") is True), t),
        ]
        rows += [
            ("tokenbridge_lease_ends_total", float(n), {**t, "reason": r}) for r, n in s.lease_ends.items()
        ]
        rows += [(name, v, t) for name, v in speculation.metric_values(tok.spec, s.round_trips_total).items()]
    rows.append(("tokenbridge_sessions", float(len(server.hub)), {}))
    saved = {
        "audit": server.audit.available,
        "pin_guard": not server.guard_store.problem,
        "epochs": not server.epochs.problem,
    }
    rows += [("tokenbridge_state_saved", float(ok), {"file": f}) for f, ok in saved.items()]
    rows.append(("tokenbridge_audit_truncated", float(server.audit.truncated), {}))
    crl = crl_status(server, dt.datetime.now(dt.UTC))
    if crl is not None:
        rows.append(("tokenbridge_crl_next_update_seconds", float(crl["seconds_left"]), {}))
        rows.append(("tokenbridge_crl_stale", float(crl["state"] == "stale"), {}))
    for reason, n in sorted(server.tls_refusals.items()):
        rows.append(("tokenbridge_tls_refusals_total", float(n), {"reason": reason}))
    return rows


# -- HTTP --------------------------------------------------------------------------------------


def http_response(request_head: bytes, body: Callable[[], str]) -> bytes:
    """The whole HTTP/1.0 answer for a request head; `body()` renders the metrics."""
    first = request_head.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
    if len(first) < 2 or first[0] != "GET":
        return b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    if first[1].split("?", 1)[0] != "/metrics":
        return b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    payload = body().encode()
    head = (
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


async def serve_metrics(
    server: ServerView,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` until cancelled; `started()` gets the bound listeners."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("metrics.listening", addresses=[str(lst.socket.getsockname()) for lst in listeners])

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
                await stream.send_all(http_response(head, lambda: render(server_rows(server))))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
