"""The bulk-IN and interrupt-IN pipes of a simulated full-speed token, packet by packet.

Theory of operation. The in-process pyusb backend (`usb_token`) hands out one whole CCID
message per read. A real host stack does not: libusb submits one URB with a large buffer,
the device answers in packets of wMaxPacketSize, and the URB completes on the first short
packet (a zero-length packet, ZLP, when the message is a multiple of the packet size; USB 2.0
§5.8.3), or when the host cancels it on a timeout, with whatever packets had arrived by then
(the kernel gives the URB back with status -ENOENT and `actual_length` of the partial data;
libusb reports LIBUSB_ERROR_TIMEOUT with the byte count and pyusb returns that count).

`PacketPipe` models exactly that and nothing else, with `now` passed in so it stays pure:
`queue()` splits a message into packets that become ready one `packet_interval_s` apart
(the device streams a long answer over several USB frames, or trickles it as the card
produces it); `fill(urb, now)` moves ready packets into an in-flight URB; `cancel(urb)`
completes it with the partial count. A message held back (a slow signature) is announced by
its time-extension frame, repeated every `time_extension_interval_s` (CCID 1.1 §6.2.7).
Used by the umockdev rig (tests/support/usb_rig), where the real libusb is the host.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

ENOENT: Final = 2  # URB killed by the host (usbdevfs DISCARDURB)
EOVERFLOW: Final = 75  # the device sent more than the URB had room for


@dataclass
class Urb:
    """One IN transfer in flight: room for `length` bytes, what arrived, how it ended."""

    length: int
    data: bytearray = field(default_factory=bytearray)
    done: bool = False
    status: int = 0  # 0 or a negative errno, as usbdevfs reports it

    def finish(self, status: int = 0) -> None:
        self.done, self.status = True, status


@dataclass
class _Packet:
    data: bytes
    ready_at: float


@dataclass
class _Held:
    """A message not ready yet, announced by time-extension frames until `ready_at`."""

    packets: list[_Packet]
    ready_at: float
    time_extension: bytes
    next_te_at: float


class PacketPipe:
    """An IN endpoint: queued messages as packets; see the module docstring."""

    def __init__(
        self,
        packet_size: int,
        *,
        packet_interval_s: float = 0.0,
        time_extension_interval_s: float = 0.05,
        zlp: bool = True,
    ) -> None:
        self.packet_size = packet_size
        self.packet_interval_s = packet_interval_s
        self.time_extension_interval_s = time_extension_interval_s
        self.zlp = zlp
        self._packets: deque[_Packet] = deque()
        self._held: deque[_Held] = deque()

    def packets_of(self, message: bytes, start: float) -> list[_Packet]:
        size = self.packet_size
        # range(0, len + 1, size): a message that fills its last packet gets a trailing ZLP.
        stop = len(message) + 1 if self.zlp else max(len(message), 1)
        chunks = [message[i : i + size] for i in range(0, stop, size)]
        return [_Packet(c, start + n * self.packet_interval_s) for n, c in enumerate(chunks)]

    def busy(self, now: float) -> bool:
        """A held answer is not ready yet: the card is still working on an earlier command."""
        self._release(now)
        return bool(self._held)

    def queue(
        self,
        message: bytes,
        now: float,
        *,
        delay_s: float = 0.0,
        time_extension: bytes = b"",
        ahead: bool = False,
    ) -> None:
        """`ahead`: sent at once, before a held answer (a reader's "slot busy" to a new command)."""
        ready_at = now + delay_s
        packets = self.packets_of(message, ready_at)
        if ahead:
            self._packets.extend(packets)
        elif delay_s > 0:  # the card is working: announced by time extensions, if it sends them
            self._held.append(_Held(packets, ready_at, time_extension, now))
        elif self._held:
            self._held.append(_Held(packets, ready_at, b"", ready_at))
        else:
            self._packets.extend(packets)

    def clear(self) -> None:
        self._packets.clear()
        self._held.clear()

    def _release(self, now: float) -> None:
        """Move held messages whose time came into the packet queue; emit due time extensions."""
        while self._held and not self._packets:
            head = self._held[0]
            if head.ready_at <= now:
                self._packets.extend(self._held.popleft().packets)
            elif head.time_extension and head.next_te_at <= now:
                head.next_te_at = now + self.time_extension_interval_s
                self._packets.extend(self.packets_of(head.time_extension, now))
            else:
                return

    def fill(self, urb: Urb, now: float) -> None:
        """Move every packet ready by `now` into `urb`; complete it on a short packet or when full."""
        while not urb.done:
            self._release(now)
            if not self._packets or self._packets[0].ready_at > now:
                return
            packet = self._packets.popleft()
            if len(packet.data) > urb.length - len(urb.data):
                urb.finish(-EOVERFLOW)  # libusb: LIBUSB_ERROR_OVERFLOW, the packet is lost
                return
            urb.data += packet.data
            if len(packet.data) < self.packet_size or len(urb.data) == urb.length:
                urb.finish()

    def next_due(self, now: float) -> float | None:
        """When something may change next (for a handler that sleeps instead of polling)."""
        if self._packets:
            return self._packets[0].ready_at
        if self._held:
            head = self._held[0]
            return min(head.ready_at, head.next_te_at) if head.time_extension else head.ready_at
        return None

    @staticmethod
    def cancel(urb: Urb) -> None:
        """The host gave up on `urb` (timeout): it completes with the partial data it holds."""
        if not urb.done:
            urb.finish(-ENOENT)
