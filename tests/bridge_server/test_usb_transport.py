"""USB transport: device matching, error translation, descriptor discovery, and the simulator via pyusb.

Tests that cross into worker threads use the real clock (no autojump there) and short deadlines.
"""

from __future__ import annotations

import array
import errno
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
import usb.core

from bridge_server.errors import (
    DeviceBusyError,
    DeviceError,
    DeviceGoneError,
    DeviceNotFoundError,
    DevicePermissionError,
    DeviceStallError,
    DeviceTimeoutError,
)
from bridge_server.simulator import backend as sim_backend
from bridge_server.usb.transport import (
    AsyncUsbDevice,
    DeviceInfo,
    DeviceMatch,
    UsbCcidDevice,
    find_ccid_interface,
    list_ccid_devices,
    select_device,
    translate_usb_error,
)
from protocol.errors import MalformedCcidMessageError

ETOKEN_DESCRIPTOR = bytes.fromhex(  # reference §1.7, SafeNet eToken 5110+ FIPS
    "36 21 10 01 00 02 02 00 00 00 C0 12 00 00 C0 12 00 00 00 67 32 00 00 CE 99 0C 00 00 FE 00 00 00"
    " 00 00 00 00 00 00 00 00 30 02 01 00 0F 01 00 00 00 00 00 00 00 01"
)


def _info(vid: int = 0x0529, pid: int = 0x0620, serial: str = "0247A1B2") -> DeviceInfo:
    return DeviceInfo(vid, pid, serial, 0x0100, 1, 5, "eToken")


# ---- matching (pure) ----


def test_select_device_picks_the_single_match_by_serial() -> None:
    a, b = _info(serial="AAA"), _info(serial="BBB")
    assert select_device(DeviceMatch(vid=0x0529, pid=0x0620, serial="BBB"), [a, b]) is b


def test_select_device_compares_serials_case_blind() -> None:
    a = _info(serial="0247a1b2")
    assert select_device(DeviceMatch(serial="0247A1B2"), [a]) is a


def test_select_device_vid_pid_mismatch_is_not_found_and_lists_what_was_seen() -> None:
    seen = [_info(vid=0x1050, pid=0x0407, serial="YK1")]
    with pytest.raises(DeviceNotFoundError) as info:
        select_device(DeviceMatch(vid=0x0529, pid=0x0620), seen)
    assert "vid=0x0529 pid=0x0620" in str(info.value)
    assert "1050:0407 serial 'YK1'" in str(info.value)


def test_select_device_with_nothing_attached_says_none_seen() -> None:
    with pytest.raises(DeviceNotFoundError, match=r"seen: none"):
        select_device(DeviceMatch(vid=0x0529), [])


def test_select_device_refuses_an_ambiguous_match_and_asks_for_the_serial() -> None:
    with pytest.raises(DeviceNotFoundError, match="add the serial"):
        select_device(DeviceMatch(vid=0x0529, pid=0x0620), [_info(serial="A"), _info(serial="B")])


def test_device_match_with_no_fields_matches_anything() -> None:
    assert DeviceMatch().matches(_info())


# ---- error translation (pure) ----


@pytest.mark.parametrize(
    ("err", "kind", "needle"),
    [
        (errno.EACCES, DevicePermissionError, "systemd/70-tokenbridge.rules"),
        (errno.EBUSY, DeviceBusyError, "pcscd.socket"),
        (errno.ENODEV, DeviceGoneError, "gone"),
        (errno.EPIPE, DeviceStallError, "stalled"),
        (errno.EIO, DeviceError, "Input/output"),
    ],
)
def test_usb_errors_translate_to_actionable_device_errors(err: int, kind: type, needle: str) -> None:
    exc = usb.core.USBError("Input/output error" if err == errno.EIO else "x", -1, err)
    out = translate_usb_error(exc, "claiming 0529:0620")
    assert type(out) is kind
    assert needle in str(out)
    assert "claiming 0529:0620" in str(out)


def test_usb_timeout_translates_to_device_timeout() -> None:
    exc = usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
    assert isinstance(translate_usb_error(exc, "reading"), DeviceTimeoutError)


