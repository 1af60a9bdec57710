"""A tiny CCID host for the simulator tests, using pyusb's public API only."""

from __future__ import annotations

from collections.abc import Callable

import usb.core
import usb.util

from bridge_server.simulator.backend import SimulatedToken, SimulatorBackend
from protocol.ccid import (
    CcidClassDescriptor,
    CcidMessage,
    CommandStatus,
    decode_message,
    icc_power_on,
    xfr_block,
)

CCID_CLASS = 0x0B
READ_SIZE = 10 + 65546  # libccid reads every response into a buffer this big (reference §1.3)


def _endpoint(intf: usb.core.Interface, direction: int, ep_type: int) -> usb.core.Endpoint | None:
    return usb.util.find_descriptor(
        intf,
        custom_match=lambda e: (
            usb.util.endpoint_direction(e.bEndpointAddress) == direction
            and usb.util.endpoint_type(e.bmAttributes) == ep_type
        ),
    )


class FakeCard:
    """A card with PivCard's interface whose answers the test chooses."""

    def __init__(self, answer: Callable[[bytes], bytes] | None = None) -> None:
        self.answer = answer or echo_reversed
        self.apdus: list[bytes] = []
        self.power_ons = 0
        self.power_offs = 0

    def power_on(self) -> None:
        self.power_ons += 1

    def power_off(self) -> None:
        self.power_offs += 1

    def execute(self, apdu: bytes) -> bytes:
        self.apdus.append(apdu)
        return self.answer(apdu)


def command_data(apdu: bytes) -> bytes:
    """The data field of a case 3/4 command APDU (short or extended)."""
    if len(apdu) > 7 and apdu[4] == 0:
        return apdu[7 : 7 + int.from_bytes(apdu[5:7], "big")]
    if len(apdu) > 5:
        return apdu[5 : 5 + apdu[4]]
    return b""


def echo_reversed(apdu: bytes) -> bytes:
    return command_data(apdu)[::-1] + b"\x90\x00"


class Host:
    """Finds a token by VID/PID through a backend and talks CCID to it."""

    def __init__(self, backend: SimulatorBackend, token: SimulatedToken) -> None:
        p = token.profile
        dev = usb.core.find(backend=backend, idVendor=p.vid, idProduct=p.pid)
        assert dev is not None, f"{p.name} not enumerated"
        self.dev = dev
        dev.set_configuration()
        cfg = dev.get_active_configuration()
        intf = usb.util.find_descriptor(cfg, bInterfaceClass=CCID_CLASS)
        assert intf is not None
        usb.util.claim_interface(dev, intf)
        self.intf = intf
        self.descriptor = CcidClassDescriptor.parse(bytes(intf.extra_descriptors))
        self.bulk_out = _endpoint(intf, usb.util.ENDPOINT_OUT, usb.util.ENDPOINT_TYPE_BULK)
        self.bulk_in = _endpoint(intf, usb.util.ENDPOINT_IN, usb.util.ENDPOINT_TYPE_BULK)
        self.intr_in = _endpoint(intf, usb.util.ENDPOINT_IN, usb.util.ENDPOINT_TYPE_INTR)
        self._seq = 0

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def send(self, msg: CcidMessage | bytes) -> None:
        raw = msg if isinstance(msg, bytes) else msg.encode()
        assert self.bulk_out is not None
        assert self.bulk_out.write(raw) == len(raw)

    def read_raw(self, timeout_ms: int = 1000) -> bytes:
        assert self.bulk_in is not None
        return bytes(self.dev.read(self.bulk_in.bEndpointAddress, READ_SIZE, timeout_ms))

    def read(self, timeout_ms: int = 1000) -> CcidMessage:
        return decode_message(self.read_raw(timeout_ms))

    def transact_te(self, msg: CcidMessage) -> tuple[CcidMessage, list[CcidMessage]]:
        """Send, then read until a final frame; returns it and the time extensions seen."""
        self.send(msg)
        extensions: list[CcidMessage] = []
        while True:
            resp = self.read()
            if resp.command_status is not CommandStatus.TIME_EXTENSION:
                assert resp.seq == msg.seq, f"bSeq {resp.seq} does not echo {msg.seq}"
                return resp, extensions
            extensions.append(resp)

    def transact(self, msg: CcidMessage) -> CcidMessage:
        return self.transact_te(msg)[0]

    def power_on(self) -> bytes:
        resp = self.transact(icc_power_on(self.next_seq()))
        assert resp.command_status is CommandStatus.OK, resp
        return resp.data

    def transmit_apdu(self, apdu: bytes) -> bytes:
        """APDU-level exchange with the chaining of reference §1.10.4."""
        size = self.descriptor.max_ccid_message_length - 10
        chunks = [apdu[i : i + size] for i in range(0, len(apdu), size)] or [b""]
        for i, chunk in enumerate(chunks):
            level = 0 if len(chunks) == 1 else 1 if i == 0 else 2 if i == len(chunks) - 1 else 3
            resp = self.transact(xfr_block(self.next_seq(), chunk, level_parameter=level))
            assert resp.command_status is CommandStatus.OK, resp
            if i < len(chunks) - 1:
                assert resp.data == b""
                assert resp.chain_parameter == 0x10
        out = resp.data
        while resp.chain_parameter in (0x01, 0x03):
            resp = self.transact(xfr_block(self.next_seq(), b"", level_parameter=0x10))
            assert resp.command_status is CommandStatus.OK, resp
            out += resp.data
        return out
