"""The umockdev side of the USB rig: one simulated token as an emulated usbdevfs device.

Run with Debian's /usr/bin/python3 (it has `gi` and UMockdev's typelib); `rig.py` starts it.
It builds a `UMockdev.Testbed`, adds the token under /sys/bus/usb with the simulator's own
descriptors (the sysfs `descriptors` attribute libusb reads, busnum/devnum, a
/dev/bus/usb/BBB/DDD node) and answers the usbdevfs ioctls of any process started with
`umockdev-wrapper` and UMOCKDEV_DIR set to the testbed, as the kernel would:

- GET_CAPABILITIES (NO_PACKET_SIZE_LIM, so libusb sends one URB per transfer), GET_SPEED,
  GETDRIVER → ENODATA (no kernel driver bound), CLAIM/RELEASE_INTERFACE, SETCONFIGURATION,
  SETINTERFACE, CLEAR_HALT, RESET (the card loses power);
- SUBMITURB: control URBs (GET_DESCRIPTOR, GET_STATUS, CCID class requests, which stall
  except ABORT) complete at once; a bulk-OUT URB is one CCID command for `CcidDevice`; bulk-
  and interrupt-IN URBs wait for packets from `PacketPipe` (wMaxPacketSize packets, ZLPs,
  timed packets, time extensions);
- REAPURBNDELAY/REAPURB hand back the first finished URB (`IoctlData.set_ptr`), else EAGAIN
  after at most 1 ms (libusb polls the always-ready node in a loop; the pause keeps that loop
  from eating a core);
- DISCARDURB cancels an URB: it is reaped with -ENOENT and the partial data it holds.

On start it prints one JSON line (umockdev_dir, devnode, syspath) and serves until stdin
closes or SIGTERM. A line "unplug" on stdin unplugs the device: every ioctl then fails with
ENODEV (as usbdevfs after a disconnect) and the device leaves sysfs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

from bridge_server.simulator import usb_descriptors as ud  # noqa: E402
from bridge_server.simulator.ccid_device import CcidDevice  # noqa: E402
from bridge_server.simulator.faults import Evidence, Faults  # noqa: E402
from bridge_server.simulator.piv import PivCard  # noqa: E402
from bridge_server.simulator.profiles import EXTRA_PROFILES, PROFILES, Profile, yubikey_serial  # noqa: E402
from bridge_server.simulator.usb_link import PacketPipe, Urb  # noqa: E402
from protocol.ccid import (  # noqa: E402
    CcidMessage,
    CommandStatus,
    IccStatus,
    MessageType,
    NotifySlotChange,
    SlotError,
    response_type_for,
    status_byte,
)
from protocol.errors import LocalProtocolError  # noqa: E402
from usb_rig import usbdevfs as fs  # noqa: E402

EAGAIN_PAUSE_MS = 1
CCID_ABORT = 0x01


def busy_answer(command: bytes) -> bytes:
    """The failed answer (bError CMD_SLOT_BUSY) to `command`, echoing its bSeq."""
    try:
        kind = response_type_for(MessageType(command[0]))
    except (ValueError, LocalProtocolError):
        kind = MessageType.RDR_to_PC_SlotStatus
    status = status_byte(IccStatus.PRESENT_ACTIVE, CommandStatus.FAILED)
    return CcidMessage(kind, command[6], command[5], status, SlotError.CMD_SLOT_BUSY).encode()


@dataclass
class InFlight:
    """One submitted URB: its client-side memory and its state."""

    urb_d: Any  # UMockdev.IoctlData of the struct usbdevfs_urb
    buf_d: Any  # UMockdev.IoctlData of its buffer (None for an empty one)
    endpoint: int
    urb: Urb


class Token:
    """Device state behind the ioctls: descriptors, the CCID device and the IN pipes."""

    def __init__(self, profile: Profile, args: argparse.Namespace) -> None:
        self.profile = profile
        self.serial = "" if args.no_serial else (args.serial or profile.serial)
        self.faults = Faults()
        self.faults.slow_sign_s = args.slow_sign_ms / 1000
        # The card knows its serial even when the USB device does not show it (--no-serial).
        self.card = PivCard(state_path=args.state, yubikey_serial=yubikey_serial(profile, args.serial))
        self.device = CcidDevice(profile, self.card, faults=self.faults, evidence=Evidence())
        self.configuration = ud.build_configuration(profile)
        self.events = args.events
        self.slot_busy = not args.no_slot_busy
        self.abort_stalls = args.abort_stalls
        self.abort_armed: int | None = None  # bSeq of an ABORT class request awaiting its bulk Abort
        self.time_extensions = not args.no_time_extension
        interval = args.packet_interval_ms / 1000
        self.bulk_in = PacketPipe(64, packet_interval_s=interval)
        self.intr_in = PacketPipe(8)
        self.intr_in.queue(NotifySlotChange(present=(True,), changed=(True,)).encode(), time.monotonic())
        self.device_descriptor = ud.DeviceDescriptor(
            idVendor=profile.vid,
            idProduct=profile.pid,
            bcdDevice=profile.bcd_device,
            iSerialNumber=ud.STRING_SERIAL if self.serial else 0,
            bus=args.busnum,
            address=args.devnum,
            port_number=1,
            port_numbers=(1,),
        )

    def descriptors(self) -> bytes:
        return self.device_descriptor.encode() + self.configuration.encode()

    def pipe(self, endpoint: int) -> PacketPipe | None:
        return {ud.EP_BULK_IN: self.bulk_in, ud.EP_INTR_IN: self.intr_in}.get(endpoint)

    def record(self, record: dict[str, Any]) -> None:
        if self.events is not None:
            with open(self.events, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def bulk_out(self, data: bytes) -> None:
        # What a test asserts on: message type, bSeq, and the first data bytes (T=1 NAD/PCB).
        seq = data[6] if len(data) > 6 else None
        self.record({"type": data[0] if data else None, "seq": seq, "head": data[10:12].hex()})
        now = time.monotonic()
        if data[:1] == bytes([MessageType.PC_to_RDR_Abort]) and seq is not None and seq == self.abort_armed:
            # CCID 1.1 §5.3.1: the ABORT class request and PC_to_RDR_Abort with the same bSeq
            # end the command in progress; its answer is never sent; the Abort gets SlotStatus.
            self.abort_armed = None
            self.bulk_in.clear()  # then CcidDevice answers the Abort itself, below
        if self.slot_busy and len(data) >= 10 and self.bulk_in.busy(now):
            # CCID 1.1 §6.2.6: a command while the slot still works on the last one fails at once
            # with CMD_SLOT_BUSY; the earlier answer still follows when it is ready.
            self.bulk_in.queue(busy_answer(data), now, ahead=True)
            return
        reply = self.device.handle(data)
        for frame in reply.frames[:-1]:
            self.bulk_in.queue(frame, now)
        if reply.frames:
            te = reply.time_extension if self.time_extensions else b""
            self.bulk_in.queue(reply.frames[-1], now, delay_s=reply.delay_s, time_extension=te)

    def control_in(self, request_type: int, request: int, value: int, length: int) -> bytes | None:
        """The data stage of a standard IN request, or None to stall (USB 2.0 §9.4)."""
        if request_type == 0x80 and request == 0x06:
            dtype, index = value >> 8, value & 0xFF
            if dtype == ud.DT_DEVICE:
                return self.device_descriptor.encode()[:length]
            if dtype == ud.DT_CONFIG and index == 0:
                return self.configuration.encode()[:length]
            if dtype == ud.DT_STRING:
                strings = {
                    ud.STRING_MANUFACTURER: self.profile.manufacturer,
                    ud.STRING_PRODUCT: self.profile.product,
                    ud.STRING_SERIAL: self.serial,
                }
                if index == 0:
                    return ud.langid_descriptor()[:length]
                if strings.get(index):
                    return ud.string_descriptor(strings[index])[:length]
            return None
        if request_type == 0x80 and request == 0x00:
            return b"\x00\x00"[:length]
        if request_type == 0xA1 and request == 0x03 and self.profile.data_rates:
            # CCID 1.1 §5.3.3 GET_DATA_RATES: dwDataRate values, little-endian.
            return b"".join(rate.to_bytes(4, "little") for rate in self.profile.data_rates)[:length]
        return None

    def reset(self) -> None:
        self.device.power_loss()
        self.bulk_in.clear()


class UsbfsHandler(UMockdev.IoctlBase):  # type: ignore[misc]
    """Answers usbdevfs ioctls for one token (see the module docstring)."""

    def __init__(self, token: Token) -> None:
        super().__init__()
        self.token = token
        self.inflight: list[InFlight] = []
        self.unplugged = False

    def do_handle_ioctl(self, client: Any) -> bool:
        request = client.get_request()
        arg = client.get_arg()
        try:
            result = self._dispatch(client, request, arg)
        except Exception as exc:  # report and fail the ioctl, keep serving
            print(f"usb_rig: ioctl {request:#x} failed: {exc!r}", file=sys.stderr, flush=True)
            result = (-1, errno.EIO)
        if result is not None:
            client.complete(*result)
        return True

    def _dispatch(self, client: Any, request: int, arg: Any) -> tuple[int, int] | None:
        if self.unplugged:
            return (-1, errno.ENODEV)  # usbdevfs after a disconnect: libusb's LIBUSB_ERROR_NO_DEVICE
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
        if request == fs.RESET:
            self.token.reset()
            return (0, 0)
        if request in (
            fs.CLAIMINTERFACE,
            fs.RELEASEINTERFACE,
            fs.SETCONFIGURATION,
            fs.SETINTERFACE,
            fs.CLEAR_HALT,
        ):
            return (0, 0)
        return (-1, errno.ENOTTY)

    def _submit(self, arg: Any) -> tuple[int, int]:
        urb_d = arg.resolve(0, fs.URB_SIZE)
        fields = struct.unpack(fs.URB_FORMAT, bytes(urb_d.retrieve()))
        kind, endpoint, length = fields[0], fields[1], fields[5]
        buf_d = urb_d.resolve(fs.URB_BUFFER_OFFSET, length) if length else None
        data = bytes(buf_d.retrieve()) if buf_d is not None else b""
        urb = Urb(length)
        if kind == fs.URB_TYPE_CONTROL:
            self._control(data, urb)
        elif kind == fs.URB_TYPE_BULK and not endpoint & 0x80:
            self.token.bulk_out(data)
            urb.data += data  # actual_length of an OUT URB: every byte was sent
            urb.finish()
        elif kind not in (fs.URB_TYPE_BULK, fs.URB_TYPE_INTERRUPT) or self.token.pipe(endpoint) is None:
            return (-1, errno.EINVAL)
        self.inflight.append(InFlight(urb_d, buf_d, endpoint, urb))
        return (0, 0)

    def _control(self, data: bytes, urb: Urb) -> None:
        request_type, request, value, _index, length = struct.unpack("<BBHHH", data[:8])
        if request_type & 0x80:
            answer = self.token.control_in(request_type, request, value, length)
            if answer is None:
                urb.finish(-errno.EPIPE)
                return
            urb.data += data[:8] + answer
        elif request_type == 0x21 and request == CCID_ABORT and not self.token.abort_stalls:
            self.token.record({"type": "abort_request", "seq": value >> 8})
            self.token.abort_armed = value >> 8
            urb.data += data[:8]  # CCID 1.1 §5.3.1: the PC_to_RDR_Abort that follows does the work
        else:
            urb.finish(-errno.EPIPE)
            return
        urb.finish()

    def _refresh(self) -> None:
        now = time.monotonic()
        seen: set[int] = set()
        for item in self.inflight:
            if item.urb.done or item.endpoint in seen or not item.endpoint & 0x80:
                continue
            seen.add(item.endpoint)  # packets go to the oldest URB of an endpoint first
            pipe = self.token.pipe(item.endpoint)
            if pipe is not None:
                pipe.fill(item.urb, now)

    def _reap(self, client: Any, arg: Any, *, pause: bool) -> tuple[int, int] | None:
        self._refresh()
        done = next((item for item in self.inflight if item.urb.done), None)
        if done is None:
            if not pause:
                return (-1, errno.EAGAIN)
            GLib.timeout_add(EAGAIN_PAUSE_MS, self._reap_later, client, arg)
            return None
        self.inflight.remove(done)
        urb = done.urb
        if done.endpoint == 0:  # control: the buffer starts with the 8-byte setup packet
            actual, payload = max(len(urb.data) - 8, 0), bytes(urb.data) if len(urb.data) > 8 else b""
        elif done.endpoint & 0x80:
            actual, payload = len(urb.data), bytes(urb.data)
        else:
            actual, payload = len(urb.data), b""
        if payload and done.buf_d is not None:
            done.buf_d.update(0, list(payload))
        done.urb_d.update(fs.URB_STATUS_OFFSET, list(struct.pack("<i", urb.status)))
        done.urb_d.update(fs.URB_ACTUAL_OFFSET, list(struct.pack("<i", actual)))
        arg.resolve(0, 8).set_ptr(0, done.urb_d)
        return (0, 0)

    def _reap_later(self, client: Any, arg: Any) -> bool:
        result = self._reap(client, arg, pause=False)
        assert result is not None
        client.complete(*result)
        return False

    def _discard(self, arg: Any) -> tuple[int, int]:
        (address,) = struct.unpack("<Q", bytes(arg.retrieve())[:8])
        for item in self.inflight:
            if item.urb_d.client_addr == address and not item.urb.done:
                self._refresh()  # packets that arrived before the cancel are in the URB
                PacketPipe.cancel(item.urb)
                return (0, 0)
        return (-1, errno.EINVAL)


def build_testbed(token: Token, args: argparse.Namespace) -> tuple[Any, str, str]:
    testbed = UMockdev.Testbed.new()
    p = token.profile
    devnode = f"/dev/bus/usb/{args.busnum:03d}/{args.devnum:03d}"
    attributes = {
        "busnum": str(args.busnum),
        "devnum": str(args.devnum),
        "speed": "12",
        "bConfigurationValue": "1",
        "bNumConfigurations": "1",
        "bNumInterfaces": str(len(token.configuration.interfaces)),
        "idVendor": f"{p.vid:04x}",
        "idProduct": f"{p.pid:04x}",
        "bcdDevice": f"{p.bcd_device:04x}",
        "manufacturer": p.manufacturer,
        "product": p.product,
        "devpath": "1",
    }
    if token.serial:
        attributes["serial"] = token.serial
    properties = {
        "BUSNUM": f"{args.busnum:03d}",
        "DEVNUM": f"{args.devnum:03d}",
        "DEVNAME": devnode.removeprefix("/dev/"),
        "DEVTYPE": "usb_device",
        "PRODUCT": f"{p.vid:x}/{p.pid:x}/{p.bcd_device:x}",
        "TYPE": "0/0/0",
    }
    syspath = testbed.add_device(
        "usb",
        f"{args.busnum}-1",
        None,
        [x for k, v in attributes.items() for x in (k, v + "\n")],
        [x for kv in properties.items() for x in kv],
    )
    if not syspath:
        raise SystemExit("usb_rig: umockdev refused the device")
    testbed.set_attribute_binary(syspath, "descriptors", list(token.descriptors()))
    for intf in token.configuration.interfaces:
        # pcscd's libudev hotplug finds readers by their usb_interface children.
        cls = (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol)
        testbed.add_device(
            "usb",
            # Nested under the device's folder: libudev finds the parent by the path (a parent
            # argument is checked against the real /sys, which this process does not see).
            f"{args.busnum}-1/{args.busnum}-1:1.{intf.bInterfaceNumber}",
            None,
            [
                *("bInterfaceNumber", f"{intf.bInterfaceNumber:02x}\n"),
                *("bAlternateSetting", " 0\n"),
                *("bInterfaceClass", f"{cls[0]:02x}\n"),
                *("bInterfaceSubClass", f"{cls[1]:02x}\n"),
                *("bInterfaceProtocol", f"{cls[2]:02x}\n"),
                *("bNumEndpoints", f"{intf.bNumEndpoints:02x}\n"),
            ],
            [
                *("DEVTYPE", "usb_interface"),
                *("INTERFACE", "/".join(str(c) for c in cls)),
                *("PRODUCT", properties["PRODUCT"]),
                *("TYPE", "0/0/0"),
            ],
        )
    # add_device does not create the node (only add_from_string does): a plain file, as
    # umockdev makes for usb devices; attach_ioctl routes its ioctls to the handler.
    node = Path(testbed.get_root_dir()) / devnode.lstrip("/")
    node.parent.mkdir(parents=True, exist_ok=True)
    node.touch()
    return testbed, syspath, devnode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted({**PROFILES, **EXTRA_PROFILES}), default="safenet-5110")
    parser.add_argument("--serial", help="iSerialNumber string (default: the profile's)")
    parser.add_argument("--no-serial", action="store_true", help="a device without iSerialNumber")
    parser.add_argument("--state", type=Path, help="the PIV card's JSON state file")
    parser.add_argument("--events", type=Path, help="append one JSON line per bulk-OUT command here")
    parser.add_argument("--no-slot-busy", action="store_true", help="queue commands instead of 'slot busy'")
    parser.add_argument("--no-time-extension", action="store_true", help="stay silent while working")
    parser.add_argument(
        "--abort-stalls", action="store_true", help="stall the CCID ABORT class request, as most tokens do"
    )
    parser.add_argument("--busnum", type=int, default=1)
    parser.add_argument("--devnum", type=int, default=2)
    parser.add_argument("--packet-interval-ms", type=float, default=1.0, help="gap between IN packets")
    parser.add_argument("--slow-sign-ms", type=float, default=0.0, help="GENERAL AUTHENTICATE delay")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = Token({**PROFILES, **EXTRA_PROFILES}[args.profile], args)
    testbed, syspath, devnode = build_testbed(token, args)
    handler = UsbfsHandler(token)
    if not testbed.attach_ioctl(devnode, handler):
        raise SystemExit(f"usb_rig: could not attach the ioctl handler to {devnode}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)

    def on_stdin(*_: Any) -> bool:
        # One command per line; EOF (the test is done) quits. "unplug": the device goes away
        # as the kernel shows it: every usbdevfs ioctl fails with ENODEV, sysfs loses it.
        line = sys.stdin.readline()
        if not line:
            loop.quit()
            return False
        if line.strip() == "unplug":
            handler.unplugged = True
            testbed.remove_device(syspath)
            print(json.dumps({"unplugged": True}), flush=True)
        return True

    GLib.io_add_watch(sys.stdin.fileno(), GLib.IO_HUP | GLib.IO_IN | GLib.IO_ERR, on_stdin)
    print(json.dumps({"umockdev_dir": testbed.get_root_dir(), "devnode": devnode, "syspath": syspath}))
    sys.stdout.flush()
    loop.run()
    os.environ.pop("UMOCKDEV_DIR", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
