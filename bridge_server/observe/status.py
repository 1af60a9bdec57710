"""What `tokenbridge status` shows: the stable JSON document (docs/status.md) and its table.

`build_status(server)` reads the live server (tokens, hub, TLS files) without awaiting
anything, so a status request never waits for a busy card. `render_table(doc)` is pure and
works on the JSON document alone, which is what a remote admin client receives.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Final

import trio
from cryptography import x509

from bridge_server import SERVER_SOFTWARE
from bridge_server.net.reload import crl_state
from bridge_server.tokens.manager import TokenManager
from bridge_server.view import ServerView
from protocol.display import TokenState, format_atr, format_duration

SCHEMA_VERSION: Final = 1
EXPIRY_WARNING_DAYS: Final = 30


def pin_guard_state(server: ServerView, token: str) -> dict[str, Any]:
    """The PIN guard's view of `token` (docs/status.md), or `available: False` if it cannot say."""
    try:
        state = dict(server.pin_guard.status(token))
    except Exception as exc:  # a status page must not die with the guard
        return {"available": False, "error": str(exc)[:200]}
    state.setdefault("available", True)
    return state


def token_state(present: bool, leased: bool, guard: dict[str, Any]) -> str:
    """idle / leased / guarded / locked / absent (`protocol.display.TokenState`, docs/status.md)."""
    state = TokenState.of(
        present=present, leased=leased, guarded=bool(guard.get("engaged")), locked=bool(guard.get("locked"))
    )
    return str(state)  # a plain str: the admin wire result takes JSON values only


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="seconds")


def _vid_pid(tok: TokenManager) -> str | None:
    sim = tok.simulated
    vid, pid = (
        (sim.profile.vid, sim.profile.pid)
        if sim is not None
        else (tok.config.match.vid, tok.config.match.pid)
    )
    return None if vid is None or pid is None else f"{vid:04x}:{pid:04x}"


def _token(server: ServerView, tok: TokenManager, now: float, wall: float) -> dict[str, Any]:
    holder = tok.book.holder
    guard = pin_guard_state(server, tok.name)
    held = None
    if holder is not None:
        held_s = max(0.0, now - holder.granted_at)
        held = {
            "identity": holder.identity,
            "conn_id": holder.conn_id,
            "epoch": holder.epoch,
            "since": _iso(wall - held_s),
            "held_s": round(held_s, 1),
            "apdus": holder.apdus,
            "round_trips": tok.round_trips,  # issue 17: client messages waited on in this lease
        }
    queue = [
        {"identity": name, "conn_id": conn_id, "waiting_s": None if since is None else round(now - since, 1)}
        for conn_id, name, since in tok.queue_view()
    ]
    return {
        "name": tok.name,
        "token_id": tok.token_id,
        "vid_pid": _vid_pid(tok),
        "serial": tok.snapshot()["serial"],
        # Where that serial came from (usb-serial, card-serial, card-guid, usb-port); null while absent.
        "identity_source": tok.device.card.identity_source if tok.device.card is not None else None,
        "simulated": tok.simulated is not None,
        "present": tok.present,
        "refused_device": tok.device.refused_serial,  # F5: another serial where this token was
        "atr": format_atr(tok.atr) if tok.present else "",
        "state": token_state(tok.present, holder is not None, guard),
        "holder": held,
        "queue": queue,
        "signatures_today": tok.stats.signatures_today(),
        "pin_guard": guard,
        "server_pin": tok.rails.server_pin.status(tok.rails.guard),  # issue 16: null when not configured
        # issue 17: taught paths, speculative hits, replay mismatches, round trips of ended leases
        "speculation": {**tok.spec.snapshot(), "round_trips_total": tok.stats.round_trips_total},
    }


def _expiry(subject: str, not_after: dt.datetime, now: dt.datetime) -> dict[str, Any] | None:
    days = (not_after - now).total_seconds() / 86400
    if days > EXPIRY_WARNING_DAYS:
        return None
    what = "expired" if days < 0 else f"expires in {days:.0f} day(s)"
    return {
        "subject": subject,
        "not_after": not_after.isoformat(timespec="seconds"),
        "days_left": round(days, 1),
        "message": f"{subject} {what} ({not_after:%Y-%m-%d}); renew it with `tokenbridge pki`",
    }


