"""The USB/IP codec (exporter side): packets as the kernel document lays them out, any chunking."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_client.usbip import wire
from protocol import NEED_DATA
from protocol.errors import RemoteProtocolError

# Byte layouts written out from the kernel documentation's tables, not from the codec.
REQ_IMPORT = bytes.fromhex("0111 8003 00000000") + b"1-1".ljust(32, b"\0")
SUBMIT_OUT = (
    bytes.fromhex("00000001 00000005 00010002 00000000 00000001")  # command seqnum devid OUT ep 1
    + bytes.fromhex("00000000 00000003 00000000 ffffffff 00000000")  # flags len start packets interval
    + bytes(8)  # setup
    + b"\x65\x00\x00"
)
UNLINK = bytes.fromhex("00000002 00000006 00010002 00000000 00000000 00000005") + bytes(24)


def events(side: wire.UsbipServerSide, chunks: list[bytes]) -> list[object]:
    out: list[object] = []
    for chunk in chunks:
        side.receive_data(chunk)
        while (event := side.next_event()) is not NEED_DATA:
            out.append(event)
            if isinstance(event, wire.ReqImport):
                side.imported()
    return out


def test_import_submit_and_unlink_decode_as_the_document_lays_them_out() -> None:
    got = events(wire.UsbipServerSide(), [REQ_IMPORT + SUBMIT_OUT + UNLINK])
    assert got == [
        wire.ReqImport("1-1"),
        wire.CmdSubmit(
            seqnum=5,
            devid=0x00010002,
            direction=wire.Direction.OUT,
            ep=1,
            transfer_flags=0,
            length=3,
            interval=0,
            setup=bytes(8),
            data=b"\x65\x00\x00",
        ),
        wire.CmdUnlink(seqnum=6, devid=0x00010002, unlink_seqnum=5),
    ]


@given(st.lists(st.integers(min_value=1, max_value=len(REQ_IMPORT + SUBMIT_OUT + UNLINK)), max_size=8))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    stream = REQ_IMPORT + SUBMIT_OUT + UNLINK
    points = sorted(set(cuts))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if stream[a:b]]
    assert events(wire.UsbipServerSide(), chunks) == events(wire.UsbipServerSide(), [stream])


def test_an_oversized_out_transfer_is_refused_from_its_header_before_buffering() -> None:
    side = wire.UsbipServerSide(max_out_length=1024)
    side.imported()
    header = bytearray(SUBMIT_OUT[:48])
    struct.pack_into(">I", header, 24, 1025)
    side.receive_data(bytes(header))
    with pytest.raises(RemoteProtocolError, match="OUT transfer of 1025 bytes exceeds 1024"):
        side.next_event()


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (bytes.fromhex("0111 8006 00000000"), "unknown operation 0x8006"),
        (bytes.fromhex("00000009") + bytes(44), "unknown command 0x00000009"),
        (SUBMIT_OUT[:32] + bytes.fromhex("00000004") + SUBMIT_OUT[36:48], "isochronous"),
    ],
)
def test_unknown_operations_commands_and_isochronous_transfers_are_protocol_errors(
    packet: bytes, words: str
) -> None:
    side = wire.UsbipServerSide()
    if not packet.startswith(b"\x01\x11"):
        side.imported()
    side.receive_data(packet)
    with pytest.raises(RemoteProtocolError, match=words):
        side.next_event()


def test_eof_between_packets_is_a_close_and_inside_one_an_error() -> None:
    side = wire.UsbipServerSide()
    side.receive_data(b"")
    assert side.next_event() == wire.Closed()
    side = wire.UsbipServerSide()
    side.receive_data(REQ_IMPORT[:10])
    side.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed inside a packet"):
        side.next_event()


def test_replies_have_the_documented_sizes_and_fields() -> None:
    ret = wire.ret_submit(7, -32, data=b"\x01\x02")
    assert len(ret) == 48 + 2
    assert struct.unpack(">IIIIIii", ret[:28]) == (3, 7, 0, 0, 0, -32, 2)
    assert wire.ret_submit(8, 0, actual_length=300)[24:28] == struct.pack(">i", 300)
    unlink = wire.ret_unlink(9, -104)
    assert len(unlink) == 48 and struct.unpack(">IIIIIi", unlink[:24]) == (4, 9, 0, 0, 0, -104)
    assert wire.rep_import(None) == bytes.fromhex("0111 0003 00000001")


def test_urb_statuses_are_linux_errno_values_on_every_platform() -> None:
    # linux/include/uapi/asm-generic/errno-base.h and errno.h: the importer decodes these.
    assert {s.name: int(s) for s in wire.UrbStatus} == {
        "OK": 0,
        "ENOENT": -2,
        "EPIPE": -32,
        "EOVERFLOW": -75,
        "ECONNRESET": -104,
    }
