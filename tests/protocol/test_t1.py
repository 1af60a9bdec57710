"""T=1 block engine: reference §1.11 vectors, reader and card rules, back-to-back exchanges."""

from __future__ import annotations

import subprocess
import sys

import pytest
from t1_link import Link, transform

from protocol._t1_blocks import _CRC_TABLE
from protocol.atr import Checksum
from protocol.errors import LocalProtocolError, T1Error
from protocol.t1 import ApduComplete, Idle, SendBlock, T1Card, T1Reader, crc16, lrc

SELECT_PIV = bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00")
SELECT_PIV_BLOCK = bytes.fromhex("00 00 0F 00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00 1D")


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def crc_bitwise(data: bytes) -> int:
    """Reference CRC written bit by bit (CRC-16/MCRF4XX: poly 0x1021 reflected, init FFFF)."""
    value = 0xFFFF
    for byte in data:
        value ^= byte
        for _ in range(8):
            value = (value >> 1) ^ 0x8408 if value & 1 else value >> 1
    return value


# -- checksums --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "edc"),
    [
        ("00 C1 01 FE", 0x3E),
        ("00 E1 01 FE", 0x1E),
        ("00 C1 01 FC", 0x3C),
        ("00 C3 01 02", 0xC0),
        ("00 92 00", 0x92),
        (SELECT_PIV_BLOCK[:-1].hex(), 0x1D),
    ],
)
def test_lrc_matches_reference_blocks(block, edc):
    assert lrc(h(block)) == edc


def test_crc16_catalogue_check_value():
    # CRC-16/MCRF4XX check value for "123456789" (reveng CRC catalogue).
    assert crc16(b"123456789") == 0x6F91


def test_crc16_table_matches_libccid_table_ends():
    # libccid's openct checksum.c table: 0x0000, 0x1189, ... 0x1ef1, 0x0f78 (the PPP FCS-16 table).
    assert (_CRC_TABLE[0], _CRC_TABLE[1], _CRC_TABLE[254], _CRC_TABLE[255]) == (0, 0x1189, 0x1EF1, 0x0F78)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x01", SELECT_PIV_BLOCK, bytes(range(256))])
def test_crc16_agrees_with_bitwise_reference(data):
    assert crc16(data) == crc_bitwise(data)


def test_crc_blocks_carry_crc_high_byte_first():
    reader = T1Reader(checksum=Checksum.CRC)
    block = reader.begin_ifs(254)
    assert block[:4] == h("00 C1 01 FE")
    assert block[4:] == crc_bitwise(h("00 C1 01 FE")).to_bytes(2, "big")


# -- reference vectors ------------------------------------------------------------------


def test_reader_ifs_request_and_card_answer_vectors():
    reader, card = T1Reader(), T1Card()
    assert reader.begin_ifs(254) == h("00 C1 01 FE 3E")
    assert card.receive(h("00 C1 01 FE 3E")) == SendBlock(h("00 E1 01 FE 1E"))
    assert card.ifsd == 254
    assert reader.receive(h("00 E1 01 FE 1E")) == ApduComplete(b"")
    assert reader.ifsd == 254
    assert T1Reader().begin_ifs(252) == h("00 C1 01 FC 3C")
    assert T1Card().receive(h("00 C1 01 FC 3C")) == SendBlock(h("00 E1 01 FC 1C"))


def test_ifs_negotiation_retries_until_exact_echo_then_fails_without_dying():
    reader = T1Reader()
    reader.begin_ifs(254)
    # A reply with the wrong value does not count: the request is sent again.
    assert reader.receive(h("00 E1 01 20 C0")) == SendBlock(h("00 C1 01 FE 3E"))
    assert reader.receive_error() == SendBlock(h("00 C1 01 FE 3E"))
    assert reader.receive(h("00 80 00 80")) == SendBlock(h("00 C1 01 FE 3E"))
    with pytest.raises(T1Error, match="ifsd 254"):
        reader.receive(h("00 80 00 80"))
    assert reader.ifsd == 32
    assert reader.begin_apdu(SELECT_PIV) == SELECT_PIV_BLOCK  # still usable


def test_select_piv_first_i_block_vector():
    assert T1Reader().begin_apdu(SELECT_PIV) == SELECT_PIV_BLOCK


