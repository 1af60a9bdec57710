from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.vpcd import (
    Apdu,
    Closed,
    Control,
    Response,
    VpcdCardSide,
    VpcdControl,
    VpcdReaderSide,
    frame,
)

SAFENET_ATR = bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4")
SELECT_PIV = bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00")


def drain(side: VpcdCardSide) -> list[object]:
    events: list[object] = []
    while (event := side.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, Closed):
            break
    return events


def test_get_atr_request_and_reply_match_reference_bytes() -> None:
    # protocol-reference §2.2: vpcd asks `00 01 04`, card answers `00 0E <ATR>`.
    card = VpcdCardSide()
    card.receive_data(bytes.fromhex("00 01 04"))
    assert card.next_event() == Control(VpcdControl.GET_ATR)
    assert card.next_event() is NEED_DATA
    assert card.send_atr(SAFENET_ATR) == bytes.fromhex("00 0E") + SAFENET_ATR


def test_apdu_frame_from_reference() -> None:
    card = VpcdCardSide()
    card.receive_data(bytes.fromhex("00 0F") + SELECT_PIV)
    assert card.next_event() == Apdu(SELECT_PIV)
    assert card.send_response(bytes.fromhex("6A 82")) == bytes.fromhex("00 02 6A 82")


def test_power_events_decode() -> None:
    card = VpcdCardSide()
    card.receive_data(bytes.fromhex("00 01 00 00 01 01 00 01 02"))
    assert drain(card) == [
        Control(VpcdControl.POWER_OFF),
        Control(VpcdControl.POWER_ON),
        Control(VpcdControl.RESET),
    ]


def test_eof_yields_closed() -> None:
    card = VpcdCardSide()
    card.receive_data(b"")
    assert card.next_event() == Closed()


def test_eof_mid_frame_is_a_remote_error() -> None:
    card = VpcdCardSide()
    card.receive_data(bytes.fromhex("00 05 00 A4"))
    assert card.next_event() is NEED_DATA
    card.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="4 bytes pending"):
        card.next_event()


def test_unknown_control_code_is_rejected() -> None:
    card = VpcdCardSide()
    card.receive_data(bytes.fromhex("00 01 07"))
    with pytest.raises(RemoteProtocolError, match="0x07"):
        card.next_event()


def test_empty_message_from_vpcd_is_rejected() -> None:
    card = VpcdCardSide()
    card.receive_data(bytes.fromhex("00 00"))
    with pytest.raises(RemoteProtocolError):
        card.next_event()


def test_card_never_sends_empty_or_oversized_atr() -> None:
    card = VpcdCardSide()
    with pytest.raises(LocalProtocolError):
        card.send_atr(b"")
    with pytest.raises(LocalProtocolError, match="34"):
        card.send_atr(bytes(34))


def test_frame_rejects_payload_over_length_field() -> None:
    assert frame(bytes(0xFFFF))[:2] == b"\xff\xff"
    with pytest.raises(LocalProtocolError, match="65536"):
        frame(bytes(0x10000))


STREAM_EVENTS: list[object] = [
    Control(VpcdControl.POWER_ON),
    Control(VpcdControl.GET_ATR),
    Apdu(SELECT_PIV),
    Apdu(bytes(300)),
    Control(VpcdControl.POWER_OFF),
]


def _stream() -> bytes:
    out = b""
    for ev in STREAM_EVENTS:
        out += frame(bytes((ev.code,))) if isinstance(ev, Control) else frame(ev.data)  # type: ignore[attr-defined]
    return out


def test_decoder_handles_every_byte_boundary_split() -> None:
    stream = _stream()
    for cut in range(len(stream) + 1):
        card = VpcdCardSide()
        events: list[object] = []
        for part in (stream[:cut], stream[cut:]):
            if part:  # b"" means EOF, fed once below
                card.receive_data(part)
                events += drain(card)
        card.receive_data(b"")
        events += drain(card)
        assert events == [*STREAM_EVENTS, Closed()], cut


def test_decoder_handles_one_byte_at_a_time() -> None:
    card = VpcdCardSide()
    events: list[object] = []
    for byte in _stream():
        card.receive_data(bytes((byte,)))
        events += drain(card)
    assert events == STREAM_EVENTS


def test_reader_side_round_trip_with_card_side() -> None:
    reader, card = VpcdReaderSide(), VpcdCardSide()
    card.receive_data(reader.send_control(VpcdControl.GET_ATR) + reader.send_apdu(SELECT_PIV))
    assert drain(card) == [Control(VpcdControl.GET_ATR), Apdu(SELECT_PIV)]
    reader.receive_data(card.send_atr(SAFENET_ATR) + card.send_response(b"\x90\x00"))
    assert reader.next_event() == Response(SAFENET_ATR)
    assert reader.next_event() == Response(b"\x90\x00")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    assert reader.next_event() == Closed()


def test_reader_side_refuses_apdu_that_would_look_like_control() -> None:
    with pytest.raises(LocalProtocolError):
        VpcdReaderSide().send_apdu(b"\x01")


@settings(max_examples=100)
@given(st.lists(st.binary(min_size=2, max_size=400), max_size=8), st.data())
def test_any_chunking_of_responses_round_trips(payloads: list[bytes], data: st.DataObject) -> None:
    card = VpcdCardSide()
    stream = b"".join(card.send_response(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = VpcdReaderSide()
    got: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if start == end:
            continue  # b"" would mean EOF
        reader.receive_data(stream[start:end])
        while isinstance(ev := reader.next_event(), Response):
            got.append(ev.data)
    assert got == payloads
