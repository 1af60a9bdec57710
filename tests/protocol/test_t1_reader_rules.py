"""T=1 reader: retry budgets, sequence numbers, IFS and NAD bounds, block decoding at the edges.

Each test states one ISO 7816-3 §11 rule the reader relies on to never loop forever, never take
a stray block for a reply and never splice a command; mutation testing (docs/testing.md) found
them unguarded.
"""

from __future__ import annotations

import pytest

from protocol._t1_blocks import Kind, RError, SType, decode, encode, i_block, r_block, s_block
from protocol.atr import Checksum
from protocol.errors import LocalProtocolError, T1Error
from protocol.t1 import MAX_COMMAND_APDU, MAX_INF, MAX_RESPONSE_APDU, ApduComplete, SendBlock, T1Reader

LRC = Checksum.LRC
RESYNCH_REQUEST = s_block(0, SType.RESYNCH, False, b"", LRC)
RESYNCH_RESPONSE = s_block(0, SType.RESYNCH, True, b"", LRC)
ABORT_REQUEST = s_block(0, SType.ABORT, False, b"", LRC)
ABORT_RESPONSE = s_block(0, SType.ABORT, True, b"", LRC)


def card_i(ns: int, inf: bytes, more: bool = False) -> bytes:
    return i_block(0, ns, more, inf, LRC)


def card_r(nr: int) -> bytes:
    return r_block(0, nr, RError.NONE, LRC)


def sent(result: SendBlock | ApduComplete) -> bytes:
    assert isinstance(result, SendBlock), result
    return result.block


def pcb(result: SendBlock | ApduComplete) -> int:
    return sent(result)[1]


# -- budgets: a misbehaving card ends in a resynch, never in an endless loop --------------


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_a_card_that_keeps_aborting_is_echoed_max_retries_times_then_resynched(retries: int) -> None:
    reader = T1Reader(max_retries=retries)
    reader.begin_apdu(b"\x00\xa4\x04\x00")
    answers = [sent(reader.receive(ABORT_REQUEST)) for _ in range(retries + 1)]
    assert answers == [ABORT_RESPONSE] * retries + [RESYNCH_REQUEST]


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_a_card_that_keeps_asking_for_the_same_block_gets_it_max_retries_times_then_a_resynch(
    retries: int,
) -> None:
    reader = T1Reader(max_retries=retries)
    first = reader.begin_apdu(b"\x00\xa4\x04\x00")
    answers = [sent(reader.receive(card_r(0))) for _ in range(retries + 1)]  # rule 7.1: N(R) == N(S)
    assert answers == [first] * retries + [RESYNCH_REQUEST]


def test_an_acknowledged_chained_block_restores_the_retry_budget() -> None:
    reader = T1Reader(ifsc=4, max_retries=1)
    first = reader.begin_apdu(bytes(12))
    assert sent(reader.receive(card_r(0))) == first  # one retry spent
    second = sent(reader.receive(card_r(1)))  # progress
    assert sent(reader.receive(card_r(1))) == second  # a full budget again
    assert sent(reader.receive(card_r(1))) == RESYNCH_REQUEST


def test_a_received_chained_block_restores_the_retry_budget() -> None:
    reader = T1Reader(max_retries=1)
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    reader.receive_error()  # one retry spent
    ack = sent(reader.receive(card_i(0, b"\x01", more=True)))
    assert sent(reader.receive_error()) == ack  # the budget is back: rule 7.2, not a resynch
    assert sent(reader.receive_error()) == RESYNCH_REQUEST


def test_wtx_zero_from_the_card_is_an_error_not_a_wait() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    wtx_zero = s_block(0, SType.WTX, False, b"\x00", LRC)
    assert sent(reader.receive(wtx_zero)) == r_block(0, 0, RError.OTHER, LRC)


def test_an_unasked_s_response_from_the_card_is_an_error() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert sent(reader.receive(ABORT_RESPONSE)) == r_block(0, 0, RError.OTHER, LRC)


