"""One configured token as an emulated USB CCID reader, bound to the tunnel like a vpcd slot.

Theory of operation
-------------------
The reader is *exported* for as long as the client runs (a stable bus id, so `usbip attach`
on boot always finds it); the *card* in it follows the tunnel exactly as `VpcdLink` does: it is
inserted while the tunnel is up and the server reports the token present and allowed, and
removed otherwise (NotifySlotChange on the interrupt endpoint; GetSlotStatus says absent).

While an importer has the reader attached, one card task runs the commands the USB side
(`CcidReaderDevice`) cannot answer itself, one at a time:
* IccPowerOn: without a lease the ATR the server reported (pcscd and Windows power a new card
  up just to read it); under a lease an IccPowerOn through the tunnel (the server cold-resets
  the card, so a reset on this machine is a reset on the token).
* IccPowerOff: under a lease an IccPowerOff through the tunnel (the server releases the lease
  after its linger); a USB reset of a powered card does the same.
* XfrBlock: the lease first (queued at the server, bounded by queue_timeout_s), then one
  XfrBlock under it. While the answer is on its way, a time extension goes out every
  `TIME_EXTENSION_INTERVAL_S`, so the host driver's read timeout (libccid: from the ATR, 1.5 s
  for a YubiKey's) does not run out while we queue or cross the network.
Any failure (tunnel down, lease lost, reader error) answers the command with bError HW_ERROR
and removes the card for `REMOVAL_HOLD_S`, as a vpcd slot closes its connection: an application
that believed it was logged in sees a removed card, never an invented status word. A lease that
ends for another reason than our own release does the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import structlog
import trio

from bridge_client.errors import CardFailure, LeaseError, TunnelError
from bridge_client.tunnel import Tunnel
from bridge_client.tunnel_state import TokenState
from bridge_client.usbip import descriptors as d
from bridge_client.usbip import wire
from bridge_client.usbip.device import CcidReaderDevice, Completion, UrbLimitError
from bridge_client.vpcd_link import ReaderStatus
from protocol import NEED_DATA, ccid
from protocol.apdu import redact
from protocol.ccid import CommandStatus, IccStatus, MessageType, SlotError
from protocol.errors import CloseCode, RemoteProtocolError
from protocol.runtime.address import Address
from protocol.runtime.logging import debug_enabled
from protocol.vpcd import MAX_ATR_LENGTH

log = structlog.get_logger(__name__)

TIME_EXTENSION_INTERVAL_S: Final = 0.5
# How long a removed card stays out before it may come back: longer than pcscd's 400 ms
# presence poll, so a lost lease is seen as a removal even when the token is usable again.
REMOVAL_HOLD_S: Final = 1.0
RECEIVE_SIZE: Final = 65536
_SEND_FAILED = (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError)
SEND_QUEUE: Final = 1024  # RET_* packets not yet written; an importer that stops reading is dropped


@dataclass
class UsbipReader:
    """Token `token` as USB device `busid` of the client's USB/IP server."""

    tunnel: Tunnel
    token: str
    index: int  # 0-based: bus id 1-(index+1)
    listen: Address
    queue_timeout_s: float = 900.0
    backend: str = "usbip"
    attached_by: str | None = None
    card_lost: bool = False  # an exchange failed: the card task asks for a removal

    def __post_init__(self) -> None:
        self.status = ReaderStatus(state="exported", reason="not attached by any USB/IP importer")

    @property
    def busid(self) -> str:
        return f"1-{self.index + 1}"

    @property
    def address(self) -> Address:
        return self.listen

    @property
    def token_state(self) -> TokenState:
        return self.tunnel.tokens[self.token]

    def usable(self) -> bool:
        return self.tunnel.connected and self.token_state.usable

    def descriptors(self) -> d.ReaderDescriptors:
        return d.ReaderDescriptors(product=f"tokenbridge {self.token}", serial=f"{self.token}-{self.busid}")

    def exported(self) -> wire.ExportedDevice:
        return wire.ExportedDevice(
            path=f"/sys/devices/platform/tokenbridge/usb1/{self.busid}",
            busid=self.busid,
            busnum=1,
            devnum=self.index + 2,
            speed=wire.Speed.FULL,
            vid=d.VID,
            pid=d.PID,
            bcd_device=d.BCD_DEVICE,
            device_class=0,
            device_subclass=0,
            device_protocol=0,
            configuration_value=d.CONFIGURATION_VALUE,
            num_configurations=1,
            interfaces=((d.CLASS_CCID, 0, 0),),
        )

    # -- one attachment -----------------------------------------------------------------------
    async def serve_attached(self, stream: trio.abc.Stream, side: wire.UsbipServerSide, peer: str) -> None:
        """Run the device for one importer until it detaches (closes) or breaks the protocol."""
        device = CcidReaderDevice(self.descriptors())
        out_send, out_receive = trio.open_memory_channel[bytes](SEND_QUEUE)
        session = _Session(self, device, out_send, out_receive, stream)
        self.status.state, self.status.reason = "attached", ""
        log.info("usbip.attached", token=self.token, busid=self.busid, peer=peer)
        try:
            async with trio.open_nursery() as nursery:
                for child in (
                    session.send_loop,
                    session.card_task,
                    session.presence_task,
                    session.tunnel_watch,
                ):
                    nursery.start_soon(session.guarded, child, nursery.cancel_scope)
                await session.guarded(partial(session.receive_loop, stream, side), nursery.cancel_scope)
                nursery.cancel_scope.cancel()
        finally:
            reason = session.ended
            self.status.state, self.status.reason = "exported", f"detached: {reason}"
            log.info(
                "usbip.detached", token=self.token, busid=self.busid, reason=reason, apdus=self.status.apdus
            )
            if self.token_state.epoch is not None and self.tunnel.connected:
                with trio.move_on_after(2), contextlib.suppress(*_SEND_FAILED):
                    await self.tunnel.release_lease(self.token)


