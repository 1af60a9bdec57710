"""The status document's pure parts: token state, the table, certificate expiry warnings."""

from __future__ import annotations

import datetime as dt

from bridge_server.observe.status import _expiry, render_table, token_state
from bridge_server.tokens.stats import TokenStats


def test_token_state_orders_absent_locked_guarded_leased_idle() -> None:
    assert token_state(False, True, {"engaged": True}) == "absent"
    assert token_state(True, True, {"engaged": True, "locked": True}) == "locked"
    assert token_state(True, False, {"engaged": True}) == "guarded"
    assert token_state(True, True, {"available": False}) == "leased"
    assert token_state(True, False, {}) == "idle"


def _doc() -> dict[str, object]:
    return {
        "schema": 1,
        "server": {"version": "tokenbridge-server/0.1.0", "uptime_s": 3725.0, "listen": ["0.0.0.0:7447"]},
        "tokens": [
            {
                "name": "codesign", "vid_pid": "0529:0620", "serial": "0A1B2C3D", "present": True,
                "atr": "3bff", "state": "leased", "signatures_today": 12,
                "holder": {"identity": "build-vm-01", "held_s": 75.0},
                "queue": [{"identity": "build-vm-02", "waiting_s": 12.0}],
                "pin_guard": {"available": True, "engaged": False},
            }
        ],
        "clients": [{"identity": "build-vm-01", "address": "10.0.0.7:51234", "connected_s": 90.0,
                     "rtt_ms": 1.25, "admin": False}],
        "warnings": [{"message": "server certificate localhost.pem expires in 9 day(s) (2026-12-05)"}],
    }  # fmt: skip


def test_table_shows_holder_queue_and_warnings() -> None:
    table = render_table(_doc())
    assert "up 1h02m" in table
    row = next(line for line in table.splitlines() if line.startswith("codesign"))
    for part in ("0529:0620", "0A1B2C3D", "leased", "build-vm-01 (1m15s)", "build-vm-02 (12s)", "12", "ok"):
        assert part in row
    assert "10.0.0.7:51234" in table and "1.2ms" in table
    assert "WARNING: server certificate localhost.pem expires in 9 day(s)" in table


def test_expiry_warns_within_30_days_only() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert _expiry("x", now + dt.timedelta(days=31), now) is None
    soon = _expiry("x", now + dt.timedelta(days=3), now)
    assert soon is not None and soon["days_left"] == 3.0
    gone = _expiry("x", now - dt.timedelta(days=1), now)
    assert gone is not None and "expired" in gone["message"]


def test_only_successful_unchained_general_authenticate_counts_as_a_signature() -> None:
    stats = TokenStats()
    day = dt.date(2026, 1, 1)
    stats.apdu(bytes.fromhex("00870780"), b"\x90\x00", today=day)
    stats.apdu(bytes.fromhex("10870780"), b"\x90\x00", today=day)  # chained: not the last link
    stats.apdu(bytes.fromhex("00870780"), b"\x69\x82", today=day)  # refused
    stats.apdu(bytes.fromhex("00A40400"), b"\x90\x00", today=day)
    assert (stats.apdus_total, stats.signatures_total) == (4, 1)
    assert stats.signatures_today(today=day) == 1
    assert stats.signatures_today(today=day + dt.timedelta(days=1)) == 0
