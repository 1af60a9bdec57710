"""Direct mode: expose a simulated PIV card straight to a vpcd reader, without the bridge.

This is the baseline the bridge is measured against (DESIGN §9) and the quickest way to prove
OpenSC compatibility. We connect to vpcd's slot port (vpcd listens; DESIGN §11); card presence
is the open connection, so when vpcd closes it we reconnect after a short backoff.
"""

from __future__ import annotations

import json
import signal
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Final

import structlog
import trio

from bridge_server.simulator.piv import PivCard
from protocol.apdu import redact
from protocol.errors import RemoteProtocolError
from protocol.vpcd import Apdu, Closed, Control, VpcdCardSide, VpcdControl

log = structlog.get_logger(__name__)

RECV_SIZE: Final = 65536
RECONNECT_INITIAL_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0


class DirectCard:
    """Glue between one vpcd connection and a PivCard."""

    def __init__(self, card: PivCard, atr: bytes, *, stats_path: Path | None = None) -> None:
        self.card = card
        self.atr = atr
        self._stats_path = stats_path

    def handle(self, event: Control | Apdu) -> bytes | None:
        """The bytes to send back for one vpcd event (None: power events get no reply)."""
        if isinstance(event, Apdu):
            log.debug("apdu.received", apdu=redact(event.data))
            response = self.card.execute(event.data)
            self._write_stats()
            return response
        if event.code is VpcdControl.GET_ATR:
            return self.atr
        if event.code is VpcdControl.POWER_OFF:
            self.card.power_off()
        else:  # POWER_ON, RESET: both leave a freshly powered card
            self.card.power_off()
            self.card.power_on()
        log.debug("card.power_changed", code=event.code.name)
        return None

    def _write_stats(self) -> None:
        if self._stats_path is not None:
            tmp = self._stats_path.with_name(self._stats_path.name + ".tmp")
            tmp.write_text(json.dumps(asdict(self.card.counters)))
            tmp.replace(self._stats_path)


async def serve_connection(stream: trio.abc.Stream, direct: DirectCard) -> None:
    """Answer vpcd on one connection until it closes."""
    vpcd = VpcdCardSide()
    while True:
        event = vpcd.next_event()
        if isinstance(event, Closed):
            return
        if isinstance(event, Control | Apdu):
            reply = direct.handle(event)
            if reply is not None:
                out = vpcd.send_atr(reply) if isinstance(event, Control) else vpcd.send_response(reply)
                await stream.send_all(out)
            continue
        data = await stream.receive_some(RECV_SIZE)
        _quickack(stream)
        vpcd.receive_data(bytes(data))


def _quickack(stream: trio.abc.Stream) -> None:
    """Acknowledge at once. Measured: without it every APDU waits ~40 ms for our delayed ACK
    (vpcd's small writes are held back by Nagle on its side until the ACK), so `pkcs11-tool -L`
    takes 2.1 s instead of 0.05 s. Linux clears TCP_QUICKACK after use, hence every receive."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None and isinstance(stream, trio.SocketStream):
        stream.setsockopt(socket.IPPROTO_TCP, quickack, 1)


async def run_direct(direct: DirectCard, host: str, port: int) -> None:
    """Keep the card inserted in the vpcd slot at host:port until cancelled."""
    delay = RECONNECT_INITIAL_S
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.info("vpcd.connect_failed", peer=f"{host}:{port}", reason=str(exc), retry_s=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
            continue
        delay = RECONNECT_INITIAL_S
        log.info("vpcd.connected", peer=f"{host}:{port}")
        async with stream:
            try:
                await serve_connection(stream, direct)
                reason = "closed by vpcd"
            except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError) as exc:
                reason = str(exc) or type(exc).__name__
        direct.card.power_off()  # the card left the reader
        log.info("vpcd.disconnected", peer=f"{host}:{port}", reason=reason, **asdict(direct.card.counters))
        await trio.sleep(RECONNECT_INITIAL_S)


async def main_async(direct: DirectCard, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_direct, direct, host, port)
            async for signum in signals:
                log.info("simulator.stopping", reason=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("simulator.stopped", **asdict(direct.card.counters))
