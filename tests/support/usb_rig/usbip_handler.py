"""The USB rig's USB/IP variant: an emulated usbdevfs device whose URBs go to a USB/IP exporter.

Run with Debian's /usr/bin/python3 (it has `gi` and UMockdev's typelib). This process is the USB/IP
*importer* (what the kernel's vhci-hcd or usbip-win2 would be): it imports one bus id from the
exporter at --host/--port (tokenbridge-client with `reader: usbip`), enumerates the device as a
host does (GET_DESCRIPTOR for device, configuration and strings, SET_CONFIGURATION 1), puts it
under a `UMockdev.Testbed` as /sys/bus/usb/devices/B-1 with a /dev/bus/usb/BBB/DDD node, and then
answers the usbdevfs ioctls of processes started under `umockdev-wrapper` (pcscd with libccid) by
forwarding them:

- SUBMITURB → USBIP_CMD_SUBMIT (control URBs: the 8-byte setup packet leads the buffer, as in
  usbfs); the RET_SUBMIT's status, actual length and IN data complete the URB;
- REAPURB/REAPURBNDELAY hand back the first finished URB, else EAGAIN (after at most 1 ms, as
  handler.py does for libusb's poll loop);
- DISCARDURB → USBIP_CMD_UNLINK; the URB is reaped with -ENOENT once RET_UNLINK says it was
  cancelled (if RET_SUBMIT came first, that result stands, as with the kernel);
- CLEAR_HALT, SETINTERFACE, SETCONFIGURATION and RESET → the matching standard request (RESET:
  the hub's SET_FEATURE(PORT_RESET), which USB/IP exporters take as a device reset), waited for;
- GET_CAPABILITIES, GET_SPEED, GETDRIVER, CLAIM/RELEASE_INTERFACE: answered here.

The USB/IP code here is written from the kernel documentation "USB/IP protocol", not taken from
the exporter under test. It prints one JSON line (umockdev_dir, devnode, vid, pid) when ready and
serves until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

from usb_rig import usbdevfs as fs  # noqa: E402

VERSION = 0x0111
EAGAIN_PAUSE_MS = 1
SYNC_TIMEOUT_S = 10.0


@dataclass
class Ret:
    status: int
    data: bytes  # IN data
    actual: int = 0  # RET_SUBMIT actual_length (the data stage only, for control transfers)


@dataclass
class Pending:
    urb_d: Any
    buf_d: Any
    endpoint: int
    control: bool
    ret: Ret | None = None
    discarded: bool = False


@dataclass
class Link:
    """One imported device: the socket, a reader thread, and the replies by seqnum."""

    sock: socket.socket
    devid: int = 0
    seq: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    directions: dict[int, int] = field(default_factory=dict)
    replies: dict[int, Ret] = field(default_factory=dict)
    unlinked: dict[int, int] = field(default_factory=dict)  # CMD_UNLINK seqnum -> the URB's seqnum
    cancelled: set[int] = field(default_factory=set)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError("the USB/IP exporter closed the connection")
            out += chunk
        return out

    def submit(self, ep: int, direction: int, length: int, setup: bytes, data: bytes) -> int:
        with self.lock:
            self.seq += 1
            seq = self.seq
            self.directions[seq] = direction
            head = struct.pack(">IIIII", 1, seq, self.devid, direction, ep)
            head += struct.pack(">IIiiI", 0, length, 0, -1, 0) + setup
            self.sock.sendall(head + (data if direction == 0 else b""))
        return seq

    def unlink(self, target: int) -> None:
        with self.lock:
            self.seq += 1
            self.unlinked[self.seq] = target
            self.sock.sendall(struct.pack(">IIIIII", 2, self.seq, self.devid, 0, 0, target) + bytes(24))

    def reader(self) -> None:
        try:
            while True:
                head = self.read(48)
                command, seq, _d, _dir, _ep, status = struct.unpack(">IIIIIi", head[:24])
                with self.arrived:
                    if command == 4:  # RET_UNLINK: -ECONNRESET = it was still pending, now cancelled
                        target = self.unlinked.pop(seq, None)
                        if target is not None and status != 0:
                            self.cancelled.add(target)
                    elif command == 3:
                        (actual,) = struct.unpack(">i", head[24:28])
                        inbound = self.directions.pop(seq, 0) == 1
                        data = self.read(actual) if inbound and actual > 0 else b""
                        self.replies[seq] = Ret(status, data, actual)
                    else:
                        raise ValueError(f"unknown USB/IP reply {command:#x}")
                    self.arrived.notify_all()
        except (EOFError, OSError, ValueError) as exc:
            print(f"usbip_handler: link ended: {exc}", file=sys.stderr, flush=True)
            with self.arrived:
                self.closed = True
                self.arrived.notify_all()

    def wait(self, seq: int) -> Ret:
        with self.arrived:
            self.arrived.wait_for(lambda: seq in self.replies or self.closed, timeout=SYNC_TIMEOUT_S)
            ret = self.replies.pop(seq, None)
        if ret is None:
            raise TimeoutError(f"no RET_SUBMIT for seqnum {seq}")
        return ret

    def control(self, request_type: int, request: int, value: int, index: int, length: int) -> Ret:
        setup = struct.pack("<BBHHH", request_type, request, value, index, length)
        return self.wait(self.submit(0, 1 if request_type & 0x80 else 0, length, setup, b""))


def import_device(host: str, port: int, busid: str) -> tuple[Link, dict[str, int]]:
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack(">HHI32s", VERSION, 0x8003, 0, busid.encode()))
    link = Link(sock)
    version, code, status = struct.unpack(">HHI", link.read(8))
    if (version, code, status) != (VERSION, 0x0003, 0):
        raise SystemExit(f"usbip_handler: import of {busid} refused ({version:#x} {code:#x} status {status})")
    f = struct.unpack(">256s32sIIIHHHBBBBBB", link.read(312))
    link.devid = f[2] << 16 | f[3]
    return link, {"busnum": f[2], "devnum": f[3], "vid": f[5], "pid": f[6], "bcd": f[7]}


def string(link: Link, index: int) -> str:
    if not index:
        return ""
    ret = link.control(0x80, 6, 0x0300 | index, 0x0409, 255)
    return ret.data[2:].decode("utf-16-le") if ret.status == 0 else ""


class Forwarder(UMockdev.IoctlBase):  # type: ignore[misc]
    def __init__(self, link: Link) -> None:
        super().__init__()
        self.link = link
        self.pending: dict[int, Pending] = {}  # seqnum -> URB

    def do_handle_ioctl(self, client: Any) -> bool:
        request, arg = client.get_request(), client.get_arg()
        try:
            result = self._dispatch(client, request, arg)
        except Exception as exc:  # report and fail the ioctl, keep serving
            print(f"usbip_handler: ioctl {request:#x} failed: {exc!r}", file=sys.stderr, flush=True)
            result = (-1, errno.EIO)
        if result is not None:
            client.complete(*result)
        return True

    def _sync(self, request_type: int, request: int, value: int, index: int) -> tuple[int, int]:
        ret = self.link.control(request_type, request, value, index, 0)
        return (0, 0) if ret.status == 0 else (-1, -ret.status)

    def _dispatch(self, client: Any, request: int, arg: Any) -> tuple[int, int] | None:
        if request == fs.SUBMITURB:
            return self._submit(arg)
        if request in (fs.REAPURBNDELAY, fs.REAPURB):
            return self._reap(client, arg, pause=True)
        if request == fs.DISCARDURB:
            return self._discard(arg)
        if request == fs.GET_CAPABILITIES:
            arg.resolve(0, 4).update(0, list(struct.pack("<I", fs.CAPABILITIES)))
            return (0, 0)
        if request == fs.GET_SPEED:
            return (fs.SPEED_FULL, 0)
        if request in (fs.GETDRIVER, fs.IOCTL):
            return (-1, errno.ENODATA)
        if request in (fs.CLAIMINTERFACE, fs.RELEASEINTERFACE):
            return (0, 0)
        if request == fs.CLEAR_HALT:
            (endpoint,) = struct.unpack("<I", bytes(arg.resolve(0, 4).retrieve()))
            return self._sync(0x02, 1, 0, endpoint)
        if request == fs.SETINTERFACE:
            interface, alt = struct.unpack("<II", bytes(arg.resolve(0, 8).retrieve()))
            return self._sync(0x01, 11, alt, interface)
        if request == fs.SETCONFIGURATION:
            (value,) = struct.unpack("<i", bytes(arg.resolve(0, 4).retrieve()))
            return self._sync(0x00, 9, max(value, 0), 0)
        if request == fs.RESET:
            return self._sync(0x23, 3, 4, 1)  # hub port SET_FEATURE(PORT_RESET)
        return (-1, errno.ENOTTY)

    def _submit(self, arg: Any) -> tuple[int, int]:
        urb_d = arg.resolve(0, fs.URB_SIZE)
        fields = struct.unpack(fs.URB_FORMAT, bytes(urb_d.retrieve()))
        kind, endpoint, length = fields[0], fields[1], fields[5]
        buf_d = urb_d.resolve(fs.URB_BUFFER_OFFSET, length) if length else None
        data = bytes(buf_d.retrieve()) if buf_d is not None else b""
        if kind == fs.URB_TYPE_CONTROL:
            setup, payload = data[:8], data[8:]
            inbound = setup[0] & 0x80
            seq = self.link.submit(0, 1 if inbound else 0, length - 8, setup, b"" if inbound else payload)
        elif kind in (fs.URB_TYPE_BULK, fs.URB_TYPE_INTERRUPT):
            inbound = endpoint & 0x80
            seq = self.link.submit(
                endpoint & 0x0F, 1 if inbound else 0, length, bytes(8), b"" if inbound else data
            )
        else:
            return (-1, errno.EINVAL)
        self.pending[seq] = Pending(urb_d, buf_d, endpoint, kind == fs.URB_TYPE_CONTROL)
        return (0, 0)

    def _finished(self) -> tuple[int, Pending] | None:
        with self.link.arrived:
            for seq, item in self.pending.items():
                if seq in self.link.replies:
                    item.ret = self.link.replies.pop(seq)
                    return seq, item
                if seq in self.link.cancelled:
                    self.link.cancelled.discard(seq)
                    item.ret = Ret(-errno.ENOENT, b"")
                    return seq, item
                if self.link.closed:
                    item.ret = Ret(-errno.ENODEV, b"")
                    return seq, item
        return None

    def _reap(self, client: Any, arg: Any, *, pause: bool) -> tuple[int, int] | None:
        found = self._finished()
        if found is None:
            if self.link.closed:
                return (-1, errno.ENODEV)
            if not pause:
                return (-1, errno.EAGAIN)
            GLib.timeout_add(EAGAIN_PAUSE_MS, self._reap_later, client, arg)
            return None
        seq, item = found
        del self.pending[seq]
        assert item.ret is not None
        payload, offset = item.ret.data, 8 if item.control else 0
        if payload and item.buf_d is not None:
            item.buf_d.update(offset, list(payload))
        item.urb_d.update(fs.URB_STATUS_OFFSET, list(struct.pack("<i", item.ret.status)))
        item.urb_d.update(fs.URB_ACTUAL_OFFSET, list(struct.pack("<i", item.ret.actual)))
        arg.resolve(0, 8).set_ptr(0, item.urb_d)
        return (0, 0)

    def _reap_later(self, client: Any, arg: Any) -> bool:
        result = self._reap(client, arg, pause=False)
        assert result is not None
        client.complete(*result)
        return False

    def _discard(self, arg: Any) -> tuple[int, int]:
        (address,) = struct.unpack("<Q", bytes(arg.retrieve())[:8])
        for seq, item in self.pending.items():
            if item.urb_d.client_addr == address and not item.discarded:
                item.discarded = True
                self.link.unlink(seq)
                return (0, 0)
        return (-1, errno.EINVAL)


def build_testbed(link: Link, info: dict[str, int], busnum: int, devnum: int) -> tuple[Any, str]:
    device = link.control(0x80, 6, 0x0100, 0, 18).data
    head = link.control(0x80, 6, 0x0200, 0, 9).data
    (total,) = struct.unpack_from("<H", head, 2)
    config = link.control(0x80, 6, 0x0200, 0, total).data
    if link.control(0x00, 9, config[5], 0, 0).status != 0:  # enumeration: SET_CONFIGURATION
        raise SystemExit("usbip_handler: SET_CONFIGURATION failed")
    manufacturer, product, serial = (string(link, i) for i in device[14:17])
    testbed = UMockdev.Testbed.new()
    devnode = f"/dev/bus/usb/{busnum:03d}/{devnum:03d}"
    product_prop = f"{info['vid']:x}/{info['pid']:x}/{info['bcd']:x}"
    attributes = {
        "busnum": str(busnum),
        "devnum": str(devnum),
        "speed": "12",
        "bConfigurationValue": str(config[5]),
        "bNumConfigurations": str(device[17]),
        "bNumInterfaces": str(config[4]),
        "idVendor": f"{info['vid']:04x}",
        "idProduct": f"{info['pid']:04x}",
        "bcdDevice": f"{info['bcd']:04x}",
        "manufacturer": manufacturer,
        "product": product,
        "devpath": "1",
    }
    if serial:
        attributes["serial"] = serial
    properties = {
        "BUSNUM": f"{busnum:03d}",
        "DEVNUM": f"{devnum:03d}",
        "DEVNAME": devnode.removeprefix("/dev/"),
        "DEVTYPE": "usb_device",
        "PRODUCT": product_prop,
        "TYPE": "0/0/0",
    }
    syspath = testbed.add_device(
        "usb",
        f"{busnum}-1",
        None,
        [x for k, v in attributes.items() for x in (k, v + "\n")],
        [x for kv in properties.items() for x in kv],
    )
    if not syspath:
        raise SystemExit("usbip_handler: umockdev refused the device")
    testbed.set_attribute_binary(syspath, "descriptors", list(device + config))
    i = 0
    while i < len(config):  # one usb_interface child per interface descriptor (pcscd's hotplug)
        length, kind = config[i], config[i + 1]
        if kind == 0x04 and config[i + 3] == 0:
            number, cls = config[i + 2], tuple(config[i + 5 : i + 8])
            testbed.add_device(
                "usb",
                f"{busnum}-1/{busnum}-1:1.{number}",
                None,
                [
                    *("bInterfaceNumber", f"{number:02x}\n"),
                    *("bAlternateSetting", " 0\n"),
                    *("bInterfaceClass", f"{cls[0]:02x}\n"),
                    *("bInterfaceSubClass", f"{cls[1]:02x}\n"),
                    *("bInterfaceProtocol", f"{cls[2]:02x}\n"),
                    *("bNumEndpoints", f"{config[i + 4]:02x}\n"),
                ],
                [
                    *("DEVTYPE", "usb_interface"),
                    *("INTERFACE", "/".join(str(c) for c in cls)),
                    *("PRODUCT", product_prop),
                    *("TYPE", "0/0/0"),
                ],
            )
        i += max(length, 1)
    node = Path(testbed.get_root_dir()) / devnode.lstrip("/")
    node.parent.mkdir(parents=True, exist_ok=True)
    node.touch()
    return testbed, devnode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--busid", default="1-1")
    parser.add_argument("--busnum", type=int, default=1)
    parser.add_argument("--devnum", type=int, default=2)
    args = parser.parse_args(argv)
    link, info = import_device(args.host, args.port, args.busid)
    threading.Thread(target=link.reader, daemon=True).start()
    testbed, devnode = build_testbed(link, info, args.busnum, args.devnum)
    handler = Forwarder(link)
    if not testbed.attach_ioctl(devnode, handler):
        raise SystemExit(f"usbip_handler: could not attach the ioctl handler to {devnode}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.io_add_watch(sys.stdin.fileno(), GLib.IO_HUP | GLib.IO_IN | GLib.IO_ERR, lambda *_: loop.quit())
    ready = {
        "umockdev_dir": testbed.get_root_dir(),
        "devnode": devnode,
        "vid": info["vid"],
        "pid": info["pid"],
    }
    print(json.dumps(ready), flush=True)
    loop.run()
    link.sock.close()  # detach: the exporter sees the importer go
    return 0


if __name__ == "__main__":
    sys.exit(main())
