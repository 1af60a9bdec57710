"""tokenbridge-client's root: the tunnel, one vpcd link (or USB/IP reader) per token, signals, readiness."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from functools import partial

import structlog
import trio

from bridge_client import service
from bridge_client.backoff import Backoff
from bridge_client.config import ClientConfig
from bridge_client.metrics import client_registry
from bridge_client.status import serve_status
from bridge_client.tunnel import Tunnel
from bridge_client.usbip.reader import UsbipReader
from bridge_client.usbip.server import open_usbip_listeners, serve_usbip
from bridge_client.vpcd_link import VpcdLink
from protocol.runtime.metrics import serve_metrics
from protocol.runtime.sdnotify import SystemdNotifier, run_watchdog
from protocol.runtime.tls import client_context

log = structlog.get_logger(__name__)


@dataclass
class ClientApp:
    """Everything one tokenbridge-client process runs; tests drive it in-process."""

    config: ClientConfig
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier)

    def __post_init__(self) -> None:
        cfg = self.config
        ctx = client_context(ca=cfg.tls.ca, cert=cfg.tls.cert, key=cfg.tls.key)
        self.tunnel = Tunnel(
            host=cfg.server_host,
            port=cfg.server_port,
            server_name=cfg.server_name,
            ssl_context=ctx,
            token_names=[r.token for r in cfg.readers],
            backoff=Backoff(initial_s=cfg.reconnect_initial_s, max_s=cfg.reconnect_max_s),
            connect_timeout_s=cfg.connect_timeout_s,
        )
        self.links: list[VpcdLink] = []
        self.usbip_readers: list[UsbipReader] = []
        self._usbip_listeners: list[trio.SocketListener] | None = None
        if cfg.reader == "usbip":
            self.usbip_readers = [
                UsbipReader(self.tunnel, r.token, i, cfg.usbip_listen, queue_timeout_s=cfg.queue_timeout_s)
                for i, r in enumerate(cfg.readers)
            ]
        else:
            self.links = [
                VpcdLink(
                    self.tunnel,
                    r.token,
                    host=r.vpcd_host,
                    port=r.vpcd_port,
                    queue_timeout_s=cfg.queue_timeout_s,
                )
                for r in cfg.readers
            ]
        self.metrics = client_registry(self)  # this instance's own registry (bridge_client/metrics.py)
        self.metrics_listeners: list[trio.SocketListener] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.tunnel.run)
            for link in self.links:
                await nursery.start(link.run)
            if self.usbip_readers:
                listen = self.config.usbip_listen
                await nursery.start(
                    partial(serve_usbip, listeners=self._usbip_listeners), self.usbip_readers, listen
                )
            if self.config.status_socket is not None:
                await nursery.start(serve_status, self, self.config.status_socket)
            if self.config.metrics_listen is not None:
                where = self.config.metrics_listen
                self.metrics_listeners = await nursery.start(
                    serve_metrics, self.metrics, where.host, where.port
                )
            nursery.start_soon(run_watchdog, self.notifier)
            nursery.start_soon(self._announce_ready)
            log.info(
                "client.started",
                server=str(self.config.server_address),
                readers=[f"{r.token}@{r.vpcd_address}" for r in self.config.readers]
                if not self.usbip_readers
                else [f"{r.token}@usbip:{r.busid}@{r.listen}" for r in self.usbip_readers],
            )
            task_status.started()

    async def open_listeners(self) -> None:
        """Open the USB/IP port before the service starts, so a busy port is a plain startup error."""
        if self.usbip_readers and self._usbip_listeners is None:
            self._usbip_listeners = await open_usbip_listeners(self.config.usbip_listen)

    async def _announce_ready(self) -> None:
        """READY=1 once the readers run and the first tunnel attempt ended (bridge_client.service)."""
        await service.wait_first_attempt(self.tunnel)
        self.notifier.notify(READY="1", STATUS=service.app_status(self))
        await service.report_status(self)

    def reload(self) -> bool:
        """SIGHUP: new certificate, key and CA for the next connection; False keeps the old ones."""
        return service.reload_tls(self)


async def main_async(config: ClientConfig) -> None:
    app = ClientApp(config)
    await app.open_listeners()
    # SIGHUP (reload) exists on POSIX only; the client must keep starting on Windows agents.
    wanted = [signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            async for signum in signals:
                if signum == getattr(signal, "SIGHUP", None):
                    log.info("client.reload_requested", signal="SIGHUP")
                    app.reload()
                    continue
                log.info("client.stopping", signal=signal.Signals(signum).name)
                app.notifier.notify(STOPPING="1")
                nursery.cancel_scope.cancel()
                break
    log.info("client.stopped")
