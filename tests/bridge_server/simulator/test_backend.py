"""The simulated token as pyusb sees it: enumeration, descriptors, strings, errors, unplug."""

from __future__ import annotations

import errno
import threading
from array import array

import pytest
import usb.core
import usb.util
from sim_usb_host import FakeCard, Host

from bridge_server.simulator.backend import SimulatedToken, SimulatorBackend, open_simulator
from bridge_server.simulator.profiles import PROFILES
from protocol.ccid import (
    CcidClassDescriptor,
    CommandStatus,
    IccStatus,
    NotifySlotChange,
    decode_interrupt,
    get_slot_status,
    icc_power_on,
)

PROFILE_NAMES = ["safenet-5110", "yubikey5", "etoken-fusion", "epass2003"]
SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")


def make(name: str) -> tuple[SimulatorBackend, SimulatedToken, Host]:
    token = SimulatedToken(PROFILES[name], card=FakeCard())
    backend = SimulatorBackend([token])
    return backend, token, Host(backend, token)


def test_all_four_design_profiles_exist() -> None:
    assert set(PROFILE_NAMES) <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_find_reports_profile_ids_and_strings(name: str) -> None:
    profile = PROFILES[name]
    backend, _tokens = open_simulator([name])
    dev = usb.core.find(backend=backend, idVendor=profile.vid, idProduct=profile.pid)
    assert dev is not None
    assert dev.bcdDevice == profile.bcd_device
    assert dev.serial_number == profile.serial
    assert dev.product == profile.product
    assert dev.manufacturer == profile.manufacturer
    assert usb.util.get_string(dev, dev.iSerialNumber) == profile.serial
    assert dev.bus is not None
    assert dev.address is not None


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_ccid_interface_has_profile_number_and_class_descriptor(name: str) -> None:
    profile = PROFILES[name]
    _, _, host = make(name)
    assert host.intf.bInterfaceNumber == profile.interface_number
    assert host.intf.bInterfaceClass == 0x0B
    assert len(host.intf.extra_descriptors) == 54
    assert CcidClassDescriptor.parse(bytes(host.intf.extra_descriptors)) == profile.descriptor
    cfg = host.dev.get_active_configuration()
    assert cfg.bNumInterfaces == profile.interface_number + 1
    # the interfaces before the CCID one are placeholders of another class
    assert [i.bInterfaceClass for i in cfg][: profile.interface_number] == [3] * profile.interface_number


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_endpoints_bulk_out_bulk_in_and_interrupt_unless_profile_has_none(name: str) -> None:
    profile = PROFILES[name]
    _, _, host = make(name)
    assert host.bulk_out is not None
    assert host.bulk_in is not None
    assert (host.intr_in is not None) == profile.has_interrupt
    assert host.intf.bNumEndpoints == (3 if profile.has_interrupt else 2)


def test_epass2003_has_no_interrupt_endpoint() -> None:
    _, _, host = make("epass2003")
    assert host.intr_in is None
    assert host.intf.bNumEndpoints == 2


def test_missing_alternate_setting_and_interface_raise_index_error() -> None:
    _, _, host = make("yubikey5")
    cfg = host.dev.get_active_configuration()
    with pytest.raises(IndexError):
        cfg[(0, 1)]
    with pytest.raises(IndexError):
        cfg[(cfg.bNumInterfaces, 0)]


def test_get_descriptor_device_matches_the_parsed_attributes() -> None:
    _, token, host = make("etoken-fusion")
    raw = host.dev.ctrl_transfer(0x80, 0x06, 0x0100, 0, 64)
    assert len(raw) == 18
    assert raw[0] == 18
    assert raw[1] == 1
    assert int.from_bytes(raw[8:10], "little") == token.profile.vid
    assert int.from_bytes(raw[10:12], "little") == token.profile.pid
    cfg = host.dev.ctrl_transfer(0x80, 0x06, 0x0200, 0, 512)
    assert int.from_bytes(cfg[2:4], "little") == len(cfg)
    assert bytes(token.profile.descriptor.encode()) in bytes(cfg)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_power_on_returns_profile_atr(name: str) -> None:
    _, token, host = make(name)
    assert host.power_on() == token.profile.atr


@pytest.mark.parametrize("name", ["yubikey5", "etoken-fusion", "epass2003"])
def test_select_piv_at_apdu_level_with_the_real_piv_card(name: str) -> None:
    backend, tokens = open_simulator([name])
    host = Host(backend, tokens[0])
    host.power_on()
    rapdu = host.transmit_apdu(SELECT_PIV)
    assert rapdu[-2:] == b"\x90\x00"
    assert rapdu[0] == 0x61  # the application property template (SP 800-73-4 §3.1.1)


def test_interrupt_endpoint_reports_insertion_then_times_out() -> None:
    _, _, host = make("safenet-5110")
    assert host.intr_in is not None
    first = bytes(host.dev.read(host.intr_in.bEndpointAddress, 8, 100))
    assert first == b"\x50\x03"
    assert decode_interrupt(first) == NotifySlotChange(present=(True,), changed=(True,))
    with pytest.raises(usb.core.USBTimeoutError) as exc:
        host.dev.read(host.intr_in.bEndpointAddress, 8, 10)
    assert exc.value.errno == errno.ETIMEDOUT


