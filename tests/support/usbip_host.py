"""An independent USB/IP importer ("client", the host side) for the tests.

Written from the Linux kernel documentation "USB/IP protocol" alone, without importing the
client's bridge_client.usbip code, so a test that drives the client's exporter through it checks
the exporter against the document rather than against itself. Big-endian headers of 48 bytes;
the 8-byte setup packet is little-endian as USB sends it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import trio

VERSION = 0x0111
REQ_DEVLIST, REP_DEVLIST, REQ_IMPORT, REP_IMPORT = 0x8005, 0x0005, 0x8003, 0x0003
CMD_SUBMIT, CMD_UNLINK, RET_SUBMIT, RET_UNLINK = 1, 2, 3, 4
DEVICE_INFO = ">256s32sIIIHHHBBBBBB"  # usbip_usb_device, 312 bytes


@dataclass
class Device:
    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    vid: int
    pid: int
    bcd_device: int
    num_interfaces: int
    interfaces: list[tuple[int, int, int]]


@dataclass
class Ret:
    command: int
    seqnum: int
    status: int
    actual: int
    data: bytes


def _device(raw: bytes) -> Device:
    f = struct.unpack(DEVICE_INFO, raw)
    return Device(
        path=f[0].rstrip(b"\0").decode(),
        busid=f[1].rstrip(b"\0").decode(),
        busnum=f[2],
        devnum=f[3],
        speed=f[4],
        vid=f[5],
        pid=f[6],
        bcd_device=f[7],
        num_interfaces=f[13],
        interfaces=[],
    )


class UsbipHost:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.seq = 0
        self.devid = 0
        self.in_flight: dict[int, int] = {}  # seqnum -> direction (1 = IN)

    async def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def devlist(self) -> list[Device]:
        await self.stream.send_all(struct.pack(">HHI", VERSION, REQ_DEVLIST, 0))
        version, code, status, count = struct.unpack(">HHII", await self._read(12))
        assert (version, code, status) == (VERSION, REP_DEVLIST, 0)
        devices = []
        for _ in range(count):
            dev = _device(await self._read(312))
            for _ in range(dev.num_interfaces):
                cls, sub, proto, _pad = struct.unpack(">BBBB", await self._read(4))
                dev.interfaces.append((cls, sub, proto))
            devices.append(dev)
        return devices

    async def attach(self, busid: str) -> Device | None:
        await self.stream.send_all(struct.pack(">HHI32s", VERSION, REQ_IMPORT, 0, busid.encode()))
        version, code, status = struct.unpack(">HHI", await self._read(8))
        assert (version, code) == (VERSION, REP_IMPORT)
        if status != 0:
            return None
        dev = _device(await self._read(312))
        self.devid = dev.busnum << 16 | dev.devnum
        return dev

    async def submit(
        self, ep: int, direction: int, length: int, *, setup: bytes = bytes(8), data: bytes = b""
    ) -> int:
        self.seq += 1
        header = struct.pack(">IIIII", CMD_SUBMIT, self.seq, self.devid, direction, ep)
        header += struct.pack(">IIiiI", 0, length, 0, -1, 0) + setup  # -1: not isochronous
        await self.stream.send_all(header + (data if direction == 0 else b""))
        self.in_flight[self.seq] = direction
        return self.seq

    async def unlink(self, seqnum: int) -> int:
        self.seq += 1
        header = struct.pack(">IIIII", CMD_UNLINK, self.seq, self.devid, 0, 0)
        await self.stream.send_all(header + struct.pack(">I", seqnum) + bytes(24))
        return self.seq

    async def ret(self) -> Ret:
        head = await self._read(48)
        command, seqnum, _devid, _direction, _ep, status = struct.unpack(">IIIIIi", head[:24])
        if command == RET_UNLINK:
            return Ret(command, seqnum, status, 0, b"")
        assert command == RET_SUBMIT, f"unknown reply command {command}"
        (actual,) = struct.unpack(">i", head[24:28])
        direction = self.in_flight.pop(seqnum)
        data = await self._read(actual) if direction == 1 and actual > 0 else b""
        return Ret(command, seqnum, status, actual, data)

    # -- convenience: one transfer at a time -------------------------------------------------------
    async def control(
        self, request_type: int, request: int, value: int, index: int, length: int, data: bytes = b""
    ) -> Ret:
        setup = struct.pack("<BBHHH", request_type, request, value, index, length)
        direction = 1 if request_type & 0x80 else 0
        seq = await self.submit(0, direction, length, setup=setup, data=data)
        reply = await self.ret()
        assert reply.seqnum == seq
        return reply

    async def bulk_out(self, ep: int, data: bytes) -> Ret:
        seq = await self.submit(ep, 0, len(data), data=data)
        reply = await self.ret()
        assert reply.seqnum == seq
        return reply

    async def read_message(self, ep: int, packet: int = 64) -> bytes:
        """One bulk-IN message as a host controller sees it: 64-byte URBs until a short one."""
        out = b""
        while True:
            seq = await self.submit(ep, 1, packet)
            reply = await self.ret()
            assert reply.seqnum == seq and reply.status == 0, reply
            out += reply.data
            if len(reply.data) < packet:
                return out
