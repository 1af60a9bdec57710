"""Direct mode: expose a simulated PIV card straight to a vpcd reader, without the bridge.

This is the baseline the bridge is measured against (DESIGN §9) and the quickest way to prove
OpenSC compatibility. `DirectCard` puts the PIV card itself behind vpcd; `UsbDirectCard` puts
the same card behind the simulated USB token and the server's own host stack (pyusb backend,
`AsyncUsbDevice`, `CcidDriver`, T=1 for TPDU profiles), so the bridge can also be measured
against a baseline that pays the same simulated-USB cost and only the bridge differs.

We connect to vpcd's slot port (vpcd listens; DESIGN §11); card presence
is the open connection, so when vpcd closes it we reconnect after a short backoff.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog
import trio

from bridge_server.errors import DeviceError
from bridge_server.simulator.piv import PivCard
from protocol.apdu import redact
from protocol.errors import RemoteProtocolError
from protocol.runtime.address import Address
from protocol.vpcd import Apdu, Closed, Control, VpcdCardSide, VpcdControl

if TYPE_CHECKING:
    from bridge_server.simulator.profiles import Profile
    from bridge_server.usb.ccid_driver import CcidDriver

log = structlog.get_logger(__name__)

RECV_SIZE: Final = 65536
RECONNECT_INITIAL_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0


class VpcdCard(Protocol):
    """What one vpcd connection drives: the reply to each event, and the card leaving."""

    card: PivCard

    async def respond(self, event: Control | Apdu) -> bytes | None: ...
    async def removed(self) -> None: ...


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

    async def respond(self, event: Control | Apdu) -> bytes | None:
        return self.handle(event)

    async def removed(self) -> None:
        self.card.power_off()

    def _write_stats(self) -> None:
        _write_stats(self._stats_path, self.card)


def _write_stats(path: Path | None, card: PivCard) -> None:
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(card.counters)))
        tmp.replace(path)


class UsbDirectCard:
    """Glue between one vpcd connection and a card behind the server's USB/CCID host stack.

    vpcd power on/reset cold-resets the card through the driver (as a bridge client's power
    cycle does through the virtual reader), power off powers it off, APDUs go through
    `CcidDriver.transmit`. `atr` is the answer of the last power-on (cached for GET_ATR)."""

    def __init__(
        self, driver: CcidDriver, card: PivCard, atr: bytes, *, stats_path: Path | None = None
    ) -> None:
        self.driver = driver
        self.card = card
        self.atr = atr
        self._stats_path = stats_path

    async def respond(self, event: Control | Apdu) -> bytes | None:
        if isinstance(event, Apdu):
            response = await self.driver.transmit(event.data)
            _write_stats(self._stats_path, self.card)
            return response
        if event.code is VpcdControl.GET_ATR:
            return self.atr
        await self.driver.power_off()
        if event.code is not VpcdControl.POWER_OFF:
            self.atr = await self.driver.power_on()
        return None

    async def removed(self) -> None:
        with trio.CancelScope(shield=True), contextlib.suppress(DeviceError):
            await self.driver.power_off()


async def main_usb_async(
    card: PivCard, profile: Profile, host: str, port: int, stats_path: Path | None
) -> None:
    """`--via-usb`: the simulated USB token of `profile` opened like the server opens it, in vpcd."""
    from bridge_server.simulator.backend import SimulatorBackend
    from bridge_server.simulator.usb_token import SimulatedToken
    from bridge_server.usb.ccid_driver import CcidDriver
    from bridge_server.usb.transport import AsyncUsbDevice, DeviceMatch

    backend = SimulatorBackend([SimulatedToken(profile, card=card)])
    device = await AsyncUsbDevice.open(DeviceMatch(vid=profile.vid, pid=profile.pid), backend=backend)
    try:
        driver = CcidDriver(device)
        atr = await driver.power_on()
        await main_async(UsbDirectCard(driver, card, atr, stats_path=stats_path), host, port)
    finally:
        await device.aclose()


async def serve_connection(stream: trio.abc.Stream, direct: VpcdCard) -> None:
    """Answer vpcd on one connection until it closes."""
    vpcd = VpcdCardSide()
    while True:
        event = vpcd.next_event()
        if isinstance(event, Closed):
            return
        if isinstance(event, Control | Apdu):
            reply = await direct.respond(event)
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


async def run_direct(direct: VpcdCard, host: str, port: int) -> None:
    """Keep the card inserted in the vpcd slot at host:port until cancelled."""
    delay = RECONNECT_INITIAL_S
    peer = str(Address(host, port))
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.info("vpcd.connect_failed", peer=peer, reason=str(exc), retry_s=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
            continue
        delay = RECONNECT_INITIAL_S
        log.info("vpcd.connected", peer=peer)
        async with stream:
            try:
                await serve_connection(stream, direct)
                reason = "closed by vpcd"
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                RemoteProtocolError,
                DeviceError,
            ) as exc:
                reason = str(exc) or type(exc).__name__
        await direct.removed()  # the card left the reader
        log.info("vpcd.disconnected", peer=peer, reason=reason, **asdict(direct.card.counters))
        await trio.sleep(RECONNECT_INITIAL_S)


async def main_async(direct: VpcdCard, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_direct, direct, host, port)
            async for signum in signals:
                log.info("simulator.stopping", reason=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    log.info("simulator.stopped", **asdict(direct.card.counters))
