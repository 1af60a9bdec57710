"""The Prometheus endpoint: text format, and a live server's counters."""

from __future__ import annotations

from pathlib import Path

import trio
from admin_fixtures import Certs, connect, expect, running

from bridge_server.observe.metrics import http_response, render
from protocol import wire


def test_render_groups_samples_under_help_and_type() -> None:
    text = render([("tokenbridge_leases_total", 3, {"token": 'a"b'}), ("tokenbridge_sessions", 2, {})])
    assert text.splitlines() == [
        "# HELP tokenbridge_leases_total leases granted",
        "# TYPE tokenbridge_leases_total counter",
        'tokenbridge_leases_total{token="a\\"b"} 3',
        "# HELP tokenbridge_sessions connected client sessions",
        "# TYPE tokenbridge_sessions gauge",
        "tokenbridge_sessions 2",
    ]


def test_only_get_metrics_is_served() -> None:
    assert http_response(b"GET /metrics HTTP/1.1\r\n\r\n", lambda: "x\n").startswith(b"HTTP/1.0 200 OK")
    assert http_response(b"GET / HTTP/1.1\r\n\r\n", lambda: "x\n").startswith(b"HTTP/1.0 404")
    assert http_response(b"POST /metrics HTTP/1.1\r\n\r\n", lambda: "x\n").startswith(b"HTTP/1.0 405")


async def _scrape(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        buf = b""
        while chunk := await stream.receive_some(65536):
            buf += chunk
    return buf.decode()


async def test_live_server_exports_leases_presence_and_tls_refusals(tmp_path: Path) -> None:
    certs = Certs(tmp_path)

    with trio.fail_after(30):
        async with running(tmp_path, extra={"metrics": {"listen": "127.0.0.1:0"}}) as (srv, port):
            mport = srv.metrics_listeners[0].socket.getsockname()[1]
            async with connect(certs, port, "build-vm-01") as c:
                await c.send(wire.LeaseRequest(token_id=0))
                await expect(c, wire.LeaseGranted)
                leased = await _scrape(mport)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n")
            await tcp.receive_some(100)
            await tcp.aclose()
            for _ in range(100):
                if "tokenbridge_tls_refusals_total" in (after := await _scrape(mport)):
                    break
                await trio.sleep(0.05)

    assert 'tokenbridge_token_present{token="codesign"} 1' in leased
    assert 'tokenbridge_token_leased{token="codesign"} 1' in leased
    assert 'tokenbridge_leases_total{token="codesign"} 1' in leased
    assert 'tokenbridge_tls_refusals_total{reason="not tls (the peer sent http)"} 1' in after
