"""The Prometheus endpoint: proper types parsed back by prometheus_client, series from the start,
one registry per server, and the documented names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio
from admin_fixtures import Certs, connect, expect, running
from inproc import wait_until
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bridge_server import service
from bridge_server.observe.metrics import SERVER_METRICS, server_registry, server_rows
from bridge_server.tokens.stats import TokenStats, is_signature
from protocol import wire
from protocol.runtime.metrics import DurationHistogram, http_response

DOCS = Path(__file__).resolve().parents[2] / "docs" / "status.md"
OK = b"\x90\x00"


async def _scrape(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        buf = b""
        while chunk := await stream.receive_some(65536):
            buf += chunk
    head, _, body = buf.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK"), head
    return body


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """(family name -> type, (sample name, labels) -> value), as Prometheus would read it."""
    types: dict[str, str] = {}
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            assert isinstance(s, Sample)
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return types, values


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def test_a_fresh_server_exports_typed_series_for_each_token_at_zero(tmp_path: Path) -> None:
    Certs(tmp_path)
    with trio.fail_after(30):
        async with running(tmp_path, extra={"metrics": {"listen": "127.0.0.1:0"}}) as (srv, _port):
            text = await _scrape(srv.metrics_listeners[0].socket.getsockname()[1])
    types, values = parse(text)
    assert types["tokenbridge_lease_wait_seconds"] == "histogram"
    assert types["tokenbridge_lease_hold_seconds"] == "histogram"
    assert types["tokenbridge_leases"] == "counter"  # the parser strips _total from counter families
    assert types["tokenbridge_token_present"] == "gauge"
    assert values[key("tokenbridge_leases_total", token="codesign")] == 0
    assert values[key("tokenbridge_lease_ends_total", token="codesign", reason="max_hold")] == 0
    assert values[key("tokenbridge_lease_wait_seconds_count", token="codesign")] == 0
    assert values[key("tokenbridge_lease_wait_seconds_bucket", token="codesign", le="+Inf")] == 0
    assert values[key("tokenbridge_signatures_total", token="codesign")] == 0
    assert values[key("tokenbridge_reload_successful", what="config")] == 1
    assert values[key("tokenbridge_reload_successful", what="tls")] == 1
    assert "tokenbridge_build_info" in types
    assert any(n == "tokenbridge_build_info" and dict(lab)["version"] == "0.1.0" for n, lab in values)
    assert "process_resident_memory_bytes" in types
    assert values[key("tokenbridge_certificate_expiry_timestamp_seconds", certificate="server")] > 0


async def test_a_lease_shows_in_the_wait_and_hold_histograms_and_the_counters(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    with trio.fail_after(30):
        async with running(tmp_path, extra={"metrics": {"listen": "127.0.0.1:0"}}) as (srv, port):
            mport = srv.metrics_listeners[0].socket.getsockname()[1]
            async with connect(certs, port, "build-vm-01") as c:
                await c.send(wire.LeaseRequest(token_id=0))
                await expect(c, wire.LeaseGranted)
                _, leased = parse(await _scrape(mport))
                await c.send(wire.LeaseRelease(token_id=0, epoch=srv.tokens[0].book.holder.epoch))
                await expect(c, wire.LeaseEnded)
                _, ended = parse(await _scrape(mport))
    assert leased[key("tokenbridge_token_leased", token="codesign")] == 1
    assert leased[key("tokenbridge_leases_total", token="codesign")] == 1
    assert leased[key("tokenbridge_lease_wait_seconds_count", token="codesign")] == 1
    assert leased[key("tokenbridge_lease_hold_seconds_count", token="codesign")] == 0
    assert ended[key("tokenbridge_lease_hold_seconds_count", token="codesign")] == 1
    assert ended[key("tokenbridge_lease_ends_total", token="codesign", reason="released")] == 1


async def test_tls_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    Certs(tmp_path)
    with trio.fail_after(30):
        async with running(tmp_path, extra={"metrics": {"listen": "127.0.0.1:0"}}) as (srv, port):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            await tcp.send_all(b"GET / HTTP/1.0\r\n\r\n")
            await tcp.receive_some(100)
            await tcp.aclose()
            await wait_until(lambda: srv.tls_refusals, what="the refusal is counted", within=10)
            _, values = parse(await _scrape(srv.metrics_listeners[0].socket.getsockname()[1]))
    assert values[key("tokenbridge_tls_refusals_total", reason="not tls (the peer sent http)")] == 1


async def test_two_servers_in_one_process_have_registries_of_their_own(tmp_path: Path) -> None:
    Certs(tmp_path)
    before = {fam.name for fam in REGISTRY.collect()}
    async with running(tmp_path) as (srv, _port):
        again = server_registry(srv)  # a second registry for the same view: no duplicate error
        assert {f.name for f in again.collect()} == {f.name for f in srv.metrics.collect()}
    assert {fam.name for fam in REGISTRY.collect()} == before  # the process default stays untouched


async def test_a_failed_tls_reload_sets_reload_successful_to_zero(tmp_path: Path) -> None:
    Certs(tmp_path)
    async with running(tmp_path) as (srv, _port):
        before = srv.tls_reload.success_at
        (tmp_path / "localhost.pem").write_text("not a certificate\n")
        assert srv.reload_tls() is False
        _, values = parse(
            http_response(b"GET /metrics HTTP/1.0\r\n\r\n", srv.metrics).decode().split("\r\n\r\n")[1]
        )
    assert values[key("tokenbridge_reload_successful", what="tls")] == 0
    assert values[key("tokenbridge_reload_last_success_timestamp_seconds", what="tls")] == before
    assert values[key("tokenbridge_reload_successful", what="config")] == 1


class _Notes:
    def notify(self, **fields: object) -> None:
        pass


async def test_a_sighup_with_a_broken_config_sets_reload_successful_to_zero_until_a_good_one(
    tmp_path: Path,
) -> None:
    Certs(tmp_path)
    config = tmp_path / "server.yaml"
    async with running(tmp_path) as (srv, _port):
        config.write_text("tokens: [unclosed\n")
        service.reload_service(srv, _Notes())
        broken = {(n, lab.get("what")): v for n, v, lab in server_rows(srv)}
        good = {
            "listen": "127.0.0.1:0",
            "tls": {"ca": "ca.pem", "cert": "localhost.pem", "key": "localhost.key"},
            "admins": ["ops"],
            "control": {"socket": "control.sock"},
            "lease": {"linger_s": 0.5},
            "tokens": [{"name": "codesign", "match": {"simulate": "safenet-5110"}, "allow": ["build-vm-01"]}],
        }
        config.write_text(json.dumps(good))  # JSON is YAML
        service.reload_service(srv, _Notes())
        fixed = {(n, lab.get("what")): v for n, v, lab in server_rows(srv)}
    assert broken[("tokenbridge_reload_successful", "config")] == 0
    assert broken[("tokenbridge_reload_last_success_timestamp_seconds", "config")] == srv.started_at
    assert fixed[("tokenbridge_reload_successful", "config")] == 1
    assert fixed[("tokenbridge_reload_last_success_timestamp_seconds", "config")] > srv.started_at


def test_only_get_metrics_is_served() -> None:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    assert http_response(b"GET /metrics HTTP/1.1\r\n\r\n", reg).startswith(b"HTTP/1.0 200 OK")
    assert http_response(b"GET / HTTP/1.1\r\n\r\n", reg).startswith(b"HTTP/1.0 404")
    assert http_response(b"POST /metrics HTTP/1.1\r\n\r\n", reg).startswith(b"HTTP/1.0 405")


def test_histogram_buckets_are_cumulative_and_a_value_on_a_bound_counts_in_it() -> None:
    h = DurationHistogram((1.0, 5.0))
    for v in (0.2, 1.0, 3.0, 9.0, -1.0):
        h.observe(v)
    assert h.cumulative() == [("1.0", 3.0), ("5.0", 4.0), ("+Inf", 5.0)]
    assert (h.count, h.sum) == (5, 13.2)


@pytest.mark.parametrize(
    ("command", "response", "counted"),
    [
        (bytes.fromhex("00870700") + b"\x7c\x00", OK, True),  # PIV GENERAL AUTHENTICATE
        (bytes.fromhex("002a9e9a20") + bytes(32), b"sig" + OK, True),  # PSO COMPUTE DIGITAL SIGNATURE
        (bytes.fromhex("102a9e9a20") + bytes(32), OK, False),  # chained: not the last link
        (bytes.fromhex("002a9e9a20") + bytes(32), b"\x69\x82", False),  # refused by the card
        (bytes.fromhex("002a8086"), OK, False),  # PSO DECIPHER is not a signature
        (bytes.fromhex("002a9e"), OK, False),  # too short to be a command
        (bytes.fromhex("00a40400"), OK, False),  # SELECT
    ],
)
def test_signatures_are_counted_for_piv_and_pso_cards(command: bytes, response: bytes, counted: bool) -> None:
    assert is_signature(command, response) is counted
    stats = TokenStats()
    stats.apdu(command, response)
    assert stats.signatures_total == int(counted)


def _documented_metrics() -> set[str]:
    text = DOCS.read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(tokenbridge_[a-z_]+)`", section, flags=re.MULTILINE))


async def test_the_exposition_has_exactly_the_documented_metrics(tmp_path: Path) -> None:
    Certs(tmp_path)
    async with running(tmp_path) as (srv, _port):
        text = http_response(b"GET /metrics HTTP/1.0\r\n\r\n", srv.metrics).decode().split("\r\n\r\n", 1)[1]
    exported = {
        fam.name + ("_total" if fam.type == "counter" else "")
        for fam in text_string_to_metric_families(text)
        if fam.name.startswith("tokenbridge_")
    }
    assert exported == _documented_metrics()
    assert {m.name for m in SERVER_METRICS} | {"tokenbridge_build_info"} == exported
