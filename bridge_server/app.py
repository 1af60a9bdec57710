"""The server's root: token tasks, the listener, signals and an orderly shutdown.

Task tree (style-anchors §3.4):

    root nursery
    ├── watch_signals      SIGTERM/SIGINT -> request_shutdown()   (only from the CLI)
    ├── TokenManager.run   one per token, started (device opened or known absent) before READY
    └── run_listener       acceptors (cancelled first) + sessions nursery (deadline on shutdown)

Shutdown order: STOPPING=1; stop accepting; every token ends its lease with `shutdown`
(LeaseEnded goes to the holder after the exchange in flight, within the grace period),
powers the card off and releases the device; every session gets `Goodbye(SHUTTING_DOWN)`;
sessions still open when the grace period ends are cancelled; `server.stopped`.
"""

from __future__ import annotations

import signal
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any

import structlog
import trio

from bridge_server import service
from bridge_server.config import ServerConfig
from bridge_server.guard.audit import AuditLog
from bridge_server.guard.guardrails import Guardrails, guard_state_path, open_guard, reset_guard
from bridge_server.guard.state_files import check_state_folders
from bridge_server.net.admin import AdminDispatcher
from bridge_server.net.control import serve_control
from bridge_server.net.hub import Hub
from bridge_server.net.listener import ConnectionHandler, run_listener
from bridge_server.net.reload import ReloadOutcome, TlsReloader
from bridge_server.net.session import SessionContext
from bridge_server.observe.metrics import server_registry
from bridge_server.tokens.device import CardOpener
from bridge_server.tokens.epochs import EpochStore, epoch_state_path
from bridge_server.tokens.manager import TokenManager
from bridge_server.usb.devices import card_opener
from protocol import wire
from protocol.errors import CloseCode
from protocol.runtime.address import Address
from protocol.runtime.metrics import serve_metrics
from protocol.runtime.sdnotify import Notifier, SystemdNotifier, run_watchdog

log = structlog.get_logger(__name__)