# ---- interface discovery with descriptor doubles ----


@dataclass
class _Ep:
    extra_descriptors: bytes = b""


@dataclass
class _Intf:
    bInterfaceClass: int
    extra_descriptors: bytes = b""
    endpoints: list[_Ep] = field(default_factory=list)
    bAlternateSetting: int = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.endpoints)


def _dev(*intfs: _Intf) -> list[list[_Intf]]:
    return [list(intfs)]  # a device iterates configurations, a configuration interfaces


def test_ccid_interface_found_after_a_hid_interface() -> None:
    hid, ccid = _Intf(0x03), _Intf(0x0B, ETOKEN_DESCRIPTOR)
    found = find_ccid_interface(_dev(hid, ccid))
    assert found is not None and found[1] is ccid and found[2] == ETOKEN_DESCRIPTOR


def test_ccid_descriptor_read_from_last_endpoint_when_interface_extra_is_empty() -> None:
    intf = _Intf(0x0B, b"", [_Ep(), _Ep(), _Ep(ETOKEN_DESCRIPTOR)])
    found = find_ccid_interface(_dev(intf))
    assert found is not None and found[2] == ETOKEN_DESCRIPTOR


def test_vendor_class_interface_counts_only_with_a_54_byte_descriptor() -> None:
    assert find_ccid_interface(_dev(_Intf(0xFF, b"\x05\x24\x00\x01\x02"))) is None
    found = find_ccid_interface(_dev(_Intf(0xFF, ETOKEN_DESCRIPTOR)))
    assert found is not None


def test_ccid_class_with_a_wrong_length_descriptor_is_not_ccid() -> None:
    assert find_ccid_interface(_dev(_Intf(0x0B, ETOKEN_DESCRIPTOR[:40]))) is None


# ---- through pyusb against the simulator ----


PROFILES = ("safenet-5110", "yubikey5", "etoken-fusion", "epass2003")


@pytest.fixture
def sim():  # type: ignore[no-untyped-def]
    backend, tokens = sim_backend.open_simulator(list(PROFILES))
    opened: list[UsbCcidDevice] = []
    yield backend, tokens, opened
    for dev in opened:
        dev.close()


def _open(sim, token) -> UsbCcidDevice:  # type: ignore[no-untyped-def]
    backend, _, opened = sim
    p = token.profile
    dev = UsbCcidDevice.open(DeviceMatch(p.vid, p.pid, token.serial), backend=backend)
    opened.append(dev)
    return dev


def test_list_ccid_devices_sees_every_simulated_token(sim) -> None:  # type: ignore[no-untyped-def]
    backend, tokens, _ = sim
    infos = list_ccid_devices(backend=backend)
    assert sorted((i.vid, i.pid, i.serial) for i in infos) == sorted(
        (t.profile.vid, t.profile.pid, t.serial) for t in tokens
    )


@pytest.mark.parametrize("index", range(len(PROFILES)))
def test_open_finds_interface_descriptor_and_endpoints(sim, index: int) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][index]
    dev = _open(sim, token)
    assert dev.descriptor == token.profile.descriptor
    assert dev.has_interrupt is token.profile.has_interrupt
    assert dev.info.bcd_device == token.profile.bcd_device
    assert dev.info.serial == token.serial


def test_get_slot_status_round_trip_through_pyusb(sim) -> None:  # type: ignore[no-untyped-def]
    dev = _open(sim, sim[1][0])
    dev.write(bytes.fromhex("65000000000007000000"), 1000)
    reply = dev.read(1000)
    assert reply[0] == 0x81 and reply[6] == 0x07


def test_open_with_an_unknown_serial_lists_the_seen_devices(sim) -> None:  # type: ignore[no-untyped-def]
    backend, tokens, _ = sim
    with pytest.raises(DeviceNotFoundError) as info:
        UsbCcidDevice.open(DeviceMatch(serial="NOPE"), backend=backend)
    for token in tokens:
        assert token.serial in str(info.value)