class _Session:
    """One attachment: the connection's tasks around one `CcidReaderDevice`."""

    def __init__(
        self,
        reader: UsbipReader,
        device: CcidReaderDevice,
        out: trio.MemorySendChannel[bytes],
        packets: trio.MemoryReceiveChannel[bytes],
        stream: trio.abc.Stream,
    ) -> None:
        self.reader = reader
        self.device = device
        self.out = out
        self.packets = packets
        self.stream = stream
        self.ended = "importer detached"
        # Both card tasks check the device's state, then park here with no await in between, so a
        # change (unpark_all after every emit) is never missed.
        self._changed = trio.lowlevel.ParkingLot()

    async def guarded(self, task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run one task of the attachment; an error ends the attachment, never the client."""
        try:
            await task()
        except (RemoteProtocolError, UrbLimitError) as exc:
            self.ended = f"protocol error: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.ended = f"connection lost: {exc}"
        scope.cancel()

    async def send_loop(self) -> None:
        """The one writer of the connection: RET_* packets in the order the device produced them."""
        async for packet in self.packets:
            await self.stream.send_all(packet)

    def emit(self, completions: list[Completion]) -> None:
        for c in completions:
            packet = wire.ret_submit(c.seqnum, c.status, data=c.data, actual_length=c.actual_length)
            try:
                self.out.send_nowait(packet)
            except trio.WouldBlock:
                raise trio.BrokenResourceError("the importer stopped reading its answers") from None
        self._changed.unpark_all()

    async def receive_loop(self, stream: trio.abc.Stream, side: wire.UsbipServerSide) -> None:
        while True:
            event = side.next_event()
            if event is NEED_DATA:
                side.receive_data(bytes(await stream.receive_some(RECEIVE_SIZE)))
                continue
            if isinstance(event, wire.Closed):
                return
            if isinstance(event, wire.CmdSubmit):
                endpoint = event.ep | (0x80 if event.direction == wire.Direction.IN else 0)
                self.emit(self.device.submit(event.seqnum, endpoint, event.length, event.setup, event.data))
            elif isinstance(event, wire.CmdUnlink):
                found = self.device.unlink(event.unlink_seqnum)
                self.out.send_nowait(wire.ret_unlink(event.seqnum, wire.UrbStatus.ECONNRESET if found else 0))
            else:
                raise RemoteProtocolError(
                    f"USB/IP: {type(event).__name__} after import", CloseCode.PROTOCOL_ERROR
                )

    async def _wait(self) -> None:
        await self._changed.park()

    # -- the card ---------------------------------------------------------------------------------
    async def presence_task(self) -> None:
        reader, tok = self.reader, self.reader.token_state
        generation = tok.lost_generation
        while True:
            if tok.lost_generation != generation or reader.card_lost:
                generation, reader.card_lost = tok.lost_generation, False
                if self.device.card_present:
                    self._set_present(False, "lease lost")
                    await trio.sleep(REMOVAL_HOLD_S)
                continue
            usable = reader.usable()
            if usable != self.device.card_present:
                self._set_present(usable, "" if usable else reader_why(reader))
            await self._wait()

    async def tunnel_watch(self) -> None:
        """Turn every tunnel change into a wake-up of the card tasks (they re-check, then park)."""
        while True:
            await self.reader.tunnel.wait_changed()
            self._changed.unpark_all()

    def _set_present(self, present: bool, why: str) -> None:
        status = self.reader.status
        status.state = "inserted" if present else "attached"
        status.reason = why
        status.inserted_since = trio.current_time() if present else None
        log.info("reader.inserted" if present else "reader.removed", token=self.reader.token, reason=why)
        self.emit(self.device.set_card_present(present))

    async def card_task(self) -> None:
        while True:
            if self.device.take_power_loss():
                await self._power_off()
            command = self.device.take_command()
            if command is None:
                await self._wait()
                continue
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._time_extensions)
                answer = await self._execute(command)
                nursery.cancel_scope.cancel()
            self.emit(self.device.answer(answer))

    async def _time_extensions(self) -> None:
        while True:
            await trio.sleep(TIME_EXTENSION_INTERVAL_S)
            self.emit(self.device.time_extension())

    async def _execute(self, command: ccid.CcidMessage) -> ccid.CcidMessage:
        try:
            if command.msg_type == MessageType.PC_to_RDR_IccPowerOn:
                return await self._power_on(command.seq)
            if command.msg_type == MessageType.PC_to_RDR_IccPowerOff:
                await self._power_off()
                self.device.powered = False
                return ccid.slot_status(command.seq, icc=IccStatus.PRESENT_INACTIVE)
            return await self._xfr(command)
        except (TunnelError, trio.TooSlowError) as exc:
            reason = "gave up waiting in the lease queue" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning("reader.exchange_failed", token=self.reader.token, reason=reason)
            self.reader.card_lost = True
            self._changed.unpark_all()
            kind = ccid.response_type_for(command.msg_type)
            status = ccid.status_byte(self.device.icc_status(), CommandStatus.FAILED)
            return ccid.CcidMessage(kind, command.seq, 0, status, SlotError.HW_ERROR)

    async def _power_on(self, seq: int) -> ccid.CcidMessage:
        tunnel, tok = self.reader.tunnel, self.reader.token_state
        atr = tok.atr
        if tok.epoch is not None:
            generation = tok.lost_generation
            try:
                response = await tunnel.exchange(self.reader.token, lambda s: ccid.icc_power_on(s))
            except LeaseError:
                # As in VpcdLink: the lease ended normally on the way; the next lease cold-resets.
                if tok.epoch is not None or tok.lost_generation != generation:
                    raise
            else:
                if 1 <= len(response.data) <= MAX_ATR_LENGTH:
                    tok.atr = atr = response.data
        if not 1 <= len(atr) <= MAX_ATR_LENGTH:
            raise CardFailure("the server reported no usable ATR")
        self.device.powered = True
        return ccid.data_block(seq, atr)

    async def _power_off(self) -> None:
        tok = self.reader.token_state
        if tok.epoch is None or not self.reader.tunnel.connected:
            return
        generation = tok.lost_generation
        try:
            await self.reader.tunnel.exchange(self.reader.token, lambda s: ccid.icc_power_off(s))
        except LeaseError:
            if tok.epoch is not None or tok.lost_generation != generation:
                raise

    async def _xfr(self, command: ccid.CcidMessage) -> ccid.CcidMessage:
        reader = self.reader
        with trio.fail_after(reader.queue_timeout_s):
            await reader.tunnel.acquire_lease(reader.token)
        # The server may have fetched the GET RESPONSE chain already (issue 17): the card has
        # answered those, so they are answered here, exactly as the vpcd link does.
        prefetched = reader.tunnel.prefetched[reader.token].answer(bytes(command.data))
        if prefetched is not None:
            reader.status.apdus += 1
            return ccid.data_block(command.seq, prefetched)
        if debug_enabled(__name__):
            log.debug("apdu.sent", token=reader.token, apdu=redact(command.data))
        response = await reader.tunnel.exchange(reader.token, lambda s: ccid.xfr_block(s, command.data))
        if len(response.data) < 2:
            raise CardFailure(f"server answered an APDU with {len(response.data)} bytes (no status word)")
        reader.status.apdus += 1
        return ccid.data_block(command.seq, response.data)


def reader_why(reader: UsbipReader) -> str:
    tunnel, tok = reader.tunnel, reader.tunnel.tokens[reader.token]
    if not tunnel.connected:
        return f"tunnel down: {tunnel.status.reason or 'connecting'}"
    if tok.token_id is None:
        return f"the server offers no token named {reader.token!r} to this client"
    if not tok.present:
        return "token absent on the server"
    if not tok.allowed:
        return "this client is not allowed to use the token"
    return "token has no ATR yet"