# -- rule 7.2: after a bad block, repeat our R-block, or send one with the error bits ------


def test_a_bad_block_after_our_i_block_earns_an_r_block_with_the_error_bits() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert sent(reader.receive_error()) == r_block(0, 0, RError.EDC, LRC)


def test_a_bad_block_after_our_acknowledgement_repeats_that_acknowledgement() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    ack = sent(reader.receive(card_i(0, b"\x01\x02", more=True)))
    assert ack == r_block(0, 1, RError.NONE, LRC)
    assert sent(reader.receive_error()) == ack  # not R(N(R)=1, EDC): the card must resend I(1)
    assert reader.receive(card_i(1, b"\x90\x00")) == ApduComplete(b"\x01\x02\x90\x00")


# -- resynch: only S(RESYNCH response) ends it --------------------------------------------


def _resynching_reader() -> tuple[T1Reader, bytes]:
    reader = T1Reader(max_retries=0)
    first = reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert sent(reader.receive_error()) == RESYNCH_REQUEST
    return reader, first


@pytest.mark.parametrize(
    "stray",
    [card_i(0, b"\x90\x00"), card_i(0, b""), card_r(0), RESYNCH_REQUEST, ABORT_RESPONSE],
    ids=["I(0)", "empty-I(0)", "R(0)", "S(RESYNCH-request)", "S(ABORT-response)"],
)
def test_during_a_resynch_only_the_resynch_response_counts(stray: bytes) -> None:
    reader, first = _resynching_reader()
    assert sent(reader.receive(stray)) == RESYNCH_REQUEST
    assert sent(reader.receive(RESYNCH_RESPONSE)) == first


def test_a_bad_block_during_a_resynch_asks_for_another_resynch() -> None:
    reader, _ = _resynching_reader()
    assert sent(reader.receive_error()) == RESYNCH_REQUEST


# -- sequence numbers --------------------------------------------------------------------


def test_send_and_receive_sequence_numbers_alternate_across_exchanges() -> None:
    reader = T1Reader()
    for n in range(4):
        block = reader.begin_apdu(bytes([0x00, 0xB0, 0x00, n]))
        assert block[1] == (0x40 if n % 2 else 0x00), f"exchange {n}: N(S) of our I-block"
        assert reader.receive(card_i(n % 2, bytes([n, 0x90, 0x00]))) == ApduComplete(bytes([n, 0x90, 0x00]))


def test_a_card_block_with_the_wrong_sequence_number_is_refused() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert sent(reader.receive(card_i(1, b"\x90\x00"))) == r_block(0, 0, RError.OTHER, LRC)
    assert reader.receive(card_i(0, b"\x90\x00")) == ApduComplete(b"\x90\x00")


def test_a_chained_response_is_acknowledged_with_alternating_n_r() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert sent(reader.receive(card_i(0, b"\x01", more=True))) == r_block(0, 1, RError.NONE, LRC)
    assert sent(reader.receive(card_i(1, b"\x02", more=True))) == r_block(0, 0, RError.NONE, LRC)
    assert reader.receive(card_i(0, b"\x90\x00")) == ApduComplete(b"\x01\x02\x90\x00")


def test_the_first_chained_command_block_is_acknowledged_before_the_second_goes() -> None:
    reader = T1Reader(ifsc=2)
    assert reader.begin_apdu(b"\x00\xb0\x00\x00")[1] == 0x20  # N(S) 0, more
    assert pcb(reader.receive(card_r(1))) == 0x40  # N(S) 1, last
    assert reader.receive(card_i(0, b"\x90\x00")) == ApduComplete(b"\x90\x00")
    assert reader.begin_apdu(b"\x00\xb0")[1] == 0x00  # the next exchange starts at N(S) 0


def test_an_i_block_while_our_chain_is_unacknowledged_is_refused() -> None:
    reader = T1Reader(ifsc=2)
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert sent(reader.receive(card_i(0, b"\x90\x00"))) == r_block(0, 0, RError.OTHER, LRC)