def crl_status(server: ServerView, now: dt.datetime) -> dict[str, Any] | None:
    """The CRL in force: next_update, seconds_left and state (fresh/expiring/stale); None without one."""
    due = server.crl_next_update
    if due is None:
        return None
    return {
        "next_update": due.isoformat(timespec="seconds"),
        "seconds_left": round((due - now).total_seconds()),
        "state": crl_state(due, now),
    }


def certificate_warnings(server: ServerView, now: dt.datetime) -> list[dict[str, Any]]:
    """Server certificate, CA and CRL near expiry or expired; connected clients' certificates too."""
    out: list[dict[str, Any]] = []
    tls = server.config.tls
    for subject, path in (("server certificate", tls.cert), ("ca certificate", tls.ca)):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            out.append(
                {
                    "subject": subject,
                    "not_after": None,
                    "days_left": None,
                    "message": f"{subject} {path} cannot be read",
                }
            )
            continue
        out.append(_expiry(f"{subject} {path.name}", cert.not_valid_after_utc, now) or {})
    crl = crl_status(server, now)
    if crl is not None and crl["state"] != "fresh":
        due = dt.datetime.fromisoformat(crl["next_update"])
        if crl["state"] == "stale":
            message = (
                f"the crl went stale at {due:%Y-%m-%d %H:%M} UTC: every new connection is refused "
                "until a fresh one is published (`tokenbridge pki crl`)"
            )
        else:
            message = f"the crl goes stale at {due:%Y-%m-%d %H:%M} UTC: run `tokenbridge pki crl` before"
        days = round(crl["seconds_left"] / 86400, 2)
        out.append({"subject": "crl", "not_after": crl["next_update"], "days_left": days, "message": message})
    for sub in server.hub:
        out.append(_expiry(f"client certificate of {sub.name}", sub.identity.not_after, now) or {})
    return [w for w in out if w]


def build_status(server: ServerView) -> dict[str, Any]:
    """The status document (schema in docs/status.md)."""
    now, wall = trio.current_time(), time.time()
    clients = [
        {
            "identity": sub.name,
            "conn_id": sub.conn_id,
            "address": sub.peer,
            "since": _iso(sub.since),
            "connected_s": round(wall - sub.since, 1),
            "rtt_ms": sub.rtt_ms,
            "admin": sub.admin,
        }
        for sub in server.hub
    ]
    return {
        "schema": SCHEMA_VERSION,
        "server": {
            "version": SERVER_SOFTWARE,
            "started_at": _iso(server.started_at),
            "uptime_s": round(wall - server.started_at, 1),
            "listen": server.listen_addresses(),
            "audit": server.audit.status(),  # docs/guardrails.md: why new leases are refused
            "crl": crl_status(server, dt.datetime.now(dt.UTC)),  # F13: stale means new handshakes fail
            "state": {"pin_guard": server.guard_store.status(), "epochs": server.epochs.status()},
        },
        "tokens": [_token(server, tok, now, wall) for tok in server.tokens],
        "clients": clients,
        "warnings": certificate_warnings(server, dt.datetime.now(dt.UTC))
        + _device_warnings(server)
        + _audit_warning(server)
        + _state_warnings(server)
        + _server_pin_warnings(server),
    }


def _server_pin_warnings(server: ServerView) -> list[dict[str, Any]]:
    """Issue 16: a server-held PIN that is missing or that the card rejected (never the PIN)."""
    out: list[dict[str, Any]] = []
    for tok in server.tokens:
        state = tok.rails.server_pin.status(tok.rails.guard)
        if state is not None and state["message"]:
            message = f"token {tok.name!r}: {state['message']}"
            out.append(
                {"subject": f"token {tok.name}", "not_after": None, "days_left": None, "message": message}
            )
    return out


