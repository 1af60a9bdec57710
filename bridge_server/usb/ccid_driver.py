"""CCID host driver: what libccid does for pcscd, done by the token server over `AsyncUsbDevice`.

Theory of operation
-------------------
One `CcidDriver` per claimed token, one exchange at a time (a trio.Lock). One command, one
answer is `CcidLink` (ccid_link.py: bSeq, the ATR-derived frame wait, time extensions, slot
busy, stale frames, the cap on one exchange); the exchange levels are ccid_levels.py.
The link checks every answer's type, bSeq and length. Here we are stricter than
libccid on purpose: libccid reads an XfrBlock answer without checking its bSeq, but only because
its CCID_Receive does not know the bSeq CCID_Transmit used (ReadPort(..., -1)); its commit
1addd75 (2021) states the rule it applies everywhere else, "ignore packets with a bSeq that does
not correspond to the command sent", and CCID 1.1 §6.2.1 says the answer echoes the bSeq. We
also abandon exchanges (libccid never does), so the late answer of an abandoned XfrBlock must
be told from the current one by its bSeq. Other leniencies of libccid we share, with a warning:
a wrong TCK or bytes after the ATR (`ccid_policy.parse_card_atr`) and bytes after a T=1 block
(`ccid_policy.t1_block_length`).

`power_on()` follows reference §1.10.1: IccPowerOn (automatic voltage, else 5 V → 3 V → 1.8 V),
ATR, SetParameters unless the reader negotiates itself (AUTO_PPS_PROP), and for TPDU T=1 a fresh
`T1Reader` plus the S(IFS) request unless AUTO_IFSD (or the 0529:0620 fw 0.12/0.13 quirk); with
AUTO_IFSD the reader already negotiated, and the reader's IFSD is min(dwMaxIFSD, 254). A PPS
goes out where libccid sends one (`ccid_policy.pps_request`: TPDU reader without automatic PPS,
card faster than the default rate); SetParameters then carries the Fi/Di the card confirmed,
else 0x11 (TA1 in specific mode, reference §1.12).

`transmit()` hides the exchange level (reference §1.10.2): TPDU T=1 (one block per XfrBlock,
bBWI = WTX multiplier), TPDU T=0 (one XfrBlock, 61xx/6Cxx handled), short APDU (one XfrBlock) and
extended APDU (wLevelParameter chaining both ways, §1.10.4). A failed exchange leaves the card
in an unknown state, so the driver resets it (`_recover`: cold reset, then, when the slot
stays busy or silent, CCID Abort, then a USB reset) and raises CardError: the caller fails the
APDU instead of inventing a status word. Nothing here sends a PIN-class command twice (promise
P2, docs/guardrails.md): `T1Reader` ends it in T1Error after a resynch, a T=0 6Cxx answer to it
goes back as it is, and no failed exchange is ever retried (recovery resets, it never replays).
An exchange cancelled half-way (lease revoked, client gone) triggers the same recovery before
the next APDU. libccid sends no Abort and never resets the device (most tokens stall the ABORT
class request, §1.6); we try both only after a cold reset failed, where pcscd would leave the
reader hung. No Gemalto GET_FIRMWARE_FEATURES escape: it only feeds pinpad logic we do not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog
import trio

from bridge_server.errors import (
    CardError,
    DeviceError,
    DeviceGoneError,
    DeviceStallError,
    DeviceTimeoutError,
)
from bridge_server.usb.ccid_levels import run_t1, transmit_extended, transmit_t0
from bridge_server.usb.ccid_link import CcidLink
from bridge_server.usb.ccid_policy import (
    MAX_T1_IFS,
    choose_protocol,
    effective_features,
    extended_chunks,
    parse_card_atr,
    power_select_sequence,
    pps_confirmed,
    pps_fidi,
    pps_request,
    slot_error_name,
    slot_failure,
    t0_parameters,
    t1_parameters,
)
from bridge_server.usb.transport import AsyncUsbDevice
from protocol import ccid
from protocol.apdu import redact
from protocol.atr import Atr, Checksum
from protocol.ccid import (
    CcidMessage,
    CommandStatus,
    ExchangeLevel,
    Feature,
    HardwareError,
    IccStatus,
    NotifySlotChange,
)
from protocol.errors import MalformedAtrError, MalformedCcidMessageError, T1Error
from protocol.runtime.logging import debug_enabled
from protocol.t1 import T1Reader

log = structlog.get_logger(__name__)

_RESET_WORTHY = (CardError, T1Error, MalformedCcidMessageError, DeviceStallError, DeviceTimeoutError)


class Rescue(Protocol):
    """What recovery needs beyond CCID messages; `AsyncUsbDevice` provides it."""

    async def abort_request(self, seq: int) -> None: ...
    async def usb_reset(self) -> None: ...


class CcidDriver:
    """Async CCID host for one single-slot token; see the module docstring."""

    def __init__(
        self,
        device: AsyncUsbDevice,
        *,
        frame_timeout_s: float | None = None,
        max_wait_s: float = 60.0,
        rescue: Rescue | None = None,
        data_rates: Sequence[int] | None = None,
    ) -> None:
        self._device = device
        self._rescue = rescue  # Abort and USB reset for recovery; None: cold reset only
        self._data_rates = data_rates  # the reader's GET_DATA_RATES answer; None: not supported
        self._desc = device.descriptor
        self._level = self._desc.exchange_level
        if self._level is ExchangeLevel.CHARACTER:
            raise DeviceError(f"{device.info.describe()}: character-level ccid readers are not supported")
        self._features = effective_features(self._desc, device.info)
        self._link = CcidLink(device, frame_timeout_s=frame_timeout_s, max_wait_s=max_wait_s)
        self._lock = trio.Lock()
        self._atr: Atr | None = None
        self._protocol: int | None = None
        self._t1: T1Reader | None = None
        self._t1_checksum = Checksum.LRC  # the EDC of the T=1 blocks, from the ATR
        self._interrupted = False

    @property
    def atr(self) -> bytes | None:
        return None if self._atr is None else self._atr.raw

    @property
    def protocol(self) -> int | None:
        return self._protocol

    # ---- public API ----

    async def power_on(self) -> bytes:
        """Cold start: IccPowerOn, parameters, IFSD. Returns the ATR."""
        async with self._lock:
            return await self._power_on()

    async def power_off(self) -> None:
        async with self._lock:
            self._forget_card()
            resp = await self._link.exchange(ccid.icc_power_off(self._link.next_seq()))
            if resp.command_status is CommandStatus.FAILED:
                raise slot_failure("IccPowerOff", resp)

    async def slot_present(self) -> bool:
        async with self._lock:
            resp = await self._link.exchange(ccid.get_slot_status(self._link.next_seq()))
            # ICC_MUTE here only means "no card answering" (reference §1.4): use bmICCStatus.
            return resp.icc_status is not IccStatus.ABSENT

    async def transmit(self, apdu: bytes) -> bytes:
        """Whole C-APDU in, whole R-APDU out, at whatever level the reader exchanges."""
        async with self._lock:
            if self._interrupted:
                log.warning("card.reset", reason="previous exchange interrupted")
                await self._recover()
            if self._atr is None:
                raise CardError("the card is not powered on; power it on first")
            self._check_fits(apdu)
            debug = debug_enabled(__name__)
            if debug:
                log.debug("apdu.sent", apdu=redact(apdu))
            self._interrupted = True  # cleared only when the exchange ends, not when it is cancelled
            try:
                rapdu = await self._transmit_bounded(apdu)
            except DeviceGoneError:
                self._forget_card()
                raise
            except _RESET_WORTHY as exc:
                log.warning("apdu.failed", reason=str(exc))
                await self._recover()
                if isinstance(exc, DeviceTimeoutError):
                    raise
                raise CardError(
                    f"apdu exchange failed and the card was reset: {exc}", getattr(exc, "slot_error", None)
                ) from exc
            self._interrupted = False
            if debug:
                log.debug("apdu.received", sw=rapdu[-2:].hex(), length=len(rapdu))
            return rapdu

    async def watch_interrupts(
        self, send_channel: trio.MemorySendChannel[NotifySlotChange | HardwareError]
    ) -> None:
        """Forward interrupt-IN events until the device goes (DeviceGoneError); closes the channel.

        Returns at once when the device has no interrupt endpoint: poll `slot_present()` instead.
        """
        async with send_channel:
            if not self._device.has_interrupt:
                return
            while True:
                raw = await self._device.read_interrupt()
                try:
                    event = ccid.decode_interrupt(raw)
                except MalformedCcidMessageError as exc:
                    log.warning("ccid.interrupt_dropped", reason=str(exc))
                    continue
                await send_channel.send(event)

    # ---- power-up ----

    async def _power_on(self) -> bytes:
        self._forget_card()
        self._interrupted = False
        resp = await self._icc_power_on()
        try:
            atr, problem = parse_card_atr(resp.data)
        except MalformedAtrError as exc:
            raise CardError(
                f"card answered power-on with a malformed atr {resp.data.hex(' ')}: {exc}"
            ) from exc
        if problem is not None:
            log.warning("card.atr_accepted", atr=atr.raw.hex(), problem=problem, reason="libccid accepts it")
        protocol = choose_protocol(atr, self._desc)
        self._link.derive_frame_timeout(atr, protocol, self._desc)
        if not self._features & Feature.AUTO_PPS_PROP:
            await self._set_parameters(protocol, atr, await self._negotiate_pps(atr, protocol))
        if self._level is ExchangeLevel.TPDU and protocol == 1:
            self._t1_checksum = atr.checksum
            if self._features & Feature.AUTO_IFSD:
                # CCID 1.1 §5.1 (0x400): the reader negotiated IFSD itself, so the card sends
                # blocks of up to dwMaxIFSD; libccid takes min(dwMaxIFSD, 254) as its IFSD too.
                ifsd = min(self._desc.max_ifsd, MAX_T1_IFS)
                self._t1 = T1Reader(ifsc=atr.ifsc, checksum=atr.checksum, ifsd=ifsd if ifsd > 0 else 32)
            else:
                self._t1 = T1Reader(ifsc=atr.ifsc, checksum=atr.checksum)
                await self._negotiate_ifsd()
        self._atr, self._protocol = atr, protocol
        log.info("card.powered_on", protocol=protocol, level=self._level.value, atr=atr.raw.hex())
        return atr.raw

    async def _icc_power_on(self) -> CcidMessage:
        resp: CcidMessage | None = None
        for select in power_select_sequence(self._desc, self._features):
            if resp is not None:  # deactivate before trying the next class (ISO 7816-3 §6.2.4)
                await self._link.exchange(ccid.icc_power_off(self._link.next_seq()))
            resp = await self._link.exchange(ccid.icc_power_on(self._link.next_seq(), power_select=select))
            if resp.command_status is CommandStatus.OK:
                return resp
            if resp.icc_status is IccStatus.ABSENT:
                break
        assert resp is not None
        raise slot_failure("IccPowerOn", resp)

    async def _negotiate_pps(self, atr: Atr, protocol: int) -> int | None:
        """PPS where libccid sends one (ccid_policy.pps_request); the Fi/Di the card took.

        Only at TPDU level: there the XfrBlock goes to the card as it is; a reader exchanging
        APDUs would take FF xx as a command (libccid sends it at every level, and those readers
        all negotiate themselves, AUTO_PPS_PROP)."""
        if self._level is not ExchangeLevel.TPDU:
            return None
        request = pps_request(atr, self._desc, protocol, pps_fidi(atr, self._desc, self._data_rates))
        if request is None:
            return None
        fidi = pps_confirmed(request, await self._link.xfr_ok(request))
        log.info("card.pps_negotiated", request=request.hex(), fidi=None if fidi is None else f"{fidi:02x}")
        return fidi

    async def _set_parameters(self, protocol: int, atr: Atr, pps1: int | None) -> None:
        params = t1_parameters(atr, pps1) if protocol == 1 else t0_parameters(atr, pps1)
        resp = await self._link.exchange(ccid.set_parameters(self._link.next_seq(), protocol, params))
        if resp.command_status is not CommandStatus.FAILED:
            return
        # libccid: bError 1..127 = "parameter not changeable" is success; 0 = not supported (§1.4).
        if 0 <= resp.error < 0x80:
            log.info("ccid.parameters_kept", reason=slot_error_name(resp.error))
            return
        raise slot_failure("SetParameters", resp)

    async def _negotiate_ifsd(self) -> None:
        assert self._t1 is not None
        ifsd = min(self._desc.max_ifsd, MAX_T1_IFS)
        if ifsd <= 0:
            return
        try:
            await run_t1(self._link, self._t1, self._t1_checksum, self._t1.begin_ifs(ifsd))
        except T1Error as exc:
            raise CardError(f"T=1 IFSD negotiation (IFSD {ifsd}) failed: {exc}") from exc

    # ---- exchange levels ----

    def _check_fits(self, apdu: bytes) -> None:
        limit = self._desc.max_apdu_data
        # Short APDU and T=0 TPDU carry the whole APDU in one XfrBlock; libccid refuses, so do we.
        one_block = self._level is ExchangeLevel.SHORT_APDU or (
            self._level is ExchangeLevel.TPDU and self._protocol == 0
        )
        if one_block and len(apdu) > limit:
            raise CardError(
                f"apdu of {len(apdu)} bytes exceeds the reader's {limit}-byte limit at "
                f"{self._level.value} level (no chaining there)"
            )

    async def _transmit_bounded(self, apdu: bytes) -> bytes:
        """The whole APDU under one `max_wait_s` deadline: a token that keeps the exchange alive
        with well-formed chatter (endless T=1 S(WTX), empty chained blocks) is cut off, not
        served forever (found by tests/fuzz/test_ccid_driver_fuzz.py)."""
        with trio.move_on_after(self._link.cap_s()):
            return await self._transmit_level(apdu)
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: apdu exchange not finished within {self._link.cap_s():g} s"
        )

    async def _transmit_level(self, apdu: bytes) -> bytes:
        if self._level is ExchangeLevel.EXTENDED_APDU:
            return await transmit_extended(self._link, self._desc.max_ccid_message_length, apdu)
        if self._level is ExchangeLevel.SHORT_APDU:
            return await self._link.xfr_ok(apdu)
        if self._protocol == 1:
            assert self._t1 is not None
            return await run_t1(self._link, self._t1, self._t1_checksum, self._t1.begin_apdu(apdu))
        return await transmit_t0(self._link, apdu)

    # ---- recovery ----

    def _forget_card(self) -> None:
        self._atr, self._protocol, self._t1 = None, None, None

    async def _recover(self) -> None:
        """Bring the card back after a failed or interrupted exchange (issue 15 item 6).

        Escalating, each step bounded by the exchange cap: (1) cold reset: IccPowerOff (asked
        again while the slot answers CMD_SLOT_BUSY; the abandoned answer is dropped by bSeq),
        then power-up; with a `rescue` (a real device) then (2) CCID 1.1 §5.3.1 Abort: the
        ABORT class request and PC_to_RDR_Abort (§6.1.13) with the same bSeq, then the cold
        reset; and (3) a USB reset (the card loses power; libusb re-claims the interface), then
        power-up. libccid has none of (2) and (3): pcscd leaves a hung reader hung."""
        self._interrupted = False
        self._forget_card()
        steps = [("cold_reset", self._cold_reset)]
        if self._rescue is not None:
            steps += [("abort", self._abort_then_cold_reset), ("usb_reset", self._usb_reset_then_power_on)]
        for name, step in steps:
            try:
                await step()
            except DeviceGoneError:
                raise
            except (DeviceError, MalformedCcidMessageError, T1Error) as exc:
                log.warning("card.recovery_step_failed", step=name, reason=str(exc))
                continue
            log.info("card.reset", reason="failed exchange", step=name)
            return
        self._forget_card()
        log.warning("card.reset_failed", reason="no recovery step brought the card back")

    async def _cold_reset(self) -> None:
        await self._link.exchange(ccid.icc_power_off(self._link.next_seq()))
        await self._power_on()

    async def _abort_then_cold_reset(self) -> None:
        assert self._rescue is not None
        seq = self._link.next_seq()
        await self._rescue.abort_request(seq)  # a reader that stalls it does not support Abort
        with trio.move_on_after(self._link.cap_s()):
            resp = await self._link.receive(
                ccid.abort(seq), ccid.MessageType.RDR_to_PC_SlotStatus, self._link.frame_timeout_s
            )
            if resp.command_status is CommandStatus.FAILED:
                raise slot_failure("Abort", resp)
            await self._cold_reset()
            return
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: abort not finished within {self._link.cap_s():g} s"
        )

    async def _usb_reset_then_power_on(self) -> None:
        assert self._rescue is not None
        await self._rescue.usb_reset()
        with trio.move_on_after(self._link.cap_s()):
            await self._power_on()
            return
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: no power-up within {self._link.cap_s():g} s of a usb reset"
        )


__all__ = [
    "CcidDriver",
    "Rescue",
    "choose_protocol",
    "effective_features",
    "extended_chunks",
    "power_select_sequence",
    "slot_error_name",
    "t0_parameters",
    "t1_parameters",
]
