"""The device behind one configured token: open it, check it is ours, probe it, close it.

`TokenManager` (tokens.py) owns the leases and the card protocol; this class owns the device's
lifecycle, so the manager only hears "attached (with this ATR)" or "gone (because ...)".
A token configured with a serial, or once seen, accepts only that serial back: a different
token plugged in where it was is refused (logged and audited once per serial), never served
under the old name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog
import trio

from bridge_server.errors import DeviceError, DeviceNotFoundError
from bridge_server.guard.guardrails import Guardrails
from bridge_server.tokens.virtual_reader import CardDriver

log = structlog.get_logger(__name__)

CLEANUP_TIMEOUT_S: Final = 5.0


@dataclass(slots=True)
class OpenedCard:
    driver: CardDriver
    serial: str  # the token's identity: its usb serial, else what bridge_server.usb.identity found
    close: Callable[[], Awaitable[None]]
    identity_source: str = "usb-serial"  # issue 15 item 3: IdentitySource value, shown in status


CardOpener = Callable[[], Awaitable[OpenedCard]]  # raises DeviceNotFoundError while absent


class TokenDevice:
    """One token's device: `card` is the open device while present, else None."""

    def __init__(self, name: str, opener: CardOpener, serial: str | None, rails: Guardrails) -> None:
        self.name = name
        self.serial = serial  # the configured serial, then the one first seen
        self.card: OpenedCard | None = None
        self._opener = opener
        self._rails = rails
        self._refused_serial: str | None = None

    async def attach(self) -> bytes | None:
        """Open the device if it is plugged in and is ours; its ATR, or None while absent/refused."""
        try:
            card = await self._opener()
        except DeviceNotFoundError:
            self._refused_serial = None  # the impostor, if any, is gone too
            return None
        except DeviceError as exc:
            log.warning("device.open_failed", token=self.name, error=str(exc))
            return None
        if self.serial is not None and card.serial.casefold() != self.serial.casefold():
            await self._refuse(card)
            return None
        try:
            atr = await card.driver.power_on()  # cache the ATR for TokenStatus
            await card.driver.power_off()
        except DeviceError as exc:
            log.warning("device.open_failed", token=self.name, error=str(exc))
            await self.close(card)
            return None
        self.serial, self._refused_serial, self.card = card.serial, None, card
        log.info("device.attached", token=self.name, device=card.serial, atr=atr.hex())
        await self._rails.record("token.attached", device=card.serial, atr=atr.hex())
        return atr

    async def _refuse(self, card: OpenedCard) -> None:
        if self._refused_serial != card.serial:
            log.warning(
                "device.refused",
                token=self.name,
                device=card.serial,
                expected=self.serial,
                reason="a different token is plugged in where this one was",
            )
            self._refused_serial = card.serial
            await self._rails.record("token.refused", device=card.serial, expected=self.serial)
        await self.close(card)

    @property
    def refused_serial(self) -> str | None:
        """The serial of a different token plugged in where this one was (refused), else None."""
        return self._refused_serial

    async def probe(self) -> str | None:
        """None while the token is there; otherwise why it is considered gone."""
        if self.card is None:
            return "not attached"
        try:
            present = await self.card.driver.slot_present()
        except DeviceError as exc:
            return str(exc)
        return None if present else "slot empty"

    async def forget(self, why: str) -> None:
        """The token is gone: close and drop the device (logged and audited)."""
        card, self.card = self.card, None
        if card is not None:
            log.warning("device.gone", token=self.name, device=card.serial, reason=why)
            await self._rails.record("token.gone", device=card.serial, reason=why)
            await self.close(card)

    async def shut_down(self) -> None:
        """Power the card off and release the device (server shutdown)."""
        card, self.card = self.card, None
        if card is None:
            return
        try:
            await card.driver.power_off()
        except DeviceError as exc:
            log.debug("device.power_off_failed", token=self.name, error=str(exc))
        await self.close(card)

    async def close(self, card: OpenedCard) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
            try:
                await card.close()
            except DeviceError as exc:
                log.debug("device.close_failed", token=self.name, error=str(exc))
