"""Fuzz the vpcd framer (protocol/vpcd.py), both ends (reliability §7.2 B6).

Pass criteria: arbitrary bytes only ever raise RemoteProtocolError (unknown control code, empty
message, EOF mid-frame); a valid stream yields the same events whatever its chunking, including
byte-by-byte and coalesced (`00 01 02 00 01 04`).
"""

from __future__ import annotations

from fuzz_support import budget, chunks
from hypothesis import example, given
from hypothesis import strategies as st

from protocol import NEED_DATA
from protocol.errors import RemoteProtocolError
from protocol.vpcd import Apdu, Closed, Control, VpcdCardSide, VpcdControl, VpcdReaderSide, frame


def _events(side: VpcdCardSide | VpcdReaderSide, pieces: list[bytes]) -> list[object]:
    out: list[object] = []
    for piece in [*pieces, b""]:
        side.receive_data(piece)
        while True:
            try:
                event = side.next_event()
            except RemoteProtocolError as exc:
                return [*out, type(exc)]
            if event is NEED_DATA:
                break
            out.append(event)
            if isinstance(event, Closed):
                return out
    raise AssertionError("no Closed after eof")


@budget(400)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 1000), max_size=10))
@example(data=bytes.fromhex("0001 02 0001 04"), cuts=[1, 2, 3, 4, 5])
@example(data=bytes.fromhex("0000"), cuts=[])
@example(data=bytes.fromhex("0001 07"), cuts=[])
@example(data=bytes.fromhex("ffff 00"), cuts=[])
def test_card_side_survives_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _events(VpcdCardSide(), chunks(data, cuts))


@budget(200)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 1000), max_size=10))
def test_reader_side_survives_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _events(VpcdReaderSide(), chunks(data, cuts))


_VALID = st.lists(
    st.one_of(
        st.sampled_from(list(VpcdControl)).map(lambda c: bytes([c])),
        st.binary(min_size=2, max_size=300),
    ),
    max_size=8,
)


@budget(200)
@given(payloads=_VALID, cuts=st.lists(st.integers(0, 5000), max_size=16))
def test_valid_vpcd_stream_decodes_the_same_whatever_the_chunking(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(p) for p in payloads)
    expected = [Control(VpcdControl(p[0])) if len(p) == 1 else Apdu(p) for p in payloads] + [Closed()]
    assert _events(VpcdCardSide(), chunks(stream, cuts)) == expected
    assert _events(VpcdCardSide(), [stream[i : i + 1] for i in range(len(stream))]) == expected
