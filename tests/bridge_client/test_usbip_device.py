"""The emulated reader's USB side without I/O: packets, ZLPs, overflow, busy slot, notifications."""

from __future__ import annotations

import errno
import struct

import pytest

from bridge_client.usbip.descriptors import ReaderDescriptors
from bridge_client.usbip.device import MAX_UNREAD_ANSWERS, CcidReaderDevice, Completion, UrbLimitError
from protocol import ccid

SET_CONFIGURATION = struct.pack("<BBHHH", 0x00, 9, 1, 0, 0)


def configured() -> CcidReaderDevice:
    device = CcidReaderDevice(ReaderDescriptors("tokenbridge codesign", "codesign-1-1"))
    assert device.submit(1, 0, 0, SET_CONFIGURATION, b"") == [Completion(1, 0, b"", 0)]
    device.set_card_present(True)
    return device


def answer_of_length(device: CcidReaderDevice, total: int) -> bytes:
    """Power on, XfrBlock, and answer with a DataBlock of `total` bytes on the wire."""
    device.submit(2, 0x01, 10, bytes(8), ccid.icc_power_on(0).encode())
    device.take_command()
    device.powered = True
    device.answer(ccid.data_block(0, b"\x3b\x00"))
    device.submit(3, 0x82, 64, bytes(8), b"")  # the power-on answer
    device.submit(4, 0x01, 14, bytes(8), ccid.xfr_block(1, b"\x00\xa4\x04\x00").encode())
    assert device.take_command() is not None
    message = ccid.data_block(1, bytes(total - 12) + b"\x90\x00")
    device.answer(message)
    return message.encode()


def test_an_answer_that_fills_its_last_packet_and_the_urb_owes_a_zero_length_packet() -> None:
    device = configured()
    raw = answer_of_length(device, 128)
    first = device.submit(10, 0x82, 128, bytes(8), b"")
    assert first == [Completion(10, 0, raw)]
    assert device.submit(11, 0x82, 128, bytes(8), b"") == [Completion(11, 0, b"")]  # the ZLP


def test_a_urb_larger_than_the_answer_ends_at_the_answer_without_a_zlp() -> None:
    device = configured()
    raw = answer_of_length(device, 128)
    assert device.submit(10, 0x82, 4096, bytes(8), b"") == [Completion(10, 0, raw)]
    assert device.submit(11, 0x82, 4096, bytes(8), b"") == []  # waits for the next answer


def test_an_answer_is_split_at_the_urb_and_a_short_odd_urb_overflows_keeping_the_data() -> None:
    device = configured()
    raw = answer_of_length(device, 150)
    assert device.submit(10, 0x82, 100, bytes(8), b"") == [Completion(10, -errno.EOVERFLOW, b"")]
    assert device.submit(11, 0x82, 64, bytes(8), b"") == [Completion(11, 0, raw[:64])]
    assert device.submit(12, 0x82, 64, bytes(8), b"") == [Completion(12, 0, raw[64:128])]
    assert device.submit(13, 0x82, 64, bytes(8), b"") == [Completion(13, 0, raw[128:])]


def test_a_command_while_the_card_works_fails_at_once_with_slot_busy() -> None:
    device = configured()
    device.submit(2, 0x01, 10, bytes(8), ccid.icc_power_on(5).encode())
    assert device.take_command() is not None
    device.submit(3, 0x01, 10, bytes(8), ccid.get_slot_status(6).encode())
    (done,) = device.submit(4, 0x82, 64, bytes(8), b"")
    busy = ccid.decode_message(done.data)
    assert (busy.seq, busy.command_status, busy.error) == (6, ccid.CommandStatus.FAILED, 0xE0)


def test_unread_slot_changes_merge_into_one_notification_with_the_latest_presence() -> None:
    device = configured()  # inserted: 50 03 pending
    device.set_card_present(False)
    device.set_card_present(True)
    device.set_card_present(False)
    assert device.submit(5, 0x83, 8, bytes(8), b"") == [Completion(5, 0, b"\x50\x02")]
    assert device.submit(6, 0x83, 8, bytes(8), b"") == []  # nothing new: stays pending


def test_an_oversized_command_halts_bulk_out_until_clear_feature() -> None:
    device = configured()
    header = struct.pack("<BIBBBBB", 0x6F, 70000, 0, 0, 0, 0, 0)
    assert device.submit(2, 0x01, 10, bytes(8), header) == [Completion(2, 0, b"", 10)]
    assert device.submit(3, 0x01, 10, bytes(8), ccid.get_slot_status(1).encode()) == [
        Completion(3, -errno.EPIPE)
    ]
    clear = struct.pack("<BBHHH", 0x02, 1, 0, 0x01, 0)
    assert device.submit(4, 0, 0, clear, b"")[0].status == 0
    assert device.submit(5, 0x01, 10, bytes(8), ccid.get_slot_status(1).encode())[0].status == 0


def test_requests_before_set_configuration_reach_only_endpoint_zero() -> None:
    device = CcidReaderDevice(ReaderDescriptors("p", "s"))
    assert device.submit(1, 0x82, 64, bytes(8), b"") == [Completion(1, -errno.EPIPE)]
    get_device = struct.pack("<BBHHH", 0x80, 6, 0x0100, 0, 18)
    assert len(device.submit(2, 0x80, 18, get_device, b"")[0].data) == 18


def test_set_parameters_is_kept_and_read_back_and_a_bad_protocol_names_its_field() -> None:
    device = configured()
    t0 = bytes([0x96, 0x00, 0x00, 0x0A, 0x00])
    device.submit(2, 0x01, 15, bytes(8), ccid.set_parameters(1, 0, t0).encode())
    device.submit(
        3, 0x01, 10, bytes(8), ccid.CcidMessage(ccid.MessageType.PC_to_RDR_GetParameters, 2).encode()
    )
    device.submit(4, 0x01, 11, bytes(8), bytes.fromhex("61 01000000 00 03 02 0000 00"))  # bProtocolNum 2
    answers = [ccid.decode_message(device.submit(n, 0x82, 64, bytes(8), b"")[0].data) for n in (5, 6, 7)]
    assert [(a.seq, a.b9, a.data) for a in answers[:2]] == [(1, 0, t0), (2, 0, t0)]
    assert (answers[2].command_status, answers[2].error) == (ccid.CommandStatus.FAILED, 7)


def test_a_host_that_never_reads_its_answers_is_cut_off_after_a_bound() -> None:
    device = configured()
    with pytest.raises(UrbLimitError, match="answers unread"):
        for seq in range(64):
            device.submit(seq + 2, 0x01, 10, bytes(8), ccid.get_slot_status(seq).encode())
    assert seq == MAX_UNREAD_ANSWERS  # the first 32 were queued, the 33rd refused