class BridgeServer:
    """One server process: build from a config, `await nursery.start(server.run)`."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        openers: Mapping[str, tuple[CardOpener, Any]] | None = None,
        notifier: Notifier | None = None,
        wall_time: Callable[[], float] = time.time,
    ) -> None:
        """Args:
        openers: token name -> (opener, simulated token); by default built from the config
            (`bridge_server.usb.devices.card_opener`). Tests pass fakes.
        """
        self._config = config
        self._ssl_context = ssl_context
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.hub = Hub()
        self.shutdown_requested = trio.Event()
        self.tokens: list[TokenManager] = []
        now_wall = wall_time()
        # Guardrails (docs/guardrails.md): one PIN guard and one audit log, shared by the tokens.
        check_state_folders(
            str(config.path),
            [("audit.path", config.audit.path), ("pin_guard.state", guard_state_path(config))],
        )
        self.pin_guard, guard_store = open_guard(config)
        self.guard_store = guard_store
        self.audit = AuditLog(config.audit.path, max_bytes=config.audit.max_bytes, keep=config.audit.keep)
        self.rails = {
            t.name: Guardrails(
                t.name,
                policy=t.policy,
                guard=self.pin_guard,
                store=guard_store,
                audit=self.audit,
                server_pin=t.server_pin,
            )
            for t in config.tokens
        }
        self.epochs = EpochStore(epoch_state_path(guard_state_path(config)))
        for token_id, token in enumerate(config.tokens):
            if openers is not None:
                opener, simulated = openers[token.name]
            else:
                opener, simulated = card_opener(token, config_path=str(config.path))
            manager = TokenManager(
                token_id, token, config.lease, self.hub, opener,
                first_epoch=self.epochs.first_epoch(token.name, now_wall), simulated=simulated,
                guardrails=self.rails[token.name], epochs=self.epochs,
            )  # fmt: skip
            self.tokens.append(manager)
        self.listeners: list[trio.SocketListener] = []
        self.started_at = wall_time()
        self.reloader = TlsReloader(config.tls, self.hub, context=ssl_context)
        self.handler: ConnectionHandler | None = None
        self.metrics_listeners: list[trio.SocketListener] = []
        self.config_reload = ReloadOutcome(success_at=self.started_at)  # SIGHUP (service.py)
        self.metrics = server_registry(self)  # this instance's own registry (observe/metrics.py)

    @property
    def config(self) -> ServerConfig:
        return self._config

    @config.setter
    def config(self, config: ServerConfig) -> None:
        """A reload's new config (`service.apply_plan`): the parts that read it follow."""
        self._config = config
        if self.handler is not None:
            # The listener hands this context to every new session; open sessions keep theirs.
            self.handler.session_context = replace(self.handler.session_context, admins=config.admins)
        self.reloader.tls = config.tls  # reload_tls() reads the (possibly moved) files from here

    @property
    def tls_refusals(self) -> Mapping[str, int]:
        return self.handler.refusals if self.handler is not None else {}

    @property
    def crl_next_update(self) -> datetime | None:
        return self.reloader.crl_next_update

    @property
    def tls_reload(self) -> ReloadOutcome:
        return self.reloader.outcome

    def listen_addresses(self) -> list[str]:
        return [str(Address(*lst.socket.getsockname()[:2])) for lst in self.listeners]

    def reload_tls(self) -> bool:
        """Re-read CA, certificate, key and CRL (SIGHUP, file change); False keeps the old ones."""
        return self.reloader.reload()

    def request_shutdown(self) -> None:
        self.shutdown_requested.set()

    def reset_pin_guard(self, token: str, actor: str) -> dict[str, Any]:
        """Operator: clear `token`'s PIN guard (persisted, audited); the answer says what to check first.

        Raises:
            KeyError: no token of that name.
        """
        if token not in self.rails:
            raise KeyError(f"no token named {token!r} (configured: {', '.join(self.rails)})")
        return reset_guard(self.rails[token], actor)

    def _context(self) -> ssl.SSLContext:
        return self.reloader.current()

    async def run(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until `request_shutdown()`; `started()` gets the bound listeners."""
        cfg = self.config
        dispatcher = AdminDispatcher(self)
        ctx = SessionContext(
            hub=self.hub, tokens=self.tokens, admins=cfg.admins, heartbeat_s=cfg.heartbeat_s,
            dispatcher=dispatcher, audit=self.audit,
        )  # fmt: skip
        handler = self.handler = ConnectionHandler(lambda: self._context(), cfg.limits, ctx)
        self._context()  # bad TLS material fails here, before anything is opened
        async with trio.open_nursery() as root:
            for token in self.tokens:
                await root.start(token.run)
            extras = trio.CancelScope()
            await root.start(self._run_extras, dispatcher, extras)
            self.listeners = await root.start(
                partial(
                    run_listener,
                    handler,
                    host=cfg.host,
                    port=cfg.port,
                    shutdown=self.shutdown_requested,
                    grace_period_s=cfg.limits.grace_period_s,
                )
            )
            # READY only now: listener bound, every token opened and reset or known absent.
            self.notifier.notify(READY=1, STATUS=service.server_status(self))
            log.info(
                "server.ready", tokens=[t.name for t in self.tokens], present=[t.present for t in self.tokens]
            )
            await self.audit.record("server.started", tokens=[t.name for t in self.tokens])
            task_status.started(self.listeners)
            await self.shutdown_requested.wait()
            extras.cancel()  # control socket, file watcher, metrics: nothing to drain
            self.notifier.notify(STOPPING=1)
            await self._stop_tokens(cfg.limits.grace_period_s)
            for sub in self.hub:
                sub.push(wire.Goodbye(code=CloseCode.SHUTTING_DOWN, reason="server shutting down"))
            # Whatever is still running after one more grace period (a token stuck in a card
            # call) is cancelled; its own cleanup is shielded and bounded.
            root.cancel_scope.deadline = trio.current_time() + cfg.limits.grace_period_s
        self.audit.log_anchor()  # the head to the service log: a cut while stopped shows against it
        log.info("server.stopped")

    async def _run_extras(
        self,
        dispatcher: AdminDispatcher,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Control socket, TLS file watcher and metrics endpoint (each optional) until `scope` ends."""
        with scope:
            async with trio.open_nursery() as extras:
                if self.config.control.socket is not None:
                    await extras.start(serve_control, dispatcher, self.config.control.socket)
                await extras.start(self.reloader.watch)
                metrics = self.config.metrics
                if metrics.listen is not None:
                    host, port = metrics.listen
                    self.metrics_listeners = await extras.start(
                        partial(serve_metrics, self.metrics, host, port)
                    )
                task_status.started()

    async def _stop_tokens(self, grace_period_s: float) -> None:
        with trio.move_on_after(grace_period_s) as scope:
            async with trio.open_nursery() as nursery:
                for token in self.tokens:
                    # F8: an exchange at the card gets half the grace period, then fails explicitly
                    nursery.start_soon(partial(token.shutdown, abort_after_s=grace_period_s / 2))
        if scope.cancelled_caught:
            log.warning(
                "server.tokens_slow", reason="an exchange was still running at the end of the grace period"
            )


async def watch_signals(
    server: BridgeServer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("server.signal_received", signal=signal.Signals(signum).name)
            if signum == signal.SIGHUP:  # systemctl reload: TLS files and live config
                service.reload_service(server, server.notifier)
                continue
            server.request_shutdown()
            return


async def serve_forever(config: ServerConfig) -> None:
    """The CLI's entry: run the server with signal handling until SIGTERM/SIGINT."""
    notifier = SystemdNotifier()
    server = BridgeServer(config, notifier=notifier)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals, server)
        if notifier.watchdog_interval is not None:
            await nursery.start(run_watchdog, notifier)  # fed from this event loop

        async def serve(
            task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            await server.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        await nursery.start(serve)
        nursery.start_soon(service.report_status, server, notifier)
