"""Prometheus metrics both daemons export: a table of metrics, its registry, the HTTP endpoint.

Theory of operation. The daemons do not update metric objects as things happen: they keep
their own plain counters (`TokenStats`, the client's `ClientStats`), and a scrape reads them
through a table of `Metric` rows, each a name, a help text, label names and a function that
returns the current `(label values, value)` pairs. `TableCollector` turns the table into
`prometheus_client` metric families at scrape time, on the trio thread that owns the state (no
locks, no thread-safety questions), so a series labelled by a configured token exists from the
start with the value 0.

Adding a metric is one row in the daemon's table (`bridge_server/observe/metrics.py`,
`bridge_client/metrics.py`), e.g.

    counter("tokenbridge_foo_total", "foos done", ("token",), per_token(lambda t: t.stats.foos)),

and one line in docs/status.md (a test compares the two). Durations are `DurationHistogram`s
(plain buckets, observed by the daemon) exported as Prometheus histograms.

Each daemon instance gets its own `CollectorRegistry` (`new_registry`): two servers in one test
process do not collide, and the process-wide default registry stays untouched. The endpoint is
a small HTTP/1.0 server on trio: `GET /metrics` answers the text exposition format, anything
else 404/405. It has no authentication: bind it to loopback or a management network.
"""

from __future__ import annotations

import bisect
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

import structlog
import trio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as Family,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from protocol.runtime.address import Address

__all__ = [
    "HOLD_BUCKETS_S",
    "WAIT_BUCKETS_S",
    "DurationHistogram",
    "Metric",
    "TableCollector",
    "Value",
    "counter",
    "gauge",
    "histogram",
    "http_response",
    "new_registry",
    "samples",
    "serve_metrics",
]

log = structlog.get_logger(__name__)

MAX_REQUEST_BYTES: Final = 8192
REQUEST_TIMEOUT_S: Final = 5.0

# Lease waits: a free token grants in milliseconds; a queue behind a signing build takes minutes.
WAIT_BUCKETS_S: Final = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Lease holds: one signature takes a second or two, a build that signs many files a few minutes.
HOLD_BUCKETS_S: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class DurationHistogram:
    """Cumulative-bucket histogram of durations in seconds (plain bookkeeping, no Prometheus)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        value = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """`(le, count)` pairs as Prometheus wants them, ending with `+Inf`."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


def _le(bound: float) -> str:
    return repr(float(bound))


S = TypeVar("S")
Value = float | int | bool | DurationHistogram
Reader = Callable[[S], Iterable[tuple[Sequence[str], Value]]]


@dataclass(frozen=True)
class Metric(Generic[S]):
    """One row of a daemon's metric table; `read(source)` gives `(label values, value)` pairs."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...]
    read: Reader[S]

    def family(self, source: S) -> Family:
        if self.kind == "histogram":
            hist = HistogramMetricFamily(self.name, self.help, labels=self.labels)
            for values, h in self.read(source):
                assert isinstance(h, DurationHistogram)
                hist.add_metric(list(values), buckets=h.cumulative(), sum_value=h.sum)
            return hist
        fam_type = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        fam = fam_type(self.name, self.help, labels=self.labels)
        for values, v in self.read(source):
            assert not isinstance(v, DurationHistogram)
            fam.add_metric(list(values), float(v))
        return fam


def gauge(name: str, doc: str, labels: tuple[str, ...], read: Reader[S]) -> Metric[S]:
    return Metric(name, "gauge", doc, labels, read)


def counter(name: str, doc: str, labels: tuple[str, ...], read: Reader[S]) -> Metric[S]:
    if not name.endswith("_total"):
        raise ValueError(f"counter {name!r}: counter names end with _total (Prometheus naming)")
    return Metric(name, "counter", doc, labels, read)


def histogram(name: str, doc: str, labels: tuple[str, ...], read: Reader[S]) -> Metric[S]:
    return Metric(name, "histogram", doc, labels, read)


class TableCollector(Collector, Generic[S]):
    """A daemon's metric table read from `source` at each scrape."""

    def __init__(self, table: Sequence[Metric[S]], source: S) -> None:
        self.table = table
        self.source = source

    def collect(self) -> Iterator[Family]:
        for metric in self.table:
            yield metric.family(self.source)


def new_registry(collector: Collector, *, prefix: str, version: str) -> CollectorRegistry:
    """A registry of its own: the daemon's table, `<prefix>_build_info`, process and Python metrics."""
    # auto_describe=False: registering must not run a scrape (the daemon is still being built).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(_BuildInfo(prefix, version))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _BuildInfo(Collector):
    def __init__(self, prefix: str, version: str) -> None:
        self.name = f"{prefix}_build_info"
        self.version = version

    def collect(self) -> Iterator[Family]:
        fam = GaugeMetricFamily(
            self.name, "always 1; the labels say which build runs", labels=("version", "python")
        )
        fam.add_metric([self.version, platform.python_version()], 1.0)
        yield fam


def samples(registry: CollectorRegistry) -> list[tuple[str, float, dict[str, str]]]:
    """Every sample as `(name, value, labels)`; what tests and `status` code compare against."""
    return [(s.name, s.value, dict(s.labels)) for fam in registry.collect() for s in fam.samples]


# -- HTTP --------------------------------------------------------------------------------------


def _header(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def http_response(request_head: bytes, registry: CollectorRegistry) -> bytes:
    """The whole HTTP/1.0 answer for a request head (the exposition format the Accept header asks)."""
    first = request_head.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
    if len(first) < 2 or first[0] != "GET":
        return b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    if first[1].split("?", 1)[0] != "/metrics":
        return b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    encoder, content_type = choose_encoder(_header(request_head, b"accept") or "")
    payload = encoder(registry)
    head = (
        f"HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` until cancelled; `started()` gets the bound listeners."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info(
        "metrics.listening",
        addresses=[str(Address(*lst.socket.getsockname()[:2])) for lst in listeners],
    )

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    head += chunk
                await stream.send_all(http_response(head, registry))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
