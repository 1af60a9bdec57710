"""F13 / P1: the CRL goes stale while the server runs (issue 18 item 3).

Warned ahead (log, status, metric), fail closed once `next_update` has passed (OpenSSL checks
the CRL's validity period at every handshake because the context sets VERIFY_CRL_CHECK_LEAF),
and back in service as soon as a fresh CRL file appears (the file watcher reloads it).

OpenSSL reads the wall clock, which a test cannot move; so the "CRL loaded while fresh, now
past next_update" state is made by loading an already expired CRL while `server_context`'s own
staleness check is told it is an hour earlier: the context then holds exactly what a long
running server would hold once the hour has passed. The reloader's own clock is injected.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from inproc import wait_until
from pki_server import bundle_context, make_pki, make_server

import protocol.runtime.tls as tls_module
from bridge_admin.pki import Pki
from bridge_server.app import BridgeServer
from bridge_server.net.hub import Hub
from bridge_server.net.reload import CRL_WARNING_S, POLL_INTERVAL_S, TlsReloader, crl_state
from bridge_server.observe.metrics import server_rows
from bridge_server.observe.status import build_status
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.runtime.framed import FramedConnection


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def write_crl(pki: Pki, *, last: dt.datetime, next_: dt.datetime) -> None:
    ca_cert, ca_key = pki._ca()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last)
        .next_update(next_)
        .sign(ca_key, hashes.SHA256())
    )
    pki.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


async def connect(pki: Pki, port: int) -> bool:
    """True when the server welcomes build-vm-01; False when it refuses the handshake."""
    ctx = bundle_context(pki, "build-vm-01")
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
        first = await FramedConnection(stream, BridgeConnection(Role.CLIENT)).receive()
        return isinstance(first, wire.Welcome)
    except trio.BrokenResourceError:  # TLS 1.3: the server's refusal shows on the first read
        return False
    finally:
        await trio.aclose_forcefully(stream)


def metric(server: BridgeServer, name: str) -> float:
    values = [v for n, v, _ in server_rows(server) if n == name]
    assert len(values) == 1, (name, values)
    return values[0]


class _Earlier(dt.datetime):
    """`datetime` for `server_context`'s staleness check only: an hour and a half ago."""

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return utcnow() - dt.timedelta(minutes=90)


# -- the state and the warning, with the clock injected ------------------------------------------


def test_crl_state_warns_a_week_ahead_and_is_stale_from_next_update_on() -> None:
    now = utcnow()
    due = now + dt.timedelta(hours=24)
    assert crl_state(due, due - dt.timedelta(seconds=CRL_WARNING_S + 1)) == "fresh"
    assert crl_state(due, due - dt.timedelta(seconds=CRL_WARNING_S)) == "expiring"
    assert crl_state(due, now) == "expiring"  # the alert fires at least 24 h before
    assert crl_state(due, due - dt.timedelta(seconds=1)) == "expiring"
    assert crl_state(due, due) == "stale"
    assert crl_state(None, now) == "fresh"


def test_reloader_logs_expiring_then_expired_once_each_as_its_clock_passes_next_update(
    tmp_path: Path,
) -> None:
    now = utcnow()
    pki = make_pki(tmp_path)
    write_crl(pki, last=now - dt.timedelta(minutes=5), next_=now + dt.timedelta(seconds=5))
    clock = [now]
    reloader = TlsReloader(make_server(tmp_path).config.tls, Hub(), clock=lambda: clock[0])
    reloader.current()
    assert reloader.crl_next_update == now + dt.timedelta(seconds=5)
    with structlog.testing.capture_logs() as logs:
        assert reloader.check_crl() == "expiring"
        assert reloader.check_crl() == "expiring"
        clock[0] = now + dt.timedelta(seconds=5)
        assert reloader.crl_seconds_left() == 0
        assert reloader.check_crl() == "stale"
        assert reloader.check_crl() == "stale"
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("crl.expiring", "warning"), ("crl.expired", "error")]
    assert "tokenbridge pki crl" in logs[1]["reason"]