def test_card_answers_select_piv_block_with_single_i_block():
    card = T1Card()
    assert card.receive(SELECT_PIV_BLOCK) == ApduComplete(SELECT_PIV)
    assert card.respond(h("90 00")) == h("00 00 02 90 00 92")


def test_card_wtx_request_vector_and_reader_answer():
    card, reader = T1Card(), T1Reader()
    reader.begin_apdu(SELECT_PIV)
    card.receive(SELECT_PIV_BLOCK)
    assert card.request_wtx(2) == h("00 C3 01 02 C0")
    assert reader.receive(h("00 C3 01 02 C0")) == SendBlock(h("00 E3 01 02 E0"), wtx=2)
    assert card.receive(h("00 E3 01 02 E0")) == Idle()


def test_resynch_and_abort_vectors_on_the_card():
    assert T1Card().receive(h("00 C0 00 C0")) == SendBlock(h("00 E0 00 E0"))
    assert T1Card().receive(h("00 C2 00 C2")) == SendBlock(h("00 E2 00 E2"))


def test_reader_echoes_card_abort():
    reader = T1Reader()
    reader.begin_apdu(SELECT_PIV)
    assert reader.receive(h("00 C2 00 C2")) == SendBlock(h("00 E2 00 E2"))


def test_r_block_vectors():
    card = T1Card()
    # Card acks a chained block with R(N(R)=1), then with R(N(R)=0).
    assert card.receive(h("00 20 01 AA 8B")) == SendBlock(h("00 90 00 90"))
    assert card.receive(h("00 60 01 BB DA")) == SendBlock(h("00 80 00 80"))
    # Reader: a corrupted reply to its I(0) earns R(0, EDC error)...
    reader = T1Reader()
    reader.begin_apdu(SELECT_PIV)
    assert reader.receive(h("00 00 02 90 00 93")) == SendBlock(h("00 81 00 81"))
    # ... and a second failure repeats that R-block (rule 7.2).
    assert reader.receive_error() == SendBlock(h("00 81 00 81"))


def test_reader_other_error_r_block_after_s_exchange():
    reader = T1Reader()
    reader.begin_apdu(SELECT_PIV)
    assert reader.receive(h("00 20 01 61 40")) == SendBlock(h("00 90 00 90"))  # chunk 1 of reply
    assert reader.receive(h("00 C3 01 02 C0")).wtx == 2
    assert reader.receive(h("12 40 01 62 31")) == SendBlock(h("00 92 00 92"))  # wrong NAD


# -- reader rules -----------------------------------------------------------------------


def test_reader_chains_command_by_ifsc_and_advances_on_ack():
    reader = T1Reader(ifsc=4)
    apdu = bytes(range(10))
    assert reader.begin_apdu(apdu) == h("00 20 04 00 01 02 03 24")
    assert reader.receive(h("00 90 00 90")) == SendBlock(h("00 60 04 04 05 06 07 64"))
    # R(N(R) == N(S)) asks for the same block again.
    assert reader.receive(h("00 90 00 90")) == SendBlock(h("00 60 04 04 05 06 07 64"))
    assert reader.receive(h("00 80 00 80")) == SendBlock(h("00 00 02 08 09 03"))


def test_reader_does_not_take_r_block_as_ack_of_last_block():
    reader = T1Reader()
    reader.begin_apdu(SELECT_PIV)
    # The card "acknowledges" the final block and asks for more: an error, not progress.
    assert reader.receive(h("00 90 00 90")) == SendBlock(h("00 82 00 82"))


def test_card_ifs_request_changes_reader_ifsc_for_next_block():
    reader = T1Reader(ifsc=32)
    first = reader.begin_apdu(bytes(100))
    assert first[2] == 32
    assert reader.receive(h("00 C1 01 10 D0")) == SendBlock(h("00 E1 01 10 F0"))
    assert reader.ifsc == 16
    nxt = reader.receive(h("00 90 00 90"))
    assert isinstance(nxt, SendBlock)
    assert nxt.block[2] == 16


def test_reader_rejects_oversized_card_block_before_buffering():
    reader = T1Reader(ifsd=4)
    reader.begin_apdu(SELECT_PIV)
    block = h("00 00 05 01 02 03 04 05")
    block += bytes([lrc(block)])
    assert reader.receive(block) == SendBlock(h("00 82 00 82"))


