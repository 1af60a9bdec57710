"""B1/P6: the frame decoder's peak allocation under hostile length prefixes is bounded.

reliability-anchors §7.2 B1: "peak allocation < 2x max frame". Measured with tracemalloc
around the decoder only (the stream is built before the measurement starts); the slice the
caller feeds (one receive chunk) is allocated inside the window and is allowed on top, since
the decoder's contract is "one incomplete frame plus the chunk being fed". "Max frame" is per
role: the largest frame the *peer* may send — a CCID frame for the server (a client never
sends ADMIN_RESPONSE), a 1 MiB ADMIN_RESPONSE for the client.
"""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, ccid, speculation, wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import RemoteProtocolError

CHUNK = 16384  # a receive chunk below the runtime's 64 KiB, so the decoder really accumulates
WELCOME = wire.Welcome(version=wire.PROTOCOL_VERSION, server="s", identity="vm1", heartbeat_interval=10.0)
MAX_ADMIN_RESPONSE_PAYLOAD = 1 << 20  # docs/protocol.md §3, the limits table
HELLO = wire.encode_message(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="alloc-test"))
MAX_FRAME = {
    # A client's largest frame is a LeaseExchange (issue 17): deferred steps plus one CCID message.
    Role.SERVER: wire.HEADER_LEN + max(wire.MAX_CCID_PAYLOAD, speculation.MAX_SPECULATION_PAYLOAD),
    Role.CLIENT: wire.HEADER_LEN + MAX_ADMIN_RESPONSE_PAYLOAD,
}
FRAME_TYPES = [int(t) for t in wire.FrameType]


def _conn(role: Role) -> BridgeConnection:
    conn = BridgeConnection(role)
    if role is Role.SERVER:
        conn.send(WELCOME)
        conn.receive_data(HELLO)
        assert isinstance(conn.next_event(), wire.ClientHello)
        assert conn.next_event() is NEED_DATA
    return conn


def _peak_while_decoding(conn: BridgeConnection, stream: bytes) -> int:
    """Bytes allocated at the peak, above the start, while `conn` eats `stream` chunk by chunk."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for start in range(0, len(stream), CHUNK):
            conn.receive_data(stream[start : start + CHUNK])
            try:
                while conn.next_event() is not NEED_DATA:
                    pass
            except RemoteProtocolError:
                break
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _bound(role: Role) -> int:
    return 2 * MAX_FRAME[role] + CHUNK


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.name.lower())
@pytest.mark.parametrize("frame_type", FRAME_TYPES, ids=lambda t: wire.FrameType(t).name.lower())
def test_a_frame_at_the_largest_length_the_decoder_accepts_stays_under_twice_the_max_frame(
    role: Role, frame_type: int
) -> None:
    # The largest length the header check lets through, payload all zeros (garbage to decode).
    limit = 1
    for length in (MAX_ADMIN_RESPONSE_PAYLOAD, wire.MAX_CCID_PAYLOAD, wire.MAX_CONTROL_PAYLOAD):
        probe = _conn(role)
        probe.receive_data(struct.pack(">BBI", frame_type, 0, length))
        try:
            probe.next_event()
        except RemoteProtocolError:
            continue
        limit = length
        break
    stream = struct.pack(">BBI", frame_type, 0, limit) + bytes(limit)
    peak = _peak_while_decoding(_conn(role), stream)
    assert peak <= _bound(role), f"peak {peak} bytes for a {limit}-byte payload"


def test_a_valid_ccid_frame_of_the_largest_size_decodes_under_twice_the_max_frame() -> None:
    # An extended APDU as big as the CCID limit, through the whole decode (prefix and header).
    data = bytes(wire.MAX_CCID_MESSAGE - 10)
    frame = wire.CcidFrame(token_id=0, epoch=7, message=ccid.xfr_block(1, data).encode())
    stream = wire.encode_message(frame)
    assert len(stream) == wire.HEADER_LEN + wire.MAX_CCID_PAYLOAD
    peak = _peak_while_decoding(_conn(Role.SERVER), stream)
    assert peak <= 2 * len(stream) + CHUNK, peak


def test_the_server_refuses_a_client_admin_response_before_buffering_a_mebibyte() -> None:
    """A client may not make the server hold 1 MiB: ADMIN_RESPONSE only ever flows to clients."""
    conn = _conn(Role.SERVER)
    conn.receive_data(struct.pack(">BBI", wire.FrameType.ADMIN_RESPONSE, 0, MAX_ADMIN_RESPONSE_PAYLOAD))
    with pytest.raises(RemoteProtocolError) as caught:
        conn.next_event()
    assert caught.value.close_code.name == "FRAME_TOO_LARGE"


LIMITS = (wire.MAX_CONTROL_PAYLOAD, wire.MAX_CCID_PAYLOAD, MAX_ADMIN_RESPONSE_PAYLOAD, 0xFFFF_FFFF)


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.name.lower())
@pytest.mark.parametrize("frame_type", [*FRAME_TYPES, 0x00, 0xFF], ids=lambda t: f"type{t:02x}")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flags=st.sampled_from([0, 0, 0, 0, 1, 0x80]),
    # Mostly lengths at, just under and just over each limit: where a decoder goes wrong.
    length=st.one_of(
        st.builds(
            lambda limit, delta: max(0, min(0xFFFF_FFFF, limit + delta)),
            st.sampled_from(LIMITS),
            st.integers(-2, 1),
        ),
        st.integers(0, 0xFFFF_FFFF),
    ),
    sent=st.one_of(st.just(1 << 21), st.integers(0, 300_000)),  # 1 << 21: all the claimed length
)
def test_hostile_length_prefixes_never_make_the_decoder_allocate_past_twice_the_max_frame(
    role: Role, frame_type: int, flags: int, length: int, sent: int
) -> None:
    stream = struct.pack(">BBI", frame_type, flags, length) + b"\x7b" * min(sent, length)
    peak = _peak_while_decoding(_conn(role), stream)
    assert peak <= _bound(role), f"peak {peak} bytes"
