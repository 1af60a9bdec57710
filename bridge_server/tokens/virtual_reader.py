"""The CCID reader each token looks like to a client (DESIGN §3): extended-APDU level.

Theory of operation
-------------------
A client drives a remote token with plain CCID commands, as if it were a local reader that
exchanges whole APDUs: `PC_to_RDR_IccPowerOn`, `PC_to_RDR_XfrBlock` carrying a whole command
APDU, `PC_to_RDR_IccPowerOff`, `PC_to_RDR_GetSlotStatus`. The physical token's own exchange
level (TPDU T=1, short or extended APDU) stays hidden behind `CardDriver.transmit`.

One `VirtualReader` lives for one lease. The grant has just cold-reset the card, so the card
is fresh and powered. `IccPowerOn` is a reset, as on a local reader: the client sends it for
pcscd's IFD_POWER_UP and IFD_RESET (vpcd's power-on and reset), and libccid answers IFD_RESET
with IccPowerOff then IccPowerOn, so `SCardReconnect(..., SCARD_RESET_CARD)` logs the card out
(applications rely on that). So `IccPowerOn` cold-resets the physical card whenever a command
APDU has reached it since its last reset; before any has, the card is still in the state
that reset left, and the ATR from it is the answer (no second reset at lease start).
`IccPowerOff` is virtual (the physical card stays powered, since the lease is still this
holder's) and the next `IccPowerOn` then cold-resets the card for real. Every other command
type gets the matching response type with bmCommandStatus FAILED and bError
CMD_NOT_SUPPORTED (CCID 1.1 §6.2.6).

A device error during an exchange becomes a CCID failure (bError HW_ERROR or ICC_MUTE, or
the reader's own bError) and `FrameResult.failure`, after which the token task ends the
lease. We never invent a status word: the client must not mistake a broken exchange for a
card answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from bridge_server.errors import CardError, DeviceError, DeviceGoneError, DeviceTimeoutError
from bridge_server.guard.server_pin import wipe
from protocol.apdu import redact
from protocol.ccid import (
    CcidMessage,
    CommandStatus,
    IccStatus,
    MessageType,
    SlotError,
    data_block,
    response_type_for,
    slot_status,
    status_byte,
)
from protocol.errors import LocalProtocolError
from protocol.runtime.logging import debug_enabled

log = structlog.get_logger(__name__)

_MT = MessageType
# CCID 1.1 §6.2.6: for a bad field, bError is the offset of that field in the command.
BAD_SLOT_OFFSET: Final = 5
BAD_LEVEL_PARAMETER_OFFSET: Final = 8


class CardDriver(Protocol):
    """What the token task needs from a card: `bridge_server.usb.ccid_driver.CcidDriver` fits."""

    async def power_on(self) -> bytes: ...
    async def power_off(self) -> None: ...
    async def transmit(self, apdu: bytes) -> bytes: ...
    async def slot_present(self) -> bool: ...


@dataclass(slots=True)
class FrameResult:
    response: CcidMessage
    apdu: bool = False  # an XfrBlock reached the card (counted on the lease)
    powered_off: bool = False  # the client powered the card off: the linger starts
    failure: DeviceError | None = None  # the device failed: the lease must end
    refused: Any = None  # what `screen` returned: answered without reaching the card
    # The command went to the card but no answer came back: the card may have acted on it (a
    # VERIFY compared and counted), so the PIN guard must count it as a failed attempt.
    answer_lost: bool = False


# Called with each whole command APDU before the card sees it (bridge_server/guard/guardrails.py):
# None lets it through; anything with an `sw: int` is answered with that status word instead.
Screen = Callable[[bytes], Any]
# Called with each screened command APDU right before the card (issue 16, guard/server_pin.py):
# None sends it as it is; a bytearray is sent instead and overwritten once the card has it.
Rewrite = Callable[[bytes], bytearray | None]


def failure_error(exc: DeviceError) -> tuple[IccStatus, int]:
    """(bmICCStatus, bError) that reports `exc` to the client as a reader would."""
    if isinstance(exc, DeviceGoneError):
        return IccStatus.ABSENT, SlotError.ICC_MUTE
    if isinstance(exc, DeviceTimeoutError):
        return IccStatus.PRESENT_ACTIVE, SlotError.ICC_MUTE
    if isinstance(exc, CardError) and exc.slot_error is not None:
        return IccStatus.PRESENT_ACTIVE, exc.slot_error
    return IccStatus.PRESENT_ACTIVE, SlotError.HW_ERROR


class VirtualReader:
    """Executes one lease's CCID commands against the card. See the module docstring."""

    def __init__(
        self, driver: CardDriver, atr: bytes, *, screen: Screen | None = None, rewrite: Rewrite | None = None
    ) -> None:
        self._driver = driver
        self._screen = screen
        self._rewrite = rewrite
        self.atr = atr
        self.client_powered = True  # the grant's cold reset left the card active
        # Set once a command APDU reached the card (or the client powered it off): its state may
        # differ from a fresh reset's, so the next power-on is a cold reset.
        self._needs_reset = False

    @property
    def _icc(self) -> IccStatus:
        return IccStatus.PRESENT_ACTIVE if self.client_powered else IccStatus.PRESENT_INACTIVE

    async def execute(self, msg: CcidMessage) -> FrameResult:
        if msg.slot != 0:
            return self._failed(msg, BAD_SLOT_OFFSET, icc=IccStatus.ABSENT)
        if msg.msg_type is _MT.PC_to_RDR_IccPowerOn:
            return await self._power_on(msg)
        if msg.msg_type is _MT.PC_to_RDR_XfrBlock:
            return await self._xfr_block(msg)
        if msg.msg_type is _MT.PC_to_RDR_IccPowerOff:
            self.client_powered = False
            self._needs_reset = True
            return FrameResult(slot_status(msg.seq, icc=IccStatus.PRESENT_INACTIVE), powered_off=True)
        if msg.msg_type is _MT.PC_to_RDR_GetSlotStatus:
            return FrameResult(slot_status(msg.seq, icc=self._icc))
        return self._failed(msg, SlotError.CMD_NOT_SUPPORTED)

    async def _power_on(self, msg: CcidMessage) -> FrameResult:
        if self._needs_reset:
            try:
                # DESIGN §4 isolation: a client power cycle must really clear the card's state.
                await self._driver.power_off()
                self.atr = await self._driver.power_on()
            except DeviceError as exc:
                return self._device_failed(msg, exc)
            self._needs_reset = False
        self.client_powered = True
        return FrameResult(data_block(msg.seq, self.atr))

    async def _xfr_block(self, msg: CcidMessage) -> FrameResult:
        if not self.client_powered:
            return self._failed(msg, SlotError.ICC_MUTE)
        if msg.level_parameter != 0:
            # Extended-APDU level with whole APDUs only: we never ask for chained blocks.
            return self._failed(msg, BAD_LEVEL_PARAMETER_OFFSET)
        refused = self._screen(msg.data) if self._screen is not None else None
        if refused is not None:
            # Policy/PIN guard: a status word of our own, and the card never sees the command.
            log.info("apdu.refused", apdu=redact(msg.data), sw=f"{refused.sw:04x}")
            return FrameResult(data_block(msg.seq, refused.sw.to_bytes(2, "big")), refused=refused)
        started = time.perf_counter()
        self._needs_reset = True  # the card may change state from here on, even if this fails
        secret = self._rewrite(msg.data) if self._rewrite is not None else None
        try:
            # bytes(): the driver's contract; its copy (like the T=1 blocks) is not ours to wipe
            rapdu = await self._driver.transmit(msg.data if secret is None else bytes(secret))
        except DeviceError as exc:
            log.warning("apdu.failed", apdu=redact(msg.data), error=str(exc))
            return dataclasses.replace(self._device_failed(msg, exc), answer_lost=True)
        finally:
            wipe(secret)
        if debug_enabled(__name__):  # per APDU: skip building the event at INFO
            log.debug(
                "apdu.exchanged",
                apdu=redact(msg.data),
                sw=rapdu[-2:].hex() if len(rapdu) >= 2 else "",
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        return FrameResult(data_block(msg.seq, rapdu), apdu=True)

    def aborted(self, msg: CcidMessage) -> CcidMessage:
        """The explicit failure for a command abandoned at the card (shutdown): never a SW."""
        return self._failed(msg, SlotError.CMD_ABORTED).response

    def _failed(self, msg: CcidMessage, error: int, *, icc: IccStatus | None = None) -> FrameResult:
        status = status_byte(self._icc if icc is None else icc, CommandStatus.FAILED)
        try:
            resp_type = response_type_for(msg.msg_type)
        except LocalProtocolError:
            resp_type = _MT.RDR_to_PC_SlotStatus  # a response type sent as a command
        return FrameResult(CcidMessage(resp_type, msg.seq, msg.slot, status, error))

    def _device_failed(self, msg: CcidMessage, exc: DeviceError) -> FrameResult:
        icc, error = failure_error(exc)
        status = status_byte(icc, CommandStatus.FAILED)
        resp = CcidMessage(response_type_for(msg.msg_type), msg.seq, msg.slot, status, error)
        return FrameResult(resp, failure=exc)