def _device_warnings(server: ServerView) -> list[dict[str, Any]]:
    """F5: a different token plugged in where a configured one was (refused, never served)."""
    out: list[dict[str, Any]] = []
    for tok in server.tokens:
        other = tok.device.refused_serial
        if other is not None:
            message = (
                f"token {tok.name!r}: a different device (serial {other}) is plugged in where serial "
                f"{tok.device.serial} was; it is refused. Plug the right token back in, or if the "
                "token was replaced on purpose, set tokens[].match.serial and restart the server"
            )
            out.append(
                {"subject": f"token {tok.name}", "not_after": None, "days_left": None, "message": message}
            )
    return out


def _audit_warning(server: ServerView) -> list[dict[str, Any]]:
    audit = server.audit
    out: list[dict[str, Any]] = []
    if audit.truncated:
        message = (
            f"{audit.path} was cut or edited while the server was stopped (an audit.truncated entry "
            "records the gap); keep a copy and investigate (docs/ops.md)"
        )
        out.append({"subject": "audit log", "not_after": None, "days_left": None, "message": message})
    if not audit.available:
        message = f"{audit.problem}; new leases are refused until it is writable (retried every second)"
        out.append({"subject": "audit log", "not_after": None, "days_left": None, "message": message})
    return out


def _state_warnings(server: ServerView) -> list[dict[str, Any]]:
    """docs/ops.md "A full state disk": what could not be saved and what that means now."""
    out: list[dict[str, Any]] = []
    if server.guard_store.problem:
        message = f"{server.guard_store.problem}; PIN commands are refused until it can be saved"
        out.append({"subject": "PIN guard state", "not_after": None, "days_left": None, "message": message})
    if server.epochs.problem:
        message = f"{server.epochs.problem}; a restart now could reuse lease epochs of this run"
        out.append({"subject": "lease epochs", "not_after": None, "days_left": None, "message": message})
    return out


# -- table -------------------------------------------------------------------------------------


def _guard_text(guard: dict[str, Any]) -> str:
    if not guard.get("available"):
        return "n/a"
    return str(guard.get("summary") or ("engaged" if guard.get("engaged") else "ok"))


def render_table(doc: dict[str, Any]) -> str:
    """The human view of a status document."""
    srv = doc["server"]
    lines = [
        f"server   {srv['version']}  up {format_duration(srv['uptime_s'])}  "
        f"listening on {', '.join(srv['listen']) or '-'}",
        "",
        f"{'TOKEN':<14} {'VID:PID':<10} {'SERIAL':<14} {'STATE':<8} {'HOLDER':<24} {'QUEUE':<28} "
        f"{'SIGS':>4}  {'PIN GUARD':<10} ATR",
    ]
    for t in doc["tokens"]:
        h = t["holder"]
        holder = f"{h['identity']} ({format_duration(h['held_s'])})" if h else "-"
        queue = ", ".join(f"{q['identity']} ({format_duration(q['waiting_s'])})" for q in t["queue"]) or "-"
        lines.append(
            f"{t['name']:<14} {t['vid_pid'] or '-':<10} {t['serial'] or '-':<14} {t['state']:<8} "
            f"{holder:<24} "
            f"{queue:<28} {t['signatures_today']:>4}  {_guard_text(t['pin_guard']):<10} {t['atr'] or '-'}"
        )
    lines += ["", f"{'CLIENT':<24} {'ADDRESS':<22} {'CONNECTED':<10} {'RTT':>8}"]
    for c in doc["clients"]:
        rtt = "-" if c["rtt_ms"] is None else f"{c['rtt_ms']:.1f}ms"
        role = " (admin)" if c["admin"] else ""
        lines.append(
            f"{c['identity'] + role:<24} {c['address']:<22} {format_duration(c['connected_s']):<10} {rtt:>8}"
        )
    if not doc["clients"]:
        lines.append("(none)")
    for w in doc["warnings"]:
        lines.append(f"WARNING: {w['message']}")
    return "\n".join(lines)