@pytest.mark.parametrize(
    "raw",
    [
        h("00 00 FF 00"),  # LEN 0xFF
        h("00 00 02 90 00"),  # EDC missing
        h("00 00"),  # short
        h("00 00 01 90 00 91"),  # LEN says 1, 2 data bytes
    ],
)
def test_reader_asks_again_on_malformed_framing(raw):
    reader = T1Reader()
    reader.begin_apdu(SELECT_PIV)
    result = reader.receive(raw)
    assert isinstance(result, SendBlock)
    assert result.block in (h("00 81 00 81"), h("00 82 00 82"))


def test_reader_three_retries_then_three_resynchs_then_dead_until_reset():
    reader = T1Reader()
    reader.begin_apdu(SELECT_PIV)
    sent = [reader.receive_error().block for _ in range(6)]
    assert sent == [h("00 81 00 81")] * 3 + [h("00 C0 00 C0")] * 3
    with pytest.raises(T1Error, match="dead"):
        reader.receive_error()
    with pytest.raises(T1Error, match="power-cycle"):
        reader.begin_apdu(SELECT_PIV)
    reader.reset()
    assert reader.begin_apdu(SELECT_PIV) == SELECT_PIV_BLOCK


def test_reader_restarts_whole_command_after_resynch():
    reader = T1Reader(ifsc=8)
    apdu = bytes(range(20))
    first = reader.begin_apdu(apdu)
    reader.receive(h("00 90 00 90"))  # chunk 1 acknowledged; N(S) now 1
    assert reader.receive(h("00 C0 00 C0")) == SendBlock(h("00 C0 00 C0"))  # card may not resynch
    assert reader.receive(h("00 E0 00 E0")) == SendBlock(first)


def test_reader_refuses_response_over_max_response():
    reader = T1Reader(max_response=3)
    reader.begin_apdu(SELECT_PIV)
    block = h("00 00 04 01 02 90 00")
    block += bytes([lrc(block)])
    with pytest.raises(T1Error, match="exceeds 3 bytes"):
        reader.receive(block)


def test_reader_local_misuse_is_a_local_protocol_error():
    reader = T1Reader()
    with pytest.raises(LocalProtocolError, match="no t=1 exchange"):
        reader.receive(h("00 00 02 90 00 92"))
    with pytest.raises(LocalProtocolError, match="empty"):
        reader.begin_apdu(b"")
    reader.begin_apdu(SELECT_PIV)
    with pytest.raises(LocalProtocolError, match="in progress"):
        reader.begin_apdu(SELECT_PIV)
    with pytest.raises(LocalProtocolError, match="70000 bytes"):
        T1Reader().begin_apdu(bytes(70000))


def test_reader_checks_swapped_nad():
    reader = T1Reader(nad=0x12)
    assert reader.begin_apdu(b"\x01")[0] == 0x12
    unswapped = h("12 00 02 90 00")
    unswapped += bytes([lrc(unswapped)])
    assert reader.receive(unswapped) == SendBlock(h("12 82 00 90"))
    swapped = h("21 00 02 90 00")
    swapped += bytes([lrc(swapped)])
    assert reader.receive(swapped) == ApduComplete(h("90 00"))


# -- card rules -------------------------------------------------------------------------


def test_card_repeats_last_answer_on_duplicate_i_block():
    card = T1Card()
    chunk = h("00 20 01 AA 8B")
    assert card.receive(chunk) == SendBlock(h("00 90 00 90"))
    assert card.receive(chunk) == SendBlock(h("00 90 00 90"))
    assert card.receive(h("00 40 01 BB FA")) == ApduComplete(h("AA BB"))


def test_card_chains_response_by_ifsd_and_retransmits_on_request():
    card = T1Card()
    card.receive(h("00 C1 01 02 C2"))  # IFSD 2
    card.receive(SELECT_PIV_BLOCK)
    first = card.respond(h("01 02 03 04 05"))
    assert first == h("00 20 02 01 02 21")
    assert card.receive(h("00 80 00 80")) == SendBlock(first)  # R(N(R)=N(S)): again
    assert card.receive(h("00 90 00 90")) == SendBlock(h("00 60 02 03 04 65"))
    assert card.receive(h("00 80 00 80")) == SendBlock(h("00 00 01 05 04"))
    # The last block may be asked for again until the host sends a new command.
    assert card.receive(h("00 80 00 80")) == SendBlock(h("00 00 01 05 04"))


