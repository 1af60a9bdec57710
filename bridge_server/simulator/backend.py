"""A pyusb backend whose devices are simulated CCID tokens (`usb_token.SimulatedToken`).

`usb.core.find(backend=SimulatorBackend(tokens))` finds the plugged-in tokens and every
pyusb call (set_configuration, claim_interface, read/write, ctrl_transfer, strings)
reaches them exactly as it would reach libusb1, so the server's USB and CCID code runs
unchanged. Descriptors follow pyusb's backend contract (reference §3.1): every attribute
pyusb copies exists, a missing interface or alternate setting raises IndexError.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import usb.backend  # type: ignore[import-untyped]

from . import usb_descriptors as ud
from .usb_token import (
    INVALID,
    NOT_FOUND,
    PIPE,
    DeviceRef,
    Handle,
    SimulatedToken,
    fill,
    usb_error,
)

__all__ = ["SimulatedToken", "SimulatorBackend", "open_simulator"]

# USB 2.0 §9.4 standard requests; CCID 1.1 §5.3 class requests.
_REQ_GET_STATUS: Final = 0x00
_REQ_GET_DESCRIPTOR: Final = 0x06
_CCID_ABORT: Final = 0x01


class SimulatorBackend(usb.backend.IBackend):  # type: ignore[misc]
    """A pyusb backend serving `tokens` (only the plugged-in ones are enumerated)."""

    def __init__(self, tokens: Sequence[SimulatedToken]) -> None:
        super().__init__()
        self.tokens = list(tokens)

    # -- enumeration and descriptors -------------------------------------------------------

    def enumerate_devices(self) -> list[DeviceRef]:
        return [t.ref() for t in self.tokens if t.plugged]

    def get_device_descriptor(self, dev: DeviceRef) -> ud.DeviceDescriptor:
        p = dev.token.profile
        return ud.DeviceDescriptor(
            idVendor=p.vid,
            idProduct=p.pid,
            bcdDevice=p.bcd_device,
            iSerialNumber=ud.STRING_SERIAL if dev.serial else 0,
            bus=1,
            address=dev.address,
            port_number=dev.token.port,
            port_numbers=(dev.token.port,),
        )

    def get_configuration_descriptor(self, dev: DeviceRef, config: int) -> ud.ConfigurationDescriptor:
        if config != 0:
            raise IndexError(f"invalid configuration index {config}")
        return dev.token.configuration

    def get_interface_descriptor(
        self, dev: DeviceRef, intf: int, alt: int, config: int
    ) -> ud.InterfaceDescriptor:
        interfaces = self.get_configuration_descriptor(dev, config).interfaces
        # pyusb probes alternate settings until IndexError (reference §3.1).
        if not 0 <= intf < len(interfaces):
            raise IndexError(f"invalid interface index {intf}")
        if alt != 0:
            raise IndexError(f"invalid alternate setting index {alt}")
        return interfaces[intf]

    def get_endpoint_descriptor(
        self, dev: DeviceRef, ep: int, intf: int, alt: int, config: int
    ) -> ud.EndpointDescriptor:
        endpoints = self.get_interface_descriptor(dev, intf, alt, config).endpoints
        if not 0 <= ep < len(endpoints):
            raise IndexError(f"invalid endpoint index {ep}")
        return endpoints[ep]

    def get_parent(self, dev: DeviceRef) -> None:
        return None

    # -- handles ---------------------------------------------------------------------------

    def open_device(self, dev: DeviceRef) -> Handle:
        return dev.token.open(dev)

    def close_device(self, dev_handle: Handle) -> None:
        dev_handle.ref.token.release(dev_handle)

    def set_configuration(self, dev_handle: Handle, config_value: int) -> None:
        token = dev_handle.ref.token
        token.check_alive(dev_handle)
        if config_value not in (0, token.configuration.bConfigurationValue):
            raise usb_error(NOT_FOUND)

    def get_configuration(self, dev_handle: Handle) -> int:
        token = dev_handle.ref.token
        token.check_alive(dev_handle)
        return int(token.configuration.bConfigurationValue)

    def set_interface_altsetting(self, dev_handle: Handle, intf: int, altsetting: int) -> None:
        dev_handle.ref.token.check_alive(dev_handle)
        if altsetting != 0:
            raise usb_error(NOT_FOUND)

    def claim_interface(self, dev_handle: Handle, intf: int) -> None:
        dev_handle.ref.token.claim(dev_handle, intf)

    def release_interface(self, dev_handle: Handle, intf: int) -> None:
        dev_handle.ref.token.release(dev_handle, intf)

    def is_kernel_driver_active(self, dev_handle: Handle, intf: int) -> bool:
        dev_handle.ref.token.check_alive(dev_handle)
        return False

    def detach_kernel_driver(self, dev_handle: Handle, intf: int) -> None:
        # libusb: LIBUSB_ERRORNOT_FOUND when no kernel driver is bound.
        raise usb_error(NOT_FOUND)

    def attach_kernel_driver(self, dev_handle: Handle, intf: int) -> None:
        raise usb_error(NOT_FOUND)

    def clear_halt(self, dev_handle: Handle, ep: int) -> None:
        dev_handle.ref.token.check_alive(dev_handle)

    def reset_device(self, dev_handle: Handle) -> None:
        dev_handle.ref.token.reset(dev_handle)

    # -- transfers -------------------------------------------------------------------------

    def bulk_write(self, dev_handle: Handle, ep: int, intf: int, data: array[int], timeout: int) -> int:
        if ep != ud.EP_BULK_OUT:
            raise usb_error(INVALID)
        return dev_handle.ref.token.write_bulk(dev_handle, bytes(data))

    def bulk_read(self, dev_handle: Handle, ep: int, intf: int, buff: array[int], timeout: int) -> int:
        if ep != ud.EP_BULK_IN:
            raise usb_error(INVALID)
        token = dev_handle.ref.token
        if token.faults.take_stall():
            token.check_alive(dev_handle)
            raise usb_error(PIPE)
        return token.read_bulk(dev_handle, buff, timeout)

    def intr_read(self, dev_handle: Handle, ep: int, intf: int, buff: array[int], timeout: int) -> int:
        return dev_handle.ref.token.read_interrupt(dev_handle, ep, buff, timeout)

    def ctrl_transfer(
        self,
        dev_handle: Handle,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array[int],
        timeout: int,
    ) -> int:
        token = dev_handle.ref.token
        token.check_alive(dev_handle)
        if bmRequestType == 0x80 and bRequest == _REQ_GET_DESCRIPTOR:
            payload = self._descriptor(dev_handle.ref, wValue >> 8, wValue & 0xFF)
            return fill(data, payload[: len(data)])
        if bmRequestType == 0x80 and bRequest == _REQ_GET_STATUS:
            return fill(data, b"\x00\x00"[: len(data)])
        if bmRequestType == 0x21 and bRequest == _CCID_ABORT:
            return 0  # CCID 1.1 §5.3.1: the PC_to_RDR_Abort that follows does the work
        # Everything else (GET_CLOCK_FREQUENCIES, GET_DATA_RATES, vendor requests) stalls,
        # as most tokens do (reference §1.6).
        raise usb_error(PIPE)

    def _descriptor(self, ref: DeviceRef, dtype: int, index: int) -> bytes:
        if dtype == ud.DT_DEVICE:
            return self.get_device_descriptor(ref).encode()
        if dtype == ud.DT_CONFIG and index == 0:
            return bytes(ref.token.configuration.encode())
        if dtype == ud.DT_STRING:
            if index == 0:
                return ud.langid_descriptor()
            text = ref.token.strings().get(index)
            if text is not None:
                return ud.string_descriptor(text)
        raise usb_error(PIPE)  # USB 2.0 §9.4.3: unknown descriptor → request error


def open_simulator(
    profile_names: Sequence[str], *, state_dir: Path | None = None, usb_serial: bool = True
) -> tuple[SimulatorBackend, list[SimulatedToken]]:
    """Build one token per profile name (repeats get distinct serials) and their backend.

    With `state_dir`, each token's PIV card persists to `<state_dir>/<serial>.json`. With
    `usb_serial=False` the devices show no iSerialNumber; their cards still know their serial.
    """
    from .piv import PivCard
    from .profiles import PROFILES, yubikey_serial

    tokens: list[SimulatedToken] = []
    seen: dict[str, int] = {}
    for port, name in enumerate(profile_names, start=1):
        try:
            profile = PROFILES[name]
        except KeyError:
            known = ", ".join(sorted(PROFILES))
            raise ValueError(f"unknown simulator profile {name!r} (known: {known})") from None
        count = seen[name] = seen.get(name, 0) + 1
        serial = profile.serial if count == 1 else f"{profile.serial}-{count}"
        state_path = state_dir / f"{serial}.json" if state_dir is not None else None
        card = PivCard(state_path=state_path, yubikey_serial=yubikey_serial(profile, serial))
        tokens.append(SimulatedToken(profile, card=card, serial=serial if usb_serial else "", port=port))
    return SimulatorBackend(tokens), tokens