def test_an_r_block_while_the_card_sends_its_chain_repeats_our_acknowledgement() -> None:
    reader = T1Reader(max_retries=1)
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    ack = sent(reader.receive(card_i(0, b"\x01", more=True)))
    assert sent(reader.receive(card_r(0))) == ack  # the card missed it
    assert sent(reader.receive(card_r(0))) == RESYNCH_REQUEST  # and that spends the retry budget


# -- IFS and NAD bounds ------------------------------------------------------------------


@pytest.mark.parametrize("ifsc", [1, MAX_INF])
def test_the_card_may_set_ifsc_to_either_bound(ifsc: int) -> None:
    reader = T1Reader(ifsc=32)
    reader.begin_apdu(bytes(300))
    request = s_block(0, SType.IFS, False, bytes([ifsc]), LRC)
    assert sent(reader.receive(request)) == s_block(0, SType.IFS, True, bytes([ifsc]), LRC)
    assert reader.ifsc == ifsc
    assert sent(reader.receive(card_r(1)))[2] == ifsc  # the next block uses it


@pytest.mark.parametrize("ifsc", [0, 0xFF])
def test_an_ifs_request_out_of_range_makes_the_reader_resynch(ifsc: int) -> None:
    reader = T1Reader(ifsc=32)
    reader.begin_apdu(bytes(100))
    assert sent(reader.receive(s_block(0, SType.IFS, False, bytes([ifsc]), LRC))) == RESYNCH_REQUEST
    assert reader.ifsc == 32


@pytest.mark.parametrize("value", [1, MAX_INF])
def test_ifs_values_at_the_bounds_are_accepted(value: int) -> None:
    reader = T1Reader(ifsc=value, ifsd=value)
    assert (reader.ifsc, reader.ifsd) == (value, value)
    assert reader.begin_ifs(value)[3] == value


@pytest.mark.parametrize("value", [0, MAX_INF + 1])
def test_ifs_values_beyond_the_bounds_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="ifsc"):
        T1Reader(ifsc=value)
    with pytest.raises(ValueError, match="ifsd"):
        T1Reader(ifsd=value)
    with pytest.raises(LocalProtocolError, match="ifsd"):
        T1Reader().begin_ifs(value)


def test_the_reserved_nad_ff_is_refused_and_fe_is_accepted() -> None:
    with pytest.raises(ValueError, match="nad"):
        T1Reader(nad=0xFF)
    with pytest.raises(ValueError, match="nad"):
        T1Reader(nad=-1)
    assert T1Reader(nad=0xFE).begin_apdu(b"\x00")[0] == 0xFE


def test_an_ifs_negotiation_is_retried_max_retries_times() -> None:
    reader = T1Reader(max_retries=2)
    request = reader.begin_ifs(64)
    assert [sent(reader.receive_error()) for _ in range(2)] == [request] * 2
    with pytest.raises(T1Error, match="ifsd 64 after 2 retries"):
        reader.receive_error()
    assert reader.ifsd == 32


# -- the largest APDUs, exactly at the limit ---------------------------------------------


def test_the_largest_extended_command_is_sent_and_one_byte_more_is_refused() -> None:
    largest = 4 + 3 + 65535 + 2  # ISO 7816-4 §5.1: header, extended Lc, 65535 data bytes, extended Le
    assert largest == MAX_COMMAND_APDU
    assert T1Reader().begin_apdu(bytes(largest))
    with pytest.raises(LocalProtocolError, match="more than 65544"):
        T1Reader().begin_apdu(bytes(largest + 1))


def _receive_response(reader: T1Reader, size: int) -> SendBlock | ApduComplete:
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    ns, left, result = 0, size, None
    while left:
        chunk = min(left, MAX_INF)
        left -= chunk
        result = reader.receive(card_i(ns, bytes(chunk), more=bool(left)))
        ns ^= 1
    assert result is not None
    return result