def test_second_claim_of_the_same_token_is_busy_with_pcscd_hint(sim) -> None:  # type: ignore[no-untyped-def]
    _open(sim, sim[1][0])
    with pytest.raises(DeviceBusyError, match="pcscd"):
        _open(sim, sim[1][0])


def test_permission_denied_names_the_udev_rule(sim) -> None:  # type: ignore[no-untyped-def]
    class DeniedBackend(sim_backend.SimulatorBackend):  # type: ignore[misc]
        def open_device(self, dev):  # type: ignore[no-untyped-def]
            raise usb.core.USBError("Access denied (insufficient permissions)", -3, errno.EACCES)

    tokens = sim[1]
    denied = DeniedBackend(tokens)
    with pytest.raises(DevicePermissionError, match=r"70-tokenbridge\.rules"):
        UsbCcidDevice.open(DeviceMatch(serial=tokens[0].serial), backend=denied)
    with pytest.raises(DevicePermissionError, match="tokenbridge group"):
        UsbCcidDevice.open(DeviceMatch(vid=tokens[0].profile.vid, pid=tokens[0].profile.pid), backend=denied)


def test_unplugged_token_read_raises_device_gone(sim) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][0]
    dev = _open(sim, token)
    token.unplug()
    with pytest.raises(DeviceGoneError):
        dev.read(100)


def test_stalled_write_raises_stall_and_the_pipe_works_afterwards(sim) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][0]
    dev = _open(sim, token)
    token.faults.stall_next = True
    with pytest.raises(DeviceStallError):
        dev.write(bytes.fromhex("65000000000001000000"), 1000)
    dev.write(bytes.fromhex("65000000000002000000"), 1000)
    assert dev.read(1000)[6] == 0x02


def test_read_timeout_is_device_timeout_and_interrupt_timeout_is_none(sim) -> None:  # type: ignore[no-untyped-def]
    dev = _open(sim, sim[1][0])
    with pytest.raises(DeviceTimeoutError):
        dev.read(20)
    assert dev.read_interrupt(1000) == bytes.fromhex("5003")  # the insertion notice queued at plug-in
    assert dev.read_interrupt(20) is None


async def test_async_read_is_cancelled_within_one_poll_period(sim) -> None:  # type: ignore[no-untyped-def]
    adev = AsyncUsbDevice(_open(sim, sim[1][0]), poll_ms=50)
    start = trio.current_time()
    with trio.move_on_after(0.1):
        await adev.read()
    assert trio.current_time() - start < 0.5


async def test_async_unplug_while_waiting_for_a_response_raises_gone(sim) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][0]
    adev = AsyncUsbDevice(_open(sim, token), poll_ms=50)

    async def pull() -> None:
        await trio.testing.wait_all_tasks_blocked()  # the reader is parked in its worker thread
        token.unplug()

    with pytest.RaisesGroup(DeviceGoneError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull)
            await adev.read()


async def test_async_open_and_aclose_release_the_interface(sim) -> None:  # type: ignore[no-untyped-def]
    backend, tokens, _ = sim
    match = DeviceMatch(serial=tokens[1].serial)
    adev = await AsyncUsbDevice.open(match, backend=backend)
    assert adev.info.serial == tokens[1].serial
    await adev.aclose()
    again = await AsyncUsbDevice.open(match, backend=backend)  # not busy: released by aclose
    await again.aclose()


