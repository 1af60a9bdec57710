"""Which USB device a configured token means (pure: no usb import, for tests and `doctor`).

Split out of `bridge_server.usb.transport`, which re-exports these names; the CCID interface is
found here too (it reads descriptors pyusb already parsed, no transfer). A token is matched by
VID/PID, its USB serial (iSerialNumber) and/or its USB port path; a device without a serial is
picked for a configured serial only when it is the one serial-less candidate, and its card's own
identity is then checked (`bridge_server.usb.identity`, issue 15 item 3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bridge_server.errors import DeviceError, DeviceNotFoundError

CCID_INTERFACE_CLASS = 0x0B
VENDOR_INTERFACE_CLASS = 0xFF
CCID_DESCRIPTOR_LENGTH = 54  # CCID 1.1 §5.1: bLength 0x36
CCID_DESCRIPTOR_TYPES = (0x21, 0xFF)  # 0xFF on old vendor-class devices (reference §1.7)


@dataclass(frozen=True)
class DeviceMatch:
    """Which device a token entry means; None fields match anything."""

    vid: int | None = None
    pid: int | None = None
    serial: str | None = None
    port: str | None = None  # USB port path "1-1.2", for devices without a serial number

    def matches(self, info: DeviceInfo) -> bool:
        if self.vid is not None and info.vid != self.vid:
            return False
        if self.pid is not None and info.pid != self.pid:
            return False
        if self.port is not None and info.port_path != self.port:
            return False
        # Serials are printed in upper or lower case by different tools; compare case-blind.
        return self.serial is None or info.serial.strip().casefold() == self.serial.strip().casefold()

    def describe(self) -> str:
        parts = []
        if self.vid is not None:
            parts.append(f"vid=0x{self.vid:04x}")
        if self.pid is not None:
            parts.append(f"pid=0x{self.pid:04x}")
        if self.serial is not None:
            parts.append(f"serial={self.serial!r}")
        if self.port is not None:
            parts.append(f"port={self.port!r}")
        return " ".join(parts) or "any ccid device"


@dataclass(frozen=True)
class DeviceInfo:
    vid: int
    pid: int
    serial: str
    bcd_device: int
    bus: int | None
    address: int | None
    product: str
    port_path: str = ""  # "1-1.2": bus, then the port numbers from the root hub (sysfs naming)

    def describe(self) -> str:
        where = f" bus {self.bus} address {self.address}" if self.bus is not None else ""
        port = f" port {self.port_path}" if self.port_path else ""
        serial = f"serial {self.serial!r}" if self.serial else "no usb serial"
        return f"{self.vid:04x}:{self.pid:04x} {serial} {self.product!r}{where}{port}"


def select_device(match: DeviceMatch, seen: Sequence[DeviceInfo]) -> DeviceInfo:
    """Pick the one device `match` means among `seen` CCID devices; pure, for tests.

    A device without a USB serial cannot be told apart by `match.serial`: when no device has
    that serial and exactly one serial-less device matches the rest, it is returned, and the
    caller checks the identity read from its card (bridge_server.usb.identity)."""
    hits = [info for info in seen if match.matches(info)]
    if not hits and match.serial is not None:
        rest = DeviceMatch(match.vid, match.pid, port=match.port)
        hits = [info for info in seen if not info.serial and rest.matches(info)]
    if len(hits) == 1:
        return hits[0]
    listing = "; ".join(info.describe() for info in seen) or "none"
    if not hits:
        raise DeviceNotFoundError(
            f"no usb ccid device matches {match.describe()} (seen: {listing}); "
            "check the token is plugged in and the token's match in the server config"
        )
    raise DeviceNotFoundError(
        f"{len(hits)} usb ccid devices match {match.describe()} (seen: {listing}); {_tell_apart(hits)}"
    )


def _tell_apart(hits: Sequence[DeviceInfo]) -> str:
    """What the operator can add to the token's match to pick one of `hits`."""
    serials = [info.serial for info in hits if info.serial]
    if len(set(serials)) == len(hits):
        listed = ", ".join(repr(s) for s in serials)
        return f"add the serial to the token's match in the server config (serial: one of {listed})"
    ports = [info.port_path for info in hits if info.port_path]
    unnamed = len(hits) - len(serials)
    advice = (
        f"{unnamed} of them report no usb serial number (iSerialNumber), so a serial cannot tell them apart; "
    )
    if len(set(ports)) == len(hits):
        return advice + (
            "add port: (one of " + ", ".join(repr(p) for p in ports) + ") to the token's match: "
            "the usb port path holds as long as each token stays in its port"
        )
    return advice + "plug only one of them in, or make the token report its serial over usb"


ICCD_VERSIONS = {1: "A", 2: "B"}  # CCID 1.1 §4.1 / USB ICCD 1.0 §4.1: bInterfaceProtocol


def refuse_iccd(interface_protocol: int, info: DeviceInfo) -> None:
    """Refuse an ICCD interface by name: it exchanges over the control pipe, not bulk.

    libccid drives ICCD version A and B devices (ControlUSB instead of bulk transfers); we do
    not yet, and without this check such a device failed later as "lacks bulk endpoints"."""
    version = ICCD_VERSIONS.get(interface_protocol)
    if version is None:
        return
    raise DeviceError(
        f"{info.describe()}: is an ICCD version {version} device (bInterfaceProtocol "
        f"{interface_protocol}), which exchanges over the USB control pipe; tokenbridge speaks CCID "
        "over bulk pipes only. pcscd with libccid supports it on this host"
    )


def _descriptor_chain(extra: Iterable[int]) -> list[bytes]:
    raw = bytes(extra)
    out, pos = [], 0
    while pos + 2 <= len(raw) and raw[pos] >= 2:
        out.append(raw[pos : pos + raw[pos]])
        pos += raw[pos]
    return out


def _class_descriptor_bytes(intf: Any) -> bytes | None:
    """The 54-byte CCID descriptor of `intf` per libccid (reference §1.7), or None if not CCID."""
    extra = bytes(intf.extra_descriptors or b"")
    if not extra:
        endpoints = list(intf)
        # O2Micro/Reiner quirk: descriptor hangs off the last endpoint when the interface has none.
        extra = bytes(endpoints[-1].extra_descriptors or b"") if endpoints else b""
    for desc in _descriptor_chain(extra):
        if len(desc) == CCID_DESCRIPTOR_LENGTH and desc[1] in CCID_DESCRIPTOR_TYPES:
            return desc
    return None


def find_ccid_interface(dev: Any) -> tuple[Any, Any, bytes] | None:
    """First (configuration, interface, descriptor) that is CCID: class 0x0B, or 0xFF with a descriptor."""
    for cfg in dev:
        for intf in cfg:
            if intf.bAlternateSetting != 0:
                continue
            if intf.bInterfaceClass not in (CCID_INTERFACE_CLASS, VENDOR_INTERFACE_CLASS):
                continue
            raw = _class_descriptor_bytes(intf)
            if raw is not None:
                return cfg, intf, raw
    return None


__all__ = [
    "ICCD_VERSIONS",
    "DeviceInfo",
    "DeviceMatch",
    "find_ccid_interface",
    "refuse_iccd",
    "select_device",
]
