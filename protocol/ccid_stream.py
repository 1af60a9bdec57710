"""Whole CCID messages out of bulk-IN transfers of any size (pure, no I/O).

Theory of operation: a CCID device ends each bulk-IN message with a short packet, so a USB
transfer normally carries exactly one message (CCID 1.1 §5.2.2, reference §1.3). A transfer
the host cancels on a timeout does not: the kernel gives back the packets that had arrived,
libusb reports a timeout *with* bytes transferred, and pyusb returns that count as a normal
read. The rest of the message arrives in the next transfer. So the host keeps what a transfer
brought and has a message only once its 10 + dwLength bytes are in (what libccid's reader
does, reference §1.3). An empty transfer (a zero-length packet) adds nothing.

A cut transfer always holds whole packets (a short packet would have ended it), so the host
knows when a transfer ended at the device's end of message: a byte count that is not a
multiple of wMaxPacketSize, or zero (USB 2.0 §5.8.3). A message still incomplete then was
truncated by the device: it is refused at once instead of waiting for bytes that will not come
(and then mistaking the next message's first bytes for its tail).

`BulkInAssembler.receive_data(bytes)` takes a transfer; `next_message()` returns one whole
message or None. A header that announces more than `max_message_length` raises at once and
drops the buffer: waiting for that many bytes would hold memory and time for nothing.
"""

from __future__ import annotations

from protocol.ccid import HEADER_LEN, MAX_MESSAGE_LENGTH
from protocol.errors import MalformedCcidMessageError

__all__ = ["BulkInAssembler"]


class BulkInAssembler:
    """Buffers bulk-IN bytes until a whole CCID message is in; see the module docstring."""

    def __init__(self, max_message_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._max = min(max_message_length, MAX_MESSAGE_LENGTH)
        self._buf = bytearray()
        self._ended = False

    @property
    def buffered(self) -> int:
        """Bytes of a message not yet complete."""
        return len(self._buf)

    def receive_data(self, data: bytes, *, transfer_ended: bool = False) -> None:
        """Add one transfer; `transfer_ended`: it ended with a short packet, not the host's timeout."""
        self._buf += data
        self._ended = transfer_ended

    def clear(self) -> None:
        self._buf.clear()

    def _refuse_if_ended(self, template: str) -> None:
        """The transfer ended (short packet) before the message did: drop it and say so."""
        if not (self._ended and self._buf):
            return
        got = len(self._buf)
        self._buf.clear()
        raise MalformedCcidMessageError(template.format(got=got, data=got - HEADER_LEN))

    def next_message(self) -> bytes | None:
        if len(self._buf) < HEADER_LEN:
            self._refuse_if_ended("ccid message of {got} bytes is shorter than the header")
            return None
        end = HEADER_LEN + int.from_bytes(self._buf[1:5], "little")
        if end > self._max:
            head = bytes(self._buf[:HEADER_LEN])
            self._buf.clear()
            raise MalformedCcidMessageError(
                f"ccid header {head.hex()} announces {end} bytes, more than the {self._max} allowed"
            )
        if len(self._buf) < end:
            length = end - HEADER_LEN
            self._refuse_if_ended(f"ccid dwLength {length} does not match the {{data}} data bytes received")
            return None
        message = bytes(self._buf[:end])
        del self._buf[:end]
        return message