def test_card_bad_block_earns_r_block_with_error_bits():
    card = T1Card()
    assert card.receive(h("00 00 01 AA 00")) == SendBlock(h("00 81 00 81"))  # bad LRC
    assert card.receive(h("05 00 01 AA AE")) == SendBlock(h("00 82 00 82"))  # wrong NAD


def test_card_resynch_resets_sequence_numbers_and_drops_partial_command():
    card = T1Card()
    card.receive(h("00 20 01 AA 8B"))
    assert card.receive(h("00 C0 00 C0")) == SendBlock(h("00 E0 00 E0"))
    assert card.receive(h("00 00 01 CC CD")) == ApduComplete(h("CC"))


def test_card_refuses_command_over_max_command_until_resynch():
    card = T1Card(max_command=2)
    assert card.receive(h("00 20 02 01 02 21")) == SendBlock(h("00 90 00 90"))
    assert card.receive(h("00 40 01 03 42")) == SendBlock(h("00 92 00 92"))
    assert card.receive(h("00 40 01 03 42")) == SendBlock(h("00 92 00 92"))
    card.receive(h("00 C0 00 C0"))
    assert card.receive(h("00 00 01 03 02")) == ApduComplete(h("03"))


def test_card_local_misuse_is_a_local_protocol_error():
    card = T1Card()
    with pytest.raises(LocalProtocolError, match="no command"):
        card.respond(h("90 00"))
    card.receive(SELECT_PIV_BLOCK)
    with pytest.raises(LocalProtocolError, match="respond"):
        card.receive(SELECT_PIV_BLOCK)
    with pytest.raises(LocalProtocolError, match="got 0"):
        card.request_wtx(0)


# -- back to back -----------------------------------------------------------------------


def _pair(ifs: int, checksum: Checksum = Checksum.LRC, **kw: object) -> Link:
    link = Link(T1Reader(ifsc=ifs, checksum=checksum), T1Card(ifsc=ifs, checksum=checksum), **kw)  # type: ignore[arg-type]
    link.negotiate_ifsd(ifs)
    return link


@pytest.mark.parametrize("ifs", range(1, 255))
def test_back_to_back_chaining_both_ways_for_every_ifs(ifs):
    link = _pair(ifs)
    for size in (1, ifs, ifs + 1, 2 * ifs + 1):
        apdu = bytes((i * 7 + size) & 0xFF for i in range(size))
        assert link.exchange(apdu) == transform(apdu)
    assert max(b[2] for b in link.sent) <= ifs
    assert max(b[2] for b in link.received) <= ifs


@pytest.mark.parametrize("checksum", list(Checksum))
@pytest.mark.parametrize(
    ("ifs", "size", "grow"), [(254, 5000, 3), (32, 4096, 1), (1, 300, 2), (200, 65544, 1)]
)
def test_back_to_back_multi_kilobyte_apdus(ifs, size, grow, checksum):
    link = _pair(ifs, checksum, app=lambda apdu: transform(apdu, grow))
    apdu = bytes(i & 0xFF for i in range(size))
    assert link.exchange(apdu) == transform(apdu, grow)
    assert link.card_saw == [apdu]


def test_back_to_back_wtx_is_answered_and_reported():
    link = _pair(16, wtx_per_command=2)
    apdu = bytes(range(40))
    assert link.exchange(apdu) == transform(apdu)
    assert link.wtx_seen == [2, 2]
    assert link.exchange(b"\x01") == transform(b"\x01")
    assert link.wtx_seen == [2, 2, 2, 2]


def test_back_to_back_command_over_card_limit_ends_in_t1_error():
    link = Link(T1Reader(ifsc=8), T1Card(ifsc=8, max_command=20))
    with pytest.raises(T1Error):
        link.exchange(bytes(40))
    assert link.card_saw == []
    link.power_cycle()
    assert link.exchange(bytes(10)) == transform(bytes(10))


def test_back_to_back_with_nad():
    link = Link(T1Reader(nad=0x12), T1Card(nad=0x12))
    assert link.exchange(SELECT_PIV) == transform(SELECT_PIV)
    assert {b[0] for b in link.sent} == {0x12}
    assert {b[0] for b in link.received} == {0x21}


def test_t1_and_atr_modules_stay_pure():
    code = (
        "import sys, protocol.t1, protocol.atr\n"
        "bad = {'trio', 'usb', 'socket', 'ssl', 'threading', 'logging', 'structlog', 'random'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