def test_the_largest_extended_response_is_accepted_and_one_byte_more_is_refused() -> None:
    largest = 65536 + 2  # ISO 7816-4 §5.1: extended Le allows 65536 data bytes, then SW1 SW2
    assert largest == MAX_RESPONSE_APDU
    result = _receive_response(T1Reader(ifsd=MAX_INF), largest)
    assert isinstance(result, ApduComplete)
    assert len(result.apdu) == largest
    with pytest.raises(T1Error, match="exceeds 65538 bytes"):
        _receive_response(T1Reader(ifsd=MAX_INF), largest + 1)


# -- block decoding ----------------------------------------------------------------------


def _framed(nad: int, pcb_: int, inf: bytes) -> bytes:
    return encode(nad, pcb_, inf, LRC) if len(inf) <= MAX_INF else _raw(nad, pcb_, inf)


def _raw(nad: int, pcb_: int, inf: bytes) -> bytes:
    body = bytes([nad, pcb_, len(inf) & 0xFF]) + inf
    lrc = 0
    for byte in body:
        lrc ^= byte
    return body + bytes([lrc])


@pytest.mark.parametrize("pcb_", [0x00, 0x80, 0xC5], ids=["I", "R", "S-unknown-type"])
def test_len_ff_is_a_reserved_length_not_a_transmission_error(pcb_: int) -> None:
    assert decode(_raw(0, pcb_, bytes(255)), LRC, 0, MAX_INF) == RError.OTHER


@pytest.mark.parametrize(
    "raw",
    [_raw(0, 0x80, b"\x01"), _raw(0, 0xA0, b""), _raw(0, 0xB0, b"")],
    ids=["R-with-INF", "R-with-b6", "R-N(R)1-with-b6"],
)
def test_an_r_block_with_data_or_b6_set_is_malformed(raw: bytes) -> None:
    assert decode(raw, LRC, 0, MAX_INF) == RError.OTHER


@pytest.mark.parametrize("pcb_", [0x00, 0x01, 0x1F])
def test_reserved_low_pcb_bits_keep_an_i_block_an_i_block(pcb_: int) -> None:
    block = decode(_raw(0, pcb_, b"\x90\x00"), LRC, 0, MAX_INF)
    assert not isinstance(block, RError)
    assert (block.kind, block.seq, block.more, block.inf) == (Kind.I, 0, False, b"\x90\x00")


def test_block_fields_decode_per_kind() -> None:
    i1 = decode(_raw(0, 0x60, b"\x01"), LRC, 0, MAX_INF)
    r1 = decode(_raw(0, 0x90, b""), LRC, 0, MAX_INF)
    s = decode(_raw(0, 0xE3, b"\x05"), LRC, 0, MAX_INF)
    assert not isinstance(i1, RError) and not isinstance(r1, RError) and not isinstance(s, RError)
    assert (i1.kind, i1.seq, i1.more, i1.is_response) == (Kind.I, 1, True, False)
    assert (r1.kind, r1.seq, r1.more, r1.is_response) == (Kind.R, 1, False, False)
    assert (s.kind, s.stype, s.is_response, s.more) == (Kind.S, SType.WTX, True, False)


@pytest.mark.parametrize(
    ("stype", "inf"),
    [(SType.RESYNCH, b"\x00"), (SType.ABORT, b"\x00"), (SType.IFS, b""), (SType.WTX, b"\x01\x02")],
)
def test_an_s_block_with_the_wrong_inf_length_is_malformed(stype: SType, inf: bytes) -> None:
    assert decode(_raw(0, 0xC0 | stype, inf), LRC, 0, MAX_INF) == RError.OTHER


def test_an_i_block_is_accepted_up_to_ifsd_exactly() -> None:
    assert not isinstance(decode(_raw(0, 0, bytes(8)), LRC, 0, 8), RError)
    assert decode(_raw(0, 0, bytes(9)), LRC, 0, 8) == RError.OTHER