async def test_async_transceive_answers_in_one_worker_thread_hop(sim, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    adev = AsyncUsbDevice(_open(sim, sim[1][0]), poll_ms=50)
    hops: list[object] = []
    real_run_sync = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real_run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    reply = await adev.transceive(bytes.fromhex("65000000000009000000"))  # GetSlotStatus, bSeq 9
    assert reply[0] == 0x81 and reply[6] == 0x09
    assert len(hops) == 1


async def test_async_transceive_keeps_reading_when_the_answer_is_late() -> None:
    class LateDevice:
        """Sync-device stand-in: the first read inside transceive times out, the next one answers."""

        def __init__(self) -> None:
            self.written: list[bytes] = []

        def transceive(self, data: bytes, write_timeout_ms: int, read_timeout_ms: int) -> bytes | None:
            self.written.append(data)
            return None

        def read(self, timeout_ms: int) -> bytes:
            return b"late answer"

    dev = LateDevice()
    adev = AsyncUsbDevice(dev, poll_ms=10)  # type: ignore[arg-type]
    assert await adev.transceive(b"command") == b"late answer"
    assert dev.written == [b"command"]


def test_transceive_returns_none_when_no_answer_comes_and_raises_write_errors(sim) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][0]
    dev = _open(sim, token)
    assert dev.transceive(bytes.fromhex("65000000000003000000"), 1000, 1000)[6] == 0x03  # type: ignore[index]
    token.faults.delay_next_s = 0.3  # the answer is held back; a time extension comes at once
    first = dev.transceive(bytes.fromhex("65000000000004000000"), 1000, 20)
    assert first is not None and first[6] == 0x04 and first[7] & 0xC0 == 0x80
    token.faults.delay_next_s = 0.3  # an XfrBlock to an unpowered card: held, no time extension
    assert dev.transceive(bytes.fromhex("6F0500000000050000000084000008"), 1000, 20) is None
    while (late := dev.read(1000))[6] != 0x05:
        pass  # the held GetSlotStatus answer first, then the XfrBlock's
    assert late[0] == 0x80
    token.faults.stall_next = True
    with pytest.raises(DeviceStallError):
        dev.transceive(bytes.fromhex("65000000000006000000"), 1000, 20)


class _CuttingBackend(sim_backend.SimulatorBackend):  # type: ignore[misc]
    """Hands out each bulk-IN message in 64-byte pieces, as libusb does for a read its timeout
    cut mid-message (pyusb returns the partial count); the umockdev rig shows it for real."""

    def __init__(self, tokens, cut: int = 64) -> None:  # type: ignore[no-untyped-def]
        super().__init__(tokens)
        self.cut = cut
        self.rest = b""

    def bulk_read(self, dev_handle, ep, intf, buff, timeout):  # type: ignore[no-untyped-def]
        if not self.rest:
            n = super().bulk_read(dev_handle, ep, intf, buff, timeout)
            self.rest = bytes(buff[:n])
        piece, self.rest = self.rest[: self.cut], self.rest[self.cut :]
        buff[: len(piece)] = array.array("B", piece)
        return len(piece)


def test_read_assembles_a_message_cut_into_partial_transfers(sim) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][1]  # yubikey5
    cutting = _CuttingBackend([token], cut=64)
    dev = UsbCcidDevice.open(DeviceMatch(serial=token.serial), backend=cutting)
    try:
        dev.write(bytes.fromhex("62000000000001000000"), 1000)  # IccPowerOn, bSeq 1: 33 bytes, one piece
        assert dev.read(1000)[10:] == token.profile.atr
        select = bytes.fromhex("00A4040009A00000030800001000")
        dev.write(bytes.fromhex("6F0E0000000002000000") + select, 1000)  # XfrBlock, bSeq 2
        with pytest.raises(DeviceTimeoutError, match="64 bytes of one so far"):
            dev.read(1000)  # the first packet only: kept, not taken for a message
        answer = dev.read(1000)
        assert answer[0] == 0x80 and answer[6] == 0x02 and len(answer) > 64 and answer[-2:] == b"\x90\x00"
    finally:
        dev.close()


def test_read_refuses_a_transfer_that_ended_short_of_dwlength(sim) -> None:  # type: ignore[no-untyped-def]
    token = sim[1][1]
    cutting = _CuttingBackend([token], cut=20)  # not a multiple of 64: the transfer ended there
    dev = UsbCcidDevice.open(DeviceMatch(serial=token.serial), backend=cutting)
    try:
        dev.write(bytes.fromhex("62000000000001000000"), 1000)
        with pytest.raises(MalformedCcidMessageError, match="dwLength 23 does not match the 10 data bytes"):
            dev.read(1000)
    finally:
        dev.close()