def test_bulk_read_with_nothing_pending_times_out() -> None:
    _, _, host = make("yubikey5")
    with pytest.raises(usb.core.USBTimeoutError) as exc:
        host.read_raw(timeout_ms=10)
    assert exc.value.backend_error_code == -7


def test_bulk_read_fills_a_caller_buffer_in_place_and_returns_the_count() -> None:
    _, _, host = make("yubikey5")
    host.send(get_slot_status(7))
    buff = array("B", bytes(64))
    n = host.dev.read(host.bulk_in.bEndpointAddress, buff, 100)
    assert n == 10
    assert len(buff) == 64
    assert bytes(buff[:10]) == bytes.fromhex("81000000000007010000")


def test_read_into_too_small_buffer_overflows() -> None:
    _, _, host = make("yubikey5")
    host.send(icc_power_on(1))
    with pytest.raises(usb.core.USBError) as exc:
        host.dev.read(host.bulk_in.bEndpointAddress, 8, 100)
    assert exc.value.errno == errno.EOVERFLOW


def test_unplug_fails_transfers_with_enodev_like_libusb() -> None:
    _, token, host = make("safenet-5110")
    host.power_on()
    token.unplug()
    with pytest.raises(usb.core.USBError) as exc:
        host.send(get_slot_status(1))
    assert exc.value.errno == errno.ENODEV == 19
    assert exc.value.backend_error_code == -4
    assert exc.value.strerror == "No such device (it may have been disconnected)"
    with pytest.raises(usb.core.USBError) as exc:
        host.read_raw(timeout_ms=10)
    assert exc.value.errno == 19


def test_unplug_wakes_a_reader_blocked_in_another_thread() -> None:
    _, token, host = make("yubikey5")
    caught: list[BaseException] = []

    def reader() -> None:
        try:
            host.read_raw(timeout_ms=60_000)
        except usb.core.USBError as exc:
            caught.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    token.unplug()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(caught) == 1
    assert isinstance(caught[0], usb.core.USBError)
    assert caught[0].errno == errno.ENODEV


def test_unplugged_token_is_not_enumerated_and_replug_brings_it_back() -> None:
    backend, token, host = make("etoken-fusion")
    old_address = host.dev.address
    host.power_on()
    token.unplug()
    assert usb.core.find(backend=backend) is None
    token.replug()
    # the old handle stays dead, as a libusb handle on a vanished device does
    with pytest.raises(usb.core.USBError) as exc:
        host.send(get_slot_status(1))
    assert exc.value.errno == errno.ENODEV
    usb.util.dispose_resources(host.dev)
    again = Host(backend, token)
    assert again.dev.serial_number == token.profile.serial
    assert again.dev.address != old_address
    # replug cut the power: the card must be powered on again
    status = again.transact(get_slot_status(again.next_seq()))
    assert status.icc_status is IccStatus.PRESENT_INACTIVE
    assert again.power_on() == token.profile.atr
    assert again.intr_in is not None
    assert bytes(again.dev.read(again.intr_in.bEndpointAddress, 8, 100)) == b"\x50\x03"


def test_replug_with_another_serial_shows_a_different_device() -> None:
    backend, token, _ = make("yubikey5")
    token.unplug()
    token.replug(serial="OTHER")
    dev = usb.core.find(backend=backend)
    assert dev is not None
    assert dev.serial_number == "OTHER"


def test_stall_fails_the_next_transfer_with_epipe_once() -> None:
    _, token, host = make("yubikey5")
    token.faults.stall_next = True
    with pytest.raises(usb.core.USBError) as exc:
        host.send(get_slot_status(1))
    assert exc.value.errno == errno.EPIPE
    host.dev.clear_halt(host.bulk_out)
    resp = host.transact(get_slot_status(2))
    assert resp.command_status is CommandStatus.OK


def test_stall_on_a_read_fails_that_read() -> None:
    _, token, host = make("yubikey5")
    host.send(get_slot_status(1))
    token.faults.stall_next = True
    with pytest.raises(usb.core.USBError) as exc:
        host.read_raw()
    assert exc.value.errno == errno.EPIPE
    assert host.read().seq == 1  # the response was not consumed by the stalled read


def test_second_claimer_of_the_ccid_interface_gets_ebusy() -> None:
    backend, token, host = make("safenet-5110")
    other = usb.core.find(backend=backend)
    assert other is not None
    with pytest.raises(usb.core.USBError) as exc:
        usb.util.claim_interface(other, token.profile.interface_number)
    assert exc.value.errno == errno.EBUSY
    usb.util.dispose_resources(host.dev)
    usb.util.claim_interface(other, token.profile.interface_number)


def test_unknown_class_request_stalls() -> None:
    _, token, host = make("safenet-5110")
    with pytest.raises(usb.core.USBError) as exc:
        host.dev.ctrl_transfer(0xA1, 0x03, 0, token.profile.interface_number, 4)
    assert exc.value.errno == errno.EPIPE


def test_open_simulator_gives_repeated_profiles_distinct_serials_and_state_files(tmp_path) -> None:
    backend, tokens = open_simulator(["yubikey5", "yubikey5"], state_dir=tmp_path)
    serials = {d.serial_number for d in usb.core.find(find_all=True, backend=backend)}
    assert serials == {t.serial for t in tokens}
    assert len(serials) == 2


def test_open_simulator_rejects_an_unknown_profile_by_name() -> None:
    with pytest.raises(ValueError, match="no-such-token"):
        open_simulator(["no-such-token"])
