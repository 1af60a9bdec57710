"""BulkInAssembler: whole CCID messages out of transfers cut anywhere."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import ccid
from protocol.ccid_stream import BulkInAssembler
from protocol.errors import MalformedCcidMessageError

MESSAGE = ccid.data_block(3, bytes(range(200)) + b"\x90\x00").encode()


@pytest.mark.parametrize("cut", range(len(MESSAGE) + 1))
def test_message_cut_at_every_byte_boundary_comes_out_whole_once(cut: int) -> None:
    asm = BulkInAssembler()
    asm.receive_data(MESSAGE[:cut])
    if cut < len(MESSAGE):
        assert asm.next_message() is None
    asm.receive_data(MESSAGE[cut:])
    assert asm.next_message() == MESSAGE
    assert asm.next_message() is None and asm.buffered == 0


def test_zero_length_transfer_is_nothing_yet() -> None:
    asm = BulkInAssembler()
    asm.receive_data(b"")
    assert asm.next_message() is None and asm.buffered == 0


@given(st.lists(st.integers(min_value=0, max_value=120), max_size=8))
def test_two_messages_in_any_split_come_out_in_order(cuts: list[int]) -> None:
    second = ccid.slot_status(4, icc=ccid.IccStatus.PRESENT_ACTIVE).encode()
    stream = MESSAGE + second
    points = sorted({min(c * 3, len(stream)) for c in cuts} | {0, len(stream)})
    asm = BulkInAssembler()
    out = []
    for a, b in itertools.pairwise(points):
        asm.receive_data(stream[a:b])
        while (msg := asm.next_message()) is not None:
            out.append(msg)
    assert out == [MESSAGE, second]


def test_header_announcing_more_than_the_limit_raises_and_drops_the_buffer() -> None:
    asm = BulkInAssembler(max_message_length=271)
    asm.receive_data(ccid.data_block(1, bytes(262)).encode()[:64])
    with pytest.raises(MalformedCcidMessageError, match="272 bytes"):
        asm.next_message()
    assert asm.buffered == 0


def test_transfer_that_ended_short_of_dwlength_is_refused_at_once() -> None:
    asm = BulkInAssembler()
    asm.receive_data(MESSAGE[:-1], transfer_ended=True)  # the device's short packet came early
    with pytest.raises(MalformedCcidMessageError, match="does not match the 201 data bytes"):
        asm.next_message()
    assert asm.buffered == 0
    asm.receive_data(MESSAGE, transfer_ended=True)  # the next message is read cleanly
    assert asm.next_message() == MESSAGE


def test_cut_transfer_waits_and_a_lone_zero_length_packet_ends_a_partial() -> None:
    asm = BulkInAssembler()
    asm.receive_data(MESSAGE[:64], transfer_ended=False)
    assert asm.next_message() is None
    asm.receive_data(b"", transfer_ended=True)
    with pytest.raises(MalformedCcidMessageError):
        asm.next_message()


def test_runt_transfer_shorter_than_the_header_is_refused_when_it_ended() -> None:
    asm = BulkInAssembler()
    asm.receive_data(b"\x80\x00\x00", transfer_ended=True)
    with pytest.raises(MalformedCcidMessageError, match="shorter than the header"):
        asm.next_message()