async def test_the_file_watcher_checks_the_crl_at_every_poll(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    now = utcnow()
    pki = make_pki(tmp_path)
    write_crl(pki, last=now - dt.timedelta(minutes=5), next_=now + dt.timedelta(seconds=30))
    clock = [now]
    reloader = TlsReloader(make_server(tmp_path).config.tls, Hub(), clock=lambda: clock[0])
    reloader.current()
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(reloader.watch)
            await trio.sleep(POLL_INTERVAL_S * 1.5)
            clock[0] = now + dt.timedelta(seconds=30)
            await trio.sleep(POLL_INTERVAL_S)
            nursery.cancel_scope.cancel()
    assert [e["event"] for e in logs] == ["crl.expiring", "crl.expired"]


# -- through the real server ----------------------------------------------------------------------


async def test_status_and_metrics_warn_while_the_crl_is_days_from_stale(tmp_path: Path) -> None:
    now = utcnow()
    pki = make_pki(tmp_path)
    write_crl(pki, last=now - dt.timedelta(minutes=5), next_=now + dt.timedelta(days=2))
    server = make_server(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        doc = build_status(server)
        left = metric(server, "tokenbridge_crl_next_update_seconds")
        stale = metric(server, "tokenbridge_crl_stale")
        server.request_shutdown()
    assert doc["server"]["crl"]["state"] == "expiring"
    assert [w["subject"] for w in doc["warnings"]] == ["crl"]
    assert "tokenbridge pki crl" in doc["warnings"][0]["message"]
    assert 2 * 86400 - 60 < left <= 2 * 86400
    assert stale == 0


async def test_a_crl_past_next_update_refuses_new_clients_until_a_fresh_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    pki = make_pki(tmp_path)
    write_crl(pki, last=now - dt.timedelta(hours=2), next_=now - dt.timedelta(hours=1))
    server = make_server(tmp_path)
    monkeypatch.setattr(tls_module, "datetime", _Earlier)  # loaded "while still fresh"
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        monkeypatch.undo()
        with trio.fail_after(20):
            with structlog.testing.capture_logs() as logs:
                assert server.reloader.check_crl() == "stale"
                assert await connect(pki, port) is False  # fail closed
            refusals = dict(server.tls_refusals)
            doc = build_status(server)
            stale_metric = metric(server, "tokenbridge_crl_stale")
            left = metric(server, "tokenbridge_crl_next_update_seconds")
            pki.write_crl()  # a fresh CRL: the watcher reloads it within a poll or two
            await wait_until(lambda: server.reloader.reloads == 1, what="the crl reload", within=5)
            assert await connect(pki, port) is True
            fresh = build_status(server)["server"]["crl"]["state"]
            fresh_metric = metric(server, "tokenbridge_crl_stale")
        server.request_shutdown()
    assert refusals == {"crl expired (publish a fresh crl)": 1}
    assert [e["event"] for e in logs if e["event"].startswith("crl.")] == ["crl.expired"]
    assert doc["server"]["crl"]["state"] == "stale"
    assert "every new connection is refused" in " ".join(w["message"] for w in doc["warnings"])
    assert (stale_metric, fresh_metric) == (1, 0)
    assert -3600 - 60 < left <= -3600
    assert fresh == "fresh"


def test_openssl_itself_refuses_a_client_once_the_loaded_crl_is_past_next_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fail-closed part does not depend on our poll: the verification itself fails."""
    now = utcnow()
    pki = make_pki(tmp_path)
    write_crl(pki, last=now - dt.timedelta(hours=2), next_=now - dt.timedelta(hours=1))
    tls = make_server(tmp_path).config.tls
    monkeypatch.setattr(tls_module, "datetime", _Earlier)
    ctx = tls_module.server_context(ca=tls.ca, cert=tls.cert, key=tls.key, crl=tls.crl)
    monkeypatch.undo()
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    client = bundle_context(pki, "build-vm-01")
    error = _handshake_error(ctx, client)
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert tls_module.describe_handshake_error(error) == "crl expired (publish a fresh crl)"


def _handshake_error(server: ssl.SSLContext, client: ssl.SSLContext) -> BaseException | None:
    """Run a memory-BIO handshake; the server's exception, if any."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):
        for end in (cli, srv):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if end is srv:
                    return exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return None


async def test_a_crl_file_that_disappears_keeps_the_loaded_one_in_force_and_says_so(tmp_path: Path) -> None:
    """F13 "missing CRL": the reload fails loudly, the CRL already loaded stays in force (with
    its own next_update, after which new handshakes fail as above)."""
    now = utcnow()
    pki = make_pki(tmp_path)
    write_crl(pki, last=now - dt.timedelta(minutes=5), next_=now + dt.timedelta(days=2))
    server = make_server(tmp_path)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(20):
            due = server.reloader.crl_next_update
            pki.crl_path.unlink()
            with structlog.testing.capture_logs() as logs:
                assert server.reload_tls() is False
            assert await connect(pki, port) is True
            after = server.reloader.crl_next_update
        server.request_shutdown()
    failed = [e for e in logs if e["event"] == "tls.reload_failed"]
    assert failed and failed[0]["log_level"] == "error" and "not found" in failed[0]["error"]
    assert after == due == now + dt.timedelta(days=2)
