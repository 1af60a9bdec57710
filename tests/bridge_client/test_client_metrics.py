"""The client's /metrics: series per reader from the start, lease waits observed with virtual
time, a real scrape parsed by prometheus_client, and the documented names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio
import trio.testing
from client_fakes import ATR, Certs, open_tunnel
from prometheus_client.parser import text_string_to_metric_families
from test_client_status import connected_app, make_app
from test_vpcd_link import SELECT, answer_next, inserted, start_link

from bridge_client.app import ClientApp
from bridge_client.config import load_client_config
from bridge_client.metrics import CLIENT_METRICS, client_rows
from protocol import ccid, wire
from protocol.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def values(rows: list[tuple[str, float, dict[str, str]]]) -> dict[tuple[str, str | None], float]:
    return {
        (n, lab.get("token") if "le" not in lab else f"{lab.get('token')}/le={lab['le']}"): v
        for n, v, lab in rows
    }


def test_every_reader_has_its_series_from_the_start(certs: Certs, tmp_path: Path) -> None:
    v = values(client_rows(make_app(certs, tmp_path)))  # never connected
    assert v[("tokenbridge_client_tunnel_up", None)] == 0
    assert v[("tokenbridge_client_tunnel_connects_total", None)] == 0
    for token in ("codesign", "spare"):
        assert v[("tokenbridge_client_apdus_total", token)] == 0
        assert v[("tokenbridge_client_lease_wait_seconds_count", token)] == 0
        assert v[("tokenbridge_client_lease_wait_seconds_bucket", f"{token}/le=+Inf")] == 0
        assert v[("tokenbridge_client_card_inserted", token)] == 0
    assert ("tokenbridge_client_tunnel_rtt_seconds", None) not in v  # no sample beats a wrong one


def test_a_connected_client_shows_its_tunnel_lease_and_exchanges(certs: Certs, tmp_path: Path) -> None:
    v = values(client_rows(connected_app(certs, tmp_path)))
    assert v[("tokenbridge_client_tunnel_up", None)] == 1
    assert v[("tokenbridge_client_tunnel_attempts_total", None)] == 3
    assert v[("tokenbridge_client_tunnel_rtt_seconds", None)] == 0.0015
    assert (
        v[("tokenbridge_client_lease_held", "codesign")],
        v[("tokenbridge_client_lease_held", "spare")],
    ) == (1, 0)
    assert v[("tokenbridge_client_apdus_total", "codesign")] == 35
    assert v[("tokenbridge_client_card_inserted", "codesign")] == 1


async def test_the_wait_for_a_lease_is_observed_once_per_grant_in_virtual_time(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    link, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    await vpcd.send_apdu(SELECT)
    # The lease request travels with the first command (issue 17): the wait ends with its answer.
    exchange = await server.expect(wire.LeaseExchange)
    await trio.sleep(7.0)  # another build holds the token for 7 s
    await server.send(wire.LeaseGranted(token_id=0, epoch=41, atr=ATR))
    seq = ccid.decode_message(exchange.message).seq
    await server.send(
        wire.CcidFrame(token_id=0, epoch=41, message=ccid.data_block(seq, b"\x90\x00").encode())
    )
    await vpcd.response()
    await vpcd.send_apdu(SELECT)  # under the lease: no wait to observe
    await answer_next(server)
    await vpcd.response()
    wait = link.status.lease_wait
    assert (wait.count, wait.sum) == (1, 7.0)
    assert dict(wait.cumulative())["5.0"] == 0 and dict(wait.cumulative())["15.0"] == 1
    assert tunnel.status.connects == 1


async def test_the_endpoint_serves_parsable_typed_metrics(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    doc = {
        "server": "127.0.0.1:9",  # nothing listens: the tunnel retries, the endpoint still answers
        "tls": {"ca": str(certs.ca), "cert": str(certs.client[0]), "key": str(certs.client[1])},
        "readers": [{"token": "codesign"}],
        "metrics": {"listen": "127.0.0.1:0"},
    }
    path.write_text(json.dumps(doc))
    app = ClientApp(load_client_config(path))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            port = app.metrics_listeners[0].socket.getsockname()[1]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                raw = b""
                while chunk := await stream.receive_some(65536):
                    raw += chunk
            nursery.cancel_scope.cancel()
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK")
    types = {fam.name: fam.type for fam in text_string_to_metric_families(body)}
    exported = {
        n + ("_total" if t == "counter" else "") for n, t in types.items() if n.startswith("tokenbridge_")
    }
    assert exported == _documented()
    assert types["tokenbridge_client_lease_wait_seconds"] == "histogram"
    assert types["tokenbridge_client_tunnel_connects"] == "counter"
    assert types["tokenbridge_client_tunnel_up"] == "gauge"
    assert "tokenbridge_client_build_info" in types and "process_cpu_seconds" in types


def test_a_bad_metrics_address_names_the_key(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(
        json.dumps({"server": "h", "tls": {"ca": "a", "cert": "b", "key": "c"}, "readers": [{"token": "t"}],
                    "metrics": {"listen": "127.0.0.1:99999"}})
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"metrics\.listen: bad port"):
        load_client_config(path)
    path.write_text(path.read_text().replace("127.0.0.1:99999", "127.0.0.1"))
    listen = load_client_config(path).metrics_listen
    assert listen is not None and (listen.host, listen.port) == ("127.0.0.1", 9448)


def _documented() -> set[str]:
    section = DOCS.read_text().split("### Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(tokenbridge_client_[a-z_]+)`", section, flags=re.MULTILINE))


def test_every_client_metric_is_documented_and_every_documented_one_exists() -> None:
    assert _documented() == {m.name for m in CLIENT_METRICS} | {"tokenbridge_client_build_info"}
