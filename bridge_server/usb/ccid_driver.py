"""CCID host driver: what libccid does for pcscd, done by the token server over `AsyncUsbDevice`.

Theory of operation
-------------------
One `CcidDriver` per claimed token, one exchange at a time (a trio.Lock): write a PC_to_RDR
command with the next 8-bit bSeq, then read until the response that echoes that bSeq. Frames
with another bSeq are stale leftovers of an abandoned exchange and are dropped (at most
`MAX_STALE_FRAMES`, reference §1.3). The per-frame wait is the card's read timeout as libccid
derives it from the ATR (`card_read_timeout_ms`: 260 EGT + BWT + 260 CWT + 1 s for T=1), at
least 3 s (libccid's default), and 10 s before the ATR is known. A response whose bStatus says
"time extension" (0x80) is re-read with the per-frame wait multiplied by bError (reference
§1.10.3), under a hard cap on the total wait (max_wait_s, never below one frame wait). A command
answered CMD_SLOT_BUSY is sent again with a new bSeq until the slot is free, under the same cap.
Every response is checked for type, bSeq and length before use. Here we are stricter than
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
AUTO_IFSD the reader already negotiated, and the reader's IFSD is min(dwMaxIFSD, 254). We
never send a PPS: the card then stays at its default Fd/Dd, which every token here accepts, and
SetParameters says so (Fi/Di 0x11 unless the card is in specific mode, reference §1.12).

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

import dataclasses
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
from bridge_server.usb.ccid_policy import (
    CHAIN_BEGIN,
    CHAIN_MIDDLE,
    CHAIN_MORE,
    DEFAULT_FRAME_TIMEOUT_S,
    MAX_RESPONSE_APDU,
    MAX_STALE_FRAMES,
    MAX_T0_ROUNDS,
    MAX_T1_IFS,
    MIN_FRAME_TIMEOUT_S,
    SLOT_BUSY_RETRY_S,
    card_read_timeout_ms,
    choose_protocol,
    effective_features,
    extended_chunks,
    parse_card_atr,
    power_select_sequence,
    pps_confirmed,
    pps_fidi,
    pps_request,
    silent_reader_extra_s,
    slot_error_name,
    slot_failure,
    t0_parameters,
    t1_block_length,
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
    SlotError,
)
from protocol.errors import MalformedAtrError, MalformedCcidMessageError, T1Error
from protocol.runtime.logging import debug_enabled
from protocol.t1 import ApduComplete, SendBlock, T1Reader, at_most_once

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
        # None: DEFAULT_FRAME_TIMEOUT_S until the ATR is in, then the card's own read timeout
        # as libccid derives it from the ATR (card_read_timeout_ms); a number fixes it.
        self._fixed_frame_timeout_s = frame_timeout_s
        self._frame_timeout_s = frame_timeout_s or DEFAULT_FRAME_TIMEOUT_S
        # A reader that sends no time extension while the card computes gets libccid's extra
        # wait on XfrBlock answers (ccid_policy.SILENT_READER_EXTRA_S), unless the config fixes
        # the frame wait. Only XfrBlock: a card computes only there, and a power-off or slot
        # status that waited 5 minutes would hold up recovery and unplug detection.
        self._xfr_extra_s = 0.0 if frame_timeout_s else silent_reader_extra_s(device.info)
        self._max_wait_s = max_wait_s
        self._seq = 0
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
            resp = await self._exchange(ccid.icc_power_off(self._next_seq()))
            if resp.command_status is CommandStatus.FAILED:
                raise slot_failure("IccPowerOff", resp)

    async def slot_present(self) -> bool:
        async with self._lock:
            resp = await self._exchange(ccid.get_slot_status(self._next_seq()))
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
        if self._fixed_frame_timeout_s is None:
            derived = card_read_timeout_ms(atr, protocol, self._desc) / 1000
            # Not below libccid's own default (3 s): libccid reads in a thread of its own, we read
            # through a worker thread and an event loop shared with every session, where 1.5 s
            # (a YubiKey's value) could be a scheduling stall on a loaded host, not a dead card.
            self._frame_timeout_s = max(MIN_FRAME_TIMEOUT_S, derived)
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
                await self._exchange(ccid.icc_power_off(self._next_seq()))
            resp = await self._exchange(ccid.icc_power_on(self._next_seq(), power_select=select))
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
        fidi = pps_confirmed(request, await self._xfr_ok(request))
        log.info("card.pps_negotiated", request=request.hex(), fidi=None if fidi is None else f"{fidi:02x}")
        return fidi

    async def _set_parameters(self, protocol: int, atr: Atr, pps1: int | None) -> None:
        params = t1_parameters(atr, pps1) if protocol == 1 else t0_parameters(atr, pps1)
        resp = await self._exchange(ccid.set_parameters(self._next_seq(), protocol, params))
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
            await self._run_t1(self._t1.begin_ifs(ifsd))
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
        with trio.move_on_after(self._cap_s()):
            return await self._transmit_level(apdu)
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: apdu exchange not finished within {self._cap_s():g} s"
        )

    async def _transmit_level(self, apdu: bytes) -> bytes:
        if self._level is ExchangeLevel.EXTENDED_APDU:
            return await self._transmit_extended(apdu)
        if self._level is ExchangeLevel.SHORT_APDU:
            return await self._xfr_ok(apdu)
        if self._protocol == 1:
            assert self._t1 is not None
            return await self._run_t1(self._t1.begin_apdu(apdu))
        return await self._transmit_t0(apdu)

    async def _run_t1(self, block: bytes) -> bytes:
        """Drive the T1Reader: one T=1 block per XfrBlock until it reports completion."""
        assert self._t1 is not None
        bwi = 0
        step: SendBlock | ApduComplete
        while True:
            resp = await self._xfr(block, bwi=bwi)
            if resp.command_status is CommandStatus.FAILED:
                recoverable = (SlotError.XFR_PARITY_ERROR, SlotError.ICC_MUTE)
                if resp.error not in recoverable or resp.icc_status is IccStatus.ABSENT:
                    raise slot_failure("XfrBlock", resp)
                step = self._t1.receive_error()  # libccid: parity/mute → R-block (§1.10.5)
            else:
                step = self._t1.receive(self._t1_block(resp.data))
            if isinstance(step, ApduComplete):
                return step.apdu
            block, bwi = step.block, step.wtx

    def _t1_block(self, data: bytes) -> bytes:
        end = t1_block_length(data, self._t1_checksum)
        if end is None:
            return data
        log.warning(
            "t1.trailing_bytes_ignored", length=len(data), block_length=end, reason="libccid ignores them"
        )
        return data[:end]

    async def _transmit_t0(self, apdu: bytes) -> bytes:
        """T=0 TPDU: 6Cxx → resend with Le=xx; 61xx → GET RESPONSE until the card is done."""
        if len(apdu) > 5 and len(apdu) == 6 + apdu[4]:
            apdu = apdu[:-1]  # ISO 7816-3 §12.2.1: case 4 goes as case 3; the card answers 61xx
        resp = await self._xfr_ok(apdu)
        # 6Cxx asks for the same header again; a PIN-class command is never sent twice (P2),
        # so its 6Cxx goes back to the client, which decides itself whether to send it again.
        if len(resp) >= 2 and resp[-2] == 0x6C and len(apdu) == 5 and not at_most_once(apdu):
            resp = await self._xfr_ok(apdu[:4] + resp[-1:])
        body = bytearray()
        for _ in range(MAX_T0_ROUNDS):
            if len(resp) < 2 or resp[-2] != 0x61:
                return bytes(body + resp)
            body += resp[:-2]
            if len(body) > MAX_RESPONSE_APDU:
                raise CardError(f"T=0 response exceeds {MAX_RESPONSE_APDU} bytes")
            resp = await self._xfr_ok(bytes([apdu[0] & ~0x10 & 0xFF, 0xC0, 0x00, 0x00, resp[-1]]))
        raise CardError(f"card kept answering 61xx for {MAX_T0_ROUNDS} rounds")

    async def _transmit_extended(self, apdu: bytes) -> bytes:
        chunks = extended_chunks(apdu, self._desc.max_ccid_message_length)
        for data, level in chunks[:-1]:
            await self._xfr_ok(data, level=level)  # an empty DataBlock acknowledges each chunk
        data, level = chunks[-1]
        resp = await self._xfr_checked(data, level=level)
        body = bytearray(resp.data)
        while resp.chain_parameter in (CHAIN_BEGIN, CHAIN_MIDDLE, CHAIN_MORE):
            resp = await self._xfr_checked(b"", level=CHAIN_MORE)
            body += resp.data
            if len(body) > MAX_RESPONSE_APDU:
                raise CardError(f"chained response exceeds {MAX_RESPONSE_APDU} bytes")
        return bytes(body)

    async def _xfr(self, data: bytes, *, bwi: int = 0, level: int = 0) -> CcidMessage:
        msg = ccid.xfr_block(self._next_seq(), data, bwi=bwi, level_parameter=level)
        return await self._exchange(msg, wait_multiplier=max(1, bwi), extra_s=self._xfr_extra_s)

    async def _xfr_checked(self, data: bytes, *, level: int = 0) -> CcidMessage:
        resp = await self._xfr(data, level=level)
        if resp.command_status is CommandStatus.FAILED:
            raise slot_failure("XfrBlock", resp)
        return resp

    async def _xfr_ok(self, data: bytes, *, level: int = 0) -> bytes:
        return (await self._xfr_checked(data, level=level)).data

    # ---- one command, one response ----

    def _cap_s(self) -> float:
        """The bound on one exchange: max_wait_s, but never below one full frame wait (a card
        whose ATR announces a BWT beyond max_wait_s gets that BWT, as under libccid)."""
        return max(self._max_wait_s, self._frame_timeout_s + self._xfr_extra_s)

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) & 0xFF
        return seq

    async def _exchange(
        self, msg: CcidMessage, *, wait_multiplier: int = 1, extra_s: float = 0.0
    ) -> CcidMessage:
        expected = ccid.response_type_for(msg.msg_type)
        with trio.move_on_after(self._cap_s()) as total:
            while True:
                resp = await self._receive(msg, expected, self._frame_timeout_s * wait_multiplier + extra_s)
                busy = resp.command_status is CommandStatus.FAILED and resp.error == SlotError.CMD_SLOT_BUSY
                if not busy:
                    return resp
                # CCID 1.1 §6.2.6: the slot still works on an earlier (abandoned) command. Its
                # answer comes first and is dropped by bSeq; ask again, under the same cap.
                log.debug("ccid.slot_busy", seq=msg.seq)
                await trio.sleep(SLOT_BUSY_RETRY_S)
                msg = dataclasses.replace(msg, seq=self._next_seq())
        assert total.cancelled_caught
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: no final answer to {msg.msg_type.name} "
            f"(bSeq {msg.seq}) within {self._cap_s():g} s"
        )

    async def _receive(
        self, msg: CcidMessage, expected: ccid.MessageType, frame_timeout_s: float
    ) -> CcidMessage:
        """Send `msg` and read until its answer: the write and the first read are one
        `transceive` (one worker-thread hop), later frames (stale, time extension) plain reads."""
        seq, command = msg.seq, msg.encode()
        stale = 0
        wait_s = frame_timeout_s
        while True:
            try:
                with trio.move_on_after(wait_s) as frame:
                    raw = await (self._device.transceive(command) if command else self._device.read())
                command = b""  # sent; a cancelled transceive does not get here (it raises below)
                if frame.cancelled_caught:
                    raise DeviceTimeoutError(
                        f"{self._device.info.describe()}: no ccid frame for bSeq {seq} within {wait_s:g} s"
                    )
                resp = ccid.decode_message(raw)
                _ = resp.icc_status, resp.command_status  # RFU bStatus bits raise here, not later
            except MalformedCcidMessageError as exc:
                # Callers (token manager, virtual reader) handle DeviceError: a token that sends
                # garbage fails the exchange like any other card fault (found by tests/fuzz).
                raise CardError(f"{self._device.info.describe()}: malformed ccid answer: {exc}") from exc
            if resp.seq != seq:
                if resp.command_status is CommandStatus.TIME_EXTENSION:
                    # The card is still busy with an abandoned exchange (shutdown, a client gone):
                    # its time extensions only say so; the total wait (`_exchange`) bounds them.
                    continue
                stale += 1
                log.debug("ccid.stale_dropped", seq=resp.seq, expected_seq=seq)
                if stale >= MAX_STALE_FRAMES:
                    raise CardError(f"{stale} ccid frames with a foreign bSeq (expected {seq})")
                continue
            if resp.msg_type is not expected:
                raise CardError(f"ccid answer type {resp.msg_type.name} does not match {expected.name}")
            if resp.command_status is CommandStatus.TIME_EXTENSION:
                # CCID 1.1 §6.2.6: bError is the multiplier of the waiting time (0 = keep it).
                wait_s = frame_timeout_s * max(1, resp.error)
                log.debug("ccid.time_extension", seq=seq, multiplier=resp.error)
                continue
            return resp

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
        await self._exchange(ccid.icc_power_off(self._next_seq()))
        await self._power_on()

    async def _abort_then_cold_reset(self) -> None:
        assert self._rescue is not None
        seq = self._next_seq()
        await self._rescue.abort_request(seq)  # a reader that stalls it does not support Abort
        with trio.move_on_after(self._cap_s()):
            resp = await self._receive(
                ccid.abort(seq), ccid.MessageType.RDR_to_PC_SlotStatus, self._frame_timeout_s
            )
            if resp.command_status is CommandStatus.FAILED:
                raise slot_failure("Abort", resp)
            await self._cold_reset()
            return
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: abort not finished within {self._cap_s():g} s"
        )

    async def _usb_reset_then_power_on(self) -> None:
        assert self._rescue is not None
        await self._rescue.usb_reset()
        with trio.move_on_after(self._cap_s()):
            await self._power_on()
            return
        raise DeviceTimeoutError(
            f"{self._device.info.describe()}: no power-up within {self._cap_s():g} s of a usb reset"
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
