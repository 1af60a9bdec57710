"""Fuzz the bridge wire decoder (protocol/_framing.py + protocol/wire.py + the connection state
machine) with arbitrary and mutated byte streams, split at arbitrary points (reliability §7.2 B1).

Pass criteria: the only exception is RemoteProtocolError (the peer's fault, with a close code);
nothing more than one maximal frame plus the chunk being fed is ever buffered; the events of a
valid stream do not depend on how it is chunked.
"""

from __future__ import annotations

from fuzz_support import budget, chunks, corpus_files, mutated
from hypothesis import example, given
from hypothesis import strategies as st

from protocol import NEED_DATA, ccid, wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode, RemoteProtocolError

WELCOME = wire.Welcome(version=wire.PROTOCOL_VERSION, server="s", identity="vm1", heartbeat_interval=10.0)
# A recorded client session: greeting, a lease, power-on, one APDU, release, ping, goodbye.
CLIENT_SESSION = b"".join(
    wire.encode_message(m)
    for m in (
        wire.ClientHello(version=wire.PROTOCOL_VERSION, software="tokenbridge-client/0.1.0"),
        wire.LeaseRequest(token_id=0),
        wire.CcidFrame(token_id=0, epoch=1000, message=ccid.icc_power_on(0).encode()),
        wire.CcidFrame(
            token_id=0, epoch=1000, message=ccid.xfr_block(1, bytes.fromhex("00a4040000")).encode()
        ),
        wire.LeaseRelease(token_id=0, epoch=1000),
        wire.Ping(nonce=7),
        wire.AdminRequest(request_id=1, action="status", args={"a": [1, {"b": None}]}),
        wire.ErrorMessage(code="bad_ccid", message="y", token_id=None),
        wire.Goodbye(code=CloseCode.NORMAL, reason="bye"),
    )
)
SERVER_SESSION = b"".join(
    wire.encode_message(m)
    for m in (
        WELCOME,
        wire.TokenStatus(
            token_id=0, name="codesign", present=True, allowed=True, atr=b"\x3b\x00", state="free"
        ),
        wire.LeaseQueued(token_id=0, position=1),
        wire.LeaseGranted(token_id=0, epoch=1000, atr=b"\x3b\x00"),
        wire.CcidFrame(token_id=0, epoch=1000, message=ccid.data_block(0, b"\x90\x00").encode()),
        wire.LeaseEnded(token_id=0, epoch=1000, reason="released"),
        wire.AdminResponse(request_id=1, ok=True, result={"tokens": {}}, error=""),
    )
)
MAX_FRAME = wire.HEADER_LEN + wire.MAX_CCID_PAYLOAD


def _server_conn() -> BridgeConnection:
    conn = BridgeConnection(Role.SERVER)
    conn.send(WELCOME)
    return conn


def _feed(conn: BridgeConnection, pieces: list[bytes], *, eof: bool) -> list[object]:
    """Feed the pieces, pulling every event; returns the events, ends at the first error."""
    events: list[object] = []
    for piece in [*pieces, b""] if eof else pieces:
        conn.receive_data(piece)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                assert isinstance(exc.close_code, CloseCode)
                events.append(exc)
                return events
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, wire.ConnectionClosed):
                return events
        assert conn._decoder.buffered <= MAX_FRAME + len(piece)
    return events


@budget(300)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 10_000), max_size=8), eof=st.booleans())
@example(data=b"\x30\x00\x00\x01\x00\x16" + b"\x00" * 6, cuts=[], eof=True)  # ccid frame, cut short by eof
@example(data=b"\x03\x00\x00\x00\x00\x02{}", cuts=[1], eof=False)  # hello without fields
def test_server_decoder_survives_arbitrary_bytes(data: bytes, cuts: list[int], eof: bool) -> None:
    _feed(_server_conn(), chunks(data, cuts), eof=eof)


@budget(400)
@given(data=st.data(), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_server_decoder_survives_mutated_client_sessions(data: st.DataObject, cuts: list[int]) -> None:
    stream = data.draw(mutated(CLIENT_SESSION, max_edits=6))
    _feed(_server_conn(), chunks(stream, cuts), eof=True)


@budget(300)
@given(data=st.data(), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_client_decoder_survives_mutated_server_sessions(data: st.DataObject, cuts: list[int]) -> None:
    stream = data.draw(mutated(SERVER_SESSION, max_edits=6))
    conn = BridgeConnection(Role.CLIENT)
    _feed(conn, chunks(stream, cuts), eof=True)


@budget(100)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_valid_session_decodes_the_same_whatever_the_chunking(cuts: list[int]) -> None:
    whole = _feed(_server_conn(), [CLIENT_SESSION], eof=True)
    assert not any(isinstance(e, Exception) for e in whole)
    assert len(whole) == 10  # nine messages and the close
    assert _feed(_server_conn(), chunks(CLIENT_SESSION, cuts), eof=True) == whole


def test_corpus_regressions_replay_without_foreign_exceptions() -> None:
    files = corpus_files("wire")
    assert files, "tests/fuzz/corpus/wire/ holds recorded sessions and past crashers"
    for path in files:
        _feed(_server_conn(), [path.read_bytes()], eof=True)
