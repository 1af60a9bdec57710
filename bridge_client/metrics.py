"""The client's Prometheus metrics: one table, read from the running client at each scrape.

Off unless client.yaml has `metrics: {listen: "127.0.0.1:9448"}`; no authentication, so bind it
to loopback or a management network. The theory is in protocol/runtime/metrics.py.

To add a metric: one row in `CLIENT_METRICS` and one line in docs/client.md "Metrics"
(`tests/bridge_client/test_client_metrics.py` holds the two to each other).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry

from bridge_client.status import StatusSource
from bridge_client.usbip.reader import UsbipReader
from bridge_client.vpcd_link import VpcdLink
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

__all__ = ["CLIENT_METRICS", "client_registry", "client_rows"]

Rows = Iterable[tuple[Sequence[str], Value]]
TOKEN: Final = ("token",)


Reader = VpcdLink | UsbipReader


def per_reader(read: Callable[[StatusSource, Reader], Value]) -> Callable[[StatusSource], Rows]:
    """One series per configured reader (vpcd or USB/IP), present (at 0) from the start."""
    return lambda app: [((link.token,), read(app, link)) for link in _readers(app)]


def _readers(app: StatusSource) -> list[Reader]:
    return [*app.links, *app.usbip_readers]


def single(read: Callable[[StatusSource], Value]) -> Callable[[StatusSource], Rows]:
    return lambda app: [((), read(app))]


def _rtt(app: StatusSource) -> Rows:
    rtt_ms = app.tunnel.status.rtt_ms
    return [] if rtt_ms is None or app.tunnel.status.state != "connected" else [((), rtt_ms / 1000)]


# fmt: off
CLIENT_METRICS: Final[tuple[Metric[StatusSource], ...]] = (
    gauge("tokenbridge_client_tunnel_up", "1 while the tunnel to the server is connected", (),
          single(lambda app: app.tunnel.status.state == "connected")),
    counter("tokenbridge_client_tunnel_attempts_total", "connection attempts to the server", (),
            single(lambda app: app.tunnel.status.attempts)),
    counter("tokenbridge_client_tunnel_connects_total",
            "connections that reached the server's Welcome (reconnects: this minus 1)", (),
            single(lambda app: app.tunnel.status.connects)),
    gauge("tokenbridge_client_tunnel_rtt_seconds", "last heartbeat round trip (absent while down)", (),
          _rtt),
    gauge("tokenbridge_client_card_inserted",
          "1 while the token shows as a card in its reader (vpcd or USB/IP)", TOKEN,
          per_reader(lambda app, link: link.status.state == "inserted")),
    gauge("tokenbridge_client_lease_held", "1 while this client holds the token's lease", TOKEN,
          per_reader(lambda app, link: app.tunnel.tokens[link.token].epoch is not None)),
    counter("tokenbridge_client_apdus_total", "APDUs exchanged through the reader", TOKEN,
            per_reader(lambda app, link: link.status.apdus)),
    histogram("tokenbridge_client_lease_wait_seconds", "lease request to grant, as this client waited",
              TOKEN, per_reader(lambda app, link: link.status.lease_wait)),
)
# fmt: on


def client_registry(app: StatusSource) -> CollectorRegistry:
    """The registry one client instance serves on /metrics (its own, not the process default)."""
    return new_registry(
        TableCollector(CLIENT_METRICS, app), prefix="tokenbridge_client", version=package_version()
    )


def client_rows(app: StatusSource) -> list[tuple[str, float, dict[str, str]]]:
    """The client's own samples (no process metrics) as `(name, value, labels)`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TableCollector(CLIENT_METRICS, app))
    return samples(registry)