@pytest.mark.parametrize("checksum", [Checksum.LRC, Checksum.CRC])
def test_a_block_one_byte_short_of_its_edc_is_a_transmission_error(checksum: Checksum) -> None:
    whole = encode(0, 0x00, b"\x90\x00", checksum)
    assert not isinstance(decode(whole, checksum, 0, MAX_INF), RError)
    assert decode(whole[:-1], checksum, 0, MAX_INF) == RError.EDC
    assert decode(whole[:3], checksum, 0, MAX_INF) == RError.EDC
    assert decode(encode(0, 0x00, b"", checksum), checksum, 0, MAX_INF) != RError.EDC


def test_an_inf_longer_than_254_bytes_cannot_be_encoded() -> None:
    assert len(encode(0, 0, bytes(MAX_INF), LRC)) == MAX_INF + 4
    with pytest.raises(ValueError, match=r"^t=1 inf is 255 bytes, more than 254$"):
        encode(0, 0, bytes(MAX_INF + 1), LRC)


@pytest.mark.parametrize("pcb_", [0x80, 0x81, 0x82, 0x90, 0x91, 0x92])
def test_r_blocks_with_either_n_r_and_any_error_bits_decode_as_r_blocks(pcb_: int) -> None:
    block = decode(_raw(0, pcb_, b""), LRC, 0, MAX_INF)
    assert not isinstance(block, RError)
    assert (block.kind, block.seq) == (Kind.R, pcb_ >> 4 & 1)


def test_an_s_block_of_an_unknown_type_decodes_for_the_engine_to_judge() -> None:
    block = decode(_raw(0, 0xC5, b"\x01\x02"), LRC, 0, MAX_INF)
    assert not isinstance(block, RError)
    assert (block.kind, block.stype, block.inf) == (Kind.S, 5, b"\x01\x02")


def test_an_ordinary_block_asks_the_host_for_no_waiting_time_extension() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    answer = reader.receive(card_i(0, b"\x01", more=True))
    assert isinstance(answer, SendBlock)
    assert answer.wtx == 0  # the CCID driver sends it as bBWI


def test_a_second_bad_block_repeats_our_r_block_even_if_its_error_differs() -> None:
    reader = T1Reader()
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    first = sent(reader.receive_error())  # EDC error
    assert first == r_block(0, 0, RError.EDC, LRC)
    wrong_nad = i_block(0x21, 0, False, b"\x90\x00", LRC)
    assert sent(reader.receive(wrong_nad)) == first  # rule 7.2: the same R-block, not R(OTHER)


def test_after_a_resynch_the_card_starts_again_at_n_s_zero() -> None:
    reader, first = _resynching_reader()
    assert sent(reader.receive(RESYNCH_RESPONSE)) == first
    assert reader.receive(card_i(0, b"\x90\x00")) == ApduComplete(b"\x90\x00")


def test_after_a_resynch_mid_response_the_card_starts_again_at_n_s_zero() -> None:
    reader = T1Reader(max_retries=0)
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    reader.receive(card_i(0, b"\x01", more=True))  # our N(R) is now 1
    assert sent(reader.receive_error()) == RESYNCH_REQUEST
    reader.receive(RESYNCH_RESPONSE)
    assert reader.receive(card_i(0, b"\x90\x00")) == ApduComplete(b"\x90\x00")  # no stale \x01


def test_an_r_block_for_our_last_block_while_the_card_chains_never_resends_the_command() -> None:
    reader = T1Reader()
    command = reader.begin_apdu(b"\x00\xb0\x00\x00")
    ack = sent(reader.receive(card_i(0, b"\x01", more=True)))
    again = sent(reader.receive(card_r(1)))
    assert again == ack
    assert again != command


def test_without_negotiation_commands_are_cut_at_the_iso_default_ifsc_of_32() -> None:
    reader = T1Reader()  # ISO 7816-3 §11.4.2: IFSC is 32 until the ATR or an S(IFS) says otherwise
    block = reader.begin_apdu(bytes(33))
    assert (block[1], block[2]) == (0x20, 32)  # chained, 32 bytes
    assert reader.ifsd == 32


# -- what the errors say ----------------------------------------------------------------


