"""One CCID command, one answer: the message layer under `CcidDriver` (split out of ccid_driver).

Theory of operation
-------------------
`exchange(msg)` writes a PC_to_RDR command and reads until the answer that echoes its bSeq.
Frames with another bSeq are stale leftovers of an abandoned exchange and are dropped (at most
`MAX_STALE_FRAMES`, reference §1.3). The per-frame wait is `frame_timeout_s`: 10 s until the ATR
is known, then the card's read timeout as libccid derives it from the ATR (`derive_frame_timeout`),
at least 3 s, or what the token's config fixes; XfrBlock answers of a reader that sends no time
extension get libccid's extra wait (`xfr_extra_s`, ccid_policy.SILENT_READER_EXTRA_S). A time
extension (bStatus 0x80) re-arms the wait multiplied by bError (CCID 1.1 §6.2.6); a command
answered CMD_SLOT_BUSY is sent again with a new bSeq; all of it under `cap_s()` in total.
Every answer is checked for type, bSeq and length before use.
"""

from __future__ import annotations

import dataclasses

import structlog
import trio

from bridge_server.errors import CardError, DeviceTimeoutError
from bridge_server.usb.ccid_policy import (
    DEFAULT_FRAME_TIMEOUT_S,
    MAX_STALE_FRAMES,
    MIN_FRAME_TIMEOUT_S,
    SLOT_BUSY_RETRY_S,
    card_read_timeout_ms,
    silent_reader_extra_s,
    slot_failure,
)
from bridge_server.usb.transport import AsyncUsbDevice
from protocol import ccid
from protocol.atr import Atr
from protocol.ccid import CcidClassDescriptor, CcidMessage, CommandStatus, SlotError
from protocol.errors import MalformedCcidMessageError

log = structlog.get_logger(__name__)


class CcidLink:
    """bSeq, waits and answers for one claimed CCID interface; see the module docstring."""

    def __init__(self, device: AsyncUsbDevice, *, frame_timeout_s: float | None, max_wait_s: float) -> None:
        self.device = device
        # None: DEFAULT_FRAME_TIMEOUT_S until the ATR is in, then derived from it; a number fixes it.
        self.fixed_frame_timeout_s = frame_timeout_s
        self.frame_timeout_s = frame_timeout_s or DEFAULT_FRAME_TIMEOUT_S
        # A reader that sends no time extension while the card computes gets libccid's extra
        # wait on XfrBlock answers (ccid_policy.SILENT_READER_EXTRA_S), unless the config fixes
        # the frame wait. Only XfrBlock: a card computes only there, and a power-off or slot
        # status that waited 5 minutes would hold up recovery and unplug detection.
        self.xfr_extra_s = 0.0 if frame_timeout_s else silent_reader_extra_s(device.info)
        self.max_wait_s = max_wait_s
        self._seq = 0

    def derive_frame_timeout(self, atr: Atr, protocol: int, desc: CcidClassDescriptor) -> None:
        """The card's own read timeout, unless the config fixed one."""
        if self.fixed_frame_timeout_s is None:
            derived = card_read_timeout_ms(atr, protocol, desc) / 1000
            # Not below libccid's own default (3 s): libccid reads in a thread of its own, we read
            # through a worker thread and an event loop shared with every session, where 1.5 s
            # (a YubiKey's value) could be a scheduling stall on a loaded host, not a dead card.
            self.frame_timeout_s = max(MIN_FRAME_TIMEOUT_S, derived)

    def cap_s(self) -> float:
        """The bound on one exchange: max_wait_s, but never below one full frame wait (a card
        whose ATR announces a BWT beyond max_wait_s gets that BWT, as under libccid)."""
        return max(self.max_wait_s, self.frame_timeout_s + self.xfr_extra_s)

    def next_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) & 0xFF
        return seq

    async def exchange(
        self, msg: CcidMessage, *, wait_multiplier: int = 1, extra_s: float = 0.0
    ) -> CcidMessage:
        expected = ccid.response_type_for(msg.msg_type)
        with trio.move_on_after(self.cap_s()) as total:
            while True:
                resp = await self.receive(msg, expected, self.frame_timeout_s * wait_multiplier + extra_s)
                busy = resp.command_status is CommandStatus.FAILED and resp.error == SlotError.CMD_SLOT_BUSY
                if not busy:
                    return resp
                # CCID 1.1 §6.2.6: the slot still works on an earlier (abandoned) command. Its
                # answer comes first and is dropped by bSeq; ask again, under the same cap.
                log.debug("ccid.slot_busy", seq=msg.seq)
                await trio.sleep(SLOT_BUSY_RETRY_S)
                msg = dataclasses.replace(msg, seq=self.next_seq())
        assert total.cancelled_caught
        raise DeviceTimeoutError(
            f"{self.device.info.describe()}: no final answer to {msg.msg_type.name} "
            f"(bSeq {msg.seq}) within {self.cap_s():g} s"
        )

    async def receive(
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
                    raw = await (self.device.transceive(command) if command else self.device.read())
                command = b""  # sent; a cancelled transceive does not get here (it raises below)
                if frame.cancelled_caught:
                    raise DeviceTimeoutError(
                        f"{self.device.info.describe()}: no ccid frame for bSeq {seq} within {wait_s:g} s"
                    )
                resp = ccid.decode_message(raw)
                _ = resp.icc_status, resp.command_status  # RFU bStatus bits raise here, not later
            except MalformedCcidMessageError as exc:
                # Callers (token manager, virtual reader) handle DeviceError: a token that sends
                # garbage fails the exchange like any other card fault (found by tests/fuzz).
                raise CardError(f"{self.device.info.describe()}: malformed ccid answer: {exc}") from exc
            if resp.seq != seq:
                if resp.command_status is CommandStatus.TIME_EXTENSION:
                    # The card is still busy with an abandoned exchange (shutdown, a client gone):
                    # its time extensions only say so; the total wait (`exchange`) bounds them.
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

    # ---- XfrBlock ----

    async def xfr(self, data: bytes, *, bwi: int = 0, level: int = 0) -> CcidMessage:
        msg = ccid.xfr_block(self.next_seq(), data, bwi=bwi, level_parameter=level)
        return await self.exchange(msg, wait_multiplier=max(1, bwi), extra_s=self.xfr_extra_s)

    async def xfr_checked(self, data: bytes, *, level: int = 0) -> CcidMessage:
        resp = await self.xfr(data, level=level)
        if resp.command_status is CommandStatus.FAILED:
            raise slot_failure("XfrBlock", resp)
        return resp

    async def xfr_ok(self, data: bytes, *, level: int = 0) -> bytes:
        return (await self.xfr_checked(data, level=level)).data


__all__ = ["CcidLink"]