def test_a_second_exchange_while_one_runs_names_the_state_it_is_in() -> None:
    sending = T1Reader()
    sending.begin_apdu(b"\x00")
    with pytest.raises(LocalProtocolError, match=r"^t=1 exchange already in progress \(state sending\)$"):
        sending.begin_apdu(b"\x00")
    receiving = T1Reader()
    receiving.begin_apdu(b"\x00")
    receiving.receive(card_i(0, b"\x01", more=True))
    with pytest.raises(LocalProtocolError, match=r"\(state receiving\)$"):
        receiving.begin_ifs(64)
    resynching, _ = _resynching_reader()
    with pytest.raises(LocalProtocolError, match=r"\(state resynch\)$"):
        resynching.begin_apdu(b"\x00")
    negotiating = T1Reader()
    negotiating.begin_ifs(64)
    with pytest.raises(LocalProtocolError, match=r"\(state ifs\)$"):
        negotiating.begin_apdu(b"\x00")


def test_the_reader_says_what_is_wrong_with_its_settings() -> None:
    with pytest.raises(ValueError, match=r"^ifsc must be 1\.\.254, got 0$"):
        T1Reader(ifsc=0)
    with pytest.raises(ValueError, match=r"^ifsd must be 1\.\.254, got 255$"):
        T1Reader(ifsd=255)
    with pytest.raises(ValueError, match=r"^nad must be 0x00\.\.0xFE, got 255$"):
        T1Reader(nad=0xFF)
    with pytest.raises(LocalProtocolError, match=r"^ifsd must be 1\.\.254, got 0$"):
        T1Reader().begin_ifs(0)


def test_misuse_of_the_reader_says_what_was_wrong() -> None:
    with pytest.raises(LocalProtocolError, match=r"^cannot send an empty apdu over t=1$"):
        T1Reader().begin_apdu(b"")
    with pytest.raises(LocalProtocolError, match=r"^apdu is 65545 bytes, more than 65544$"):
        T1Reader().begin_apdu(bytes(65545))
    with pytest.raises(LocalProtocolError, match=r"^no t=1 exchange in progress$"):
        T1Reader().receive_error()


def test_a_dead_link_says_why_and_that_the_card_needs_a_power_cycle() -> None:
    reader = T1Reader(max_retries=0, max_resynchs=1)
    reader.begin_apdu(b"\x00")
    reader.receive_error()  # resynch 1
    with pytest.raises(
        T1Error, match=r"^t=1 link is dead: no answer after 1 resynchs; power-cycle the card$"
    ):
        reader.receive_error()
    dead = "^t=1 link is dead after failed resynchs; power-cycle the card$"
    with pytest.raises(T1Error, match=dead):
        reader.receive_error()
    with pytest.raises(T1Error, match=dead):
        reader.begin_apdu(b"\x00")
    too_long = T1Reader(max_response=1)
    too_long.begin_apdu(b"\x00")
    with pytest.raises(T1Error, match=r"^t=1 link is dead: response exceeds 1 bytes; power-cycle the card$"):
        too_long.receive(card_i(0, b"\x90\x00"))


def test_a_refused_ifs_negotiation_says_which_value_and_how_often() -> None:
    reader = T1Reader(max_retries=0)
    reader.begin_ifs(64)
    with pytest.raises(T1Error, match=r"^card did not accept ifsd 64 after 0 retries$"):
        reader.receive_error()


def test_in_the_second_exchange_a_request_for_our_block_one_is_not_taken_as_an_acknowledgement() -> None:
    reader = T1Reader(ifsc=2)
    reader.begin_apdu(b"\x00\xb0")
    reader.receive(card_i(0, b"\x90\x00"))  # exchange 1 done: our N(S) is now 1
    first = reader.begin_apdu(b"\x00\xb0\x00\x00")
    assert first[1] == 0x60  # I(1), more
    assert sent(reader.receive(card_r(1))) == first  # R(N(R)=1): "send I(1) again"
    assert pcb(reader.receive(card_r(0))) == 0x00  # R(N(R)=0) acknowledges it: I(0), last
