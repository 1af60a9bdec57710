"""BridgeConnection and its state machine (protocol/connection.py, protocol/_transitions.py)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA
from protocol._transitions import TRANSITIONS, ConnectionState
from protocol.connection import BridgeConnection, ConnectionClosed, ConnState, Role
from protocol.errors import CloseCode, LocalProtocolError, RemoteProtocolError
from protocol.wire import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AdminRequest,
    AdminResponse,
    CcidFrame,
    ClientHello,
    ErrorMessage,
    Goodbye,
    LeaseEnded,
    LeaseGranted,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    Message,
    Ping,
    Pong,
    Refused,
    TokenStatus,
    Welcome,
    encode_message,
)

AWAIT, OPEN, CLOSED, ERROR = ConnState
CLIENT, SERVER = Role

WELCOME = Welcome(
    version=PROTOCOL_VERSION, server="tokenhost", identity="build-vm-01", heartbeat_interval=10.0
)
HELLO = ClientHello(version=PROTOCOL_VERSION, software="tokenbridge-client/0.1.0")
REFUSED = Refused(version=PROTOCOL_VERSION, code=CloseCode.NOT_AUTHORIZED, reason="not_allowed", message="no")
GOODBYE = Goodbye(code=CloseCode.NORMAL, reason="done")
POWER_ON = bytes.fromhex("62000000000000000000")
ATR = bytes.fromhex("3BD518008131FE7D8073C82110F4")

# One valid instance of every message type (Hypothesis picks among them).
SAMPLES: list[Message] = [
    WELCOME,
    REFUSED,
    HELLO,
    TokenStatus(token_id=1, name="codesign", present=True, allowed=True, atr=ATR, state="free"),
    LeaseRequest(token_id=1),
    LeaseQueued(token_id=1, position=0),
    LeaseGranted(token_id=1, epoch=7, atr=ATR),
    LeaseRelease(token_id=1, epoch=7),
    LeaseEnded(token_id=1, epoch=7, reason="released"),
    CcidFrame(token_id=1, epoch=7, message=POWER_ON),
    Ping(nonce=1),
    Pong(nonce=1),
    ErrorMessage(code="stale_epoch", message="old epoch", token_id=1),
    AdminRequest(request_id=1, action="status", args={}),
    AdminResponse(request_id=1, ok=True, result={}),
    GOODBYE,
]


class ConnectionPair:
    """A client and a server wired back to back (h11's test helper)."""

    def __init__(self) -> None:
        self.conn = {CLIENT: BridgeConnection(CLIENT), SERVER: BridgeConnection(SERVER)}

    def send(self, role: Role, msg: Message) -> list[Any]:
        """`role` sends `msg`; deliver it and return what the other side reads."""
        other = self.conn[SERVER if role is CLIENT else CLIENT]
        other.receive_data(self.conn[role].send(msg))
        return drain(other)

    def handshake(self) -> None:
        assert self.send(SERVER, WELCOME) == [WELCOME]
        assert self.send(CLIENT, HELLO) == [HELLO]

    def states(self) -> tuple[ConnState, ...]:
        c, s = self.conn[CLIENT], self.conn[SERVER]
        return (c.our_state, c.their_state, s.our_state, s.their_state)


def drain(conn: BridgeConnection) -> list[Any]:
    events: list[Any] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def test_happy_path_through_a_whole_lease_and_goodbye() -> None:
    p = ConnectionPair()
    assert p.states() == (AWAIT, AWAIT, AWAIT, AWAIT)
    p.handshake()
    assert p.states() == (OPEN, OPEN, OPEN, OPEN)
    script: list[tuple[Role, Message]] = [
        (SERVER, SAMPLES[3]),
        (CLIENT, LeaseRequest(token_id=1)),
        (SERVER, LeaseQueued(token_id=1, position=0)),
        (SERVER, LeaseGranted(token_id=1, epoch=7, atr=ATR)),
        (CLIENT, CcidFrame(token_id=1, epoch=7, message=POWER_ON)),
        (SERVER, CcidFrame(token_id=1, epoch=7, message=bytes.fromhex("800e0000000000000000") + ATR)),
        (SERVER, CcidFrame(token_id=1, epoch=7, message=b"\x50\x03")),
        (CLIENT, Ping(nonce=9)),
        (SERVER, Pong(nonce=9)),
        (SERVER, Ping(nonce=10)),
        (CLIENT, Pong(nonce=10)),
        (CLIENT, CcidFrame(token_id=1, epoch=6, message=POWER_ON)),
        (SERVER, ErrorMessage(code="stale_epoch", message="epoch 6", token_id=1)),
        (CLIENT, AdminRequest(request_id=3, action="status", args={"verbose": True})),
        (SERVER, AdminResponse(request_id=3, ok=True, result={"leases": [1]})),
        (CLIENT, ErrorMessage(code="bad_ccid", message="?")),
        (CLIENT, LeaseRelease(token_id=1, epoch=7)),
        (SERVER, LeaseEnded(token_id=1, epoch=7, reason="released")),
    ]
    for role, msg in script:
        assert p.send(role, msg) == [msg]
        assert p.states() == (OPEN, OPEN, OPEN, OPEN)
    assert p.send(CLIENT, GOODBYE) == [GOODBYE]
    assert p.states() == (CLOSED, OPEN, OPEN, CLOSED)
    assert p.send(SERVER, GOODBYE) == [GOODBYE]
    assert p.states() == (CLOSED, CLOSED, CLOSED, CLOSED)


def test_eof_yields_connection_closed_and_keeps_yielding_it() -> None:
    p = ConnectionPair()
    p.handshake()
    server = p.conn[SERVER]
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.their_state is CLOSED
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    assert server.send(GOODBYE)  # we may still say goodbye to a half-closed peer


def test_eof_before_greeting_closes_the_peer_without_error() -> None:
    client = BridgeConnection(CLIENT)
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()
    assert client.their_state is CLOSED


def test_eof_in_the_middle_of_a_frame_is_a_remote_error() -> None:
    client = BridgeConnection(CLIENT)
    wire = encode_message(WELCOME)
    client.receive_data(wire[:-1])
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="eof"):
        client.next_event()
    assert client.their_state is ERROR


def test_data_after_eof_is_a_local_error() -> None:
    client = BridgeConnection(CLIENT)
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"\x01")


def test_server_may_refuse_as_its_first_frame_and_then_sends_nothing() -> None:
    p = ConnectionPair()
    assert p.send(SERVER, REFUSED) == [REFUSED]
    assert p.states() == (AWAIT, CLOSED, CLOSED, AWAIT)
    with pytest.raises(LocalProtocolError):
        p.conn[SERVER].send(GOODBYE)
    with pytest.raises(LocalProtocolError, match="before Welcome"):
        p.conn[CLIENT].send(HELLO)
    assert p.conn[CLIENT].send(GOODBYE)


def test_bridge_connection_refuses_a_role_that_is_not_a_role() -> None:
    with pytest.raises(ValueError, match="client"):
        BridgeConnection("client")  # type: ignore[arg-type]


# --- illegal sends: refused locally, nothing changes -------------------------------------------

SETUPS: dict[str, list[tuple[Role, Message]]] = {
    "fresh": [],
    "welcomed": [(SERVER, WELCOME)],
    "open": [(SERVER, WELCOME), (CLIENT, HELLO)],
    "client_gone": [(SERVER, WELCOME), (CLIENT, HELLO), (CLIENT, GOODBYE)],
    "server_gone": [(SERVER, WELCOME), (CLIENT, HELLO), (SERVER, GOODBYE)],
}
ILLEGAL_SENDS = [
    ("fresh", CLIENT, HELLO, "before Welcome"),
    ("fresh", CLIENT, LeaseRequest(token_id=1), "AWAIT_GREETING"),
    ("fresh", CLIENT, Ping(nonce=1), "AWAIT_GREETING"),
    ("fresh", SERVER, SAMPLES[3], "AWAIT_GREETING"),
    ("fresh", SERVER, Ping(nonce=1), "AWAIT_GREETING"),
    ("welcomed", SERVER, WELCOME, "OPEN"),
    ("welcomed", SERVER, SAMPLES[3], "before ClientHello"),
    ("welcomed", SERVER, Ping(nonce=1), "before ClientHello"),
    ("welcomed", CLIENT, LeaseRequest(token_id=1), "AWAIT_GREETING"),
    ("open", CLIENT, HELLO, "OPEN"),
    ("open", CLIENT, LeaseGranted(token_id=1, epoch=1, atr=b""), "never"),
    ("open", CLIENT, REFUSED, "never"),
    ("open", CLIENT, WELCOME, "never"),
    ("open", CLIENT, AdminResponse(request_id=1, ok=True, result={}), "never"),
    ("open", SERVER, LeaseRequest(token_id=1), "never"),
    ("open", SERVER, LeaseRelease(token_id=1, epoch=1), "never"),
    ("open", SERVER, HELLO, "never"),
    ("open", SERVER, AdminRequest(request_id=1, action="x", args={}), "never"),
    ("client_gone", CLIENT, Ping(nonce=1), "CLOSED"),
    ("client_gone", CLIENT, GOODBYE, "CLOSED"),
    ("server_gone", SERVER, Ping(nonce=1), "CLOSED"),
    ("server_gone", SERVER, REFUSED, "CLOSED"),
]


@pytest.mark.parametrize(("setup", "role", "msg", "match"), ILLEGAL_SENDS)
def test_illegal_send_raises_local_error_and_changes_nothing(
    setup: str, role: Role, msg: Message, match: str
) -> None:
    p = ConnectionPair()
    for who, m in SETUPS[setup]:
        p.send(who, m)
    before = p.states()
    with pytest.raises(LocalProtocolError, match=match):
        p.conn[role].send(msg)
    assert p.states() == before


@pytest.mark.parametrize(("setup", "role", "msg", "match"), ILLEGAL_SENDS)
def test_illegal_frame_from_the_peer_is_a_remote_error_and_the_peer_stays_in_error(
    setup: str, role: Role, msg: Message, match: str
) -> None:
    p = ConnectionPair()
    for who, m in SETUPS[setup]:
        p.send(who, m)
    receiver = p.conn[SERVER if role is CLIENT else CLIENT]
    receiver.receive_data(encode_message(msg))  # a misbehaving peer skips its own checks
    with pytest.raises(RemoteProtocolError, match=match) as info:
        receiver.next_event()
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert receiver.their_state is ERROR
    with pytest.raises(RemoteProtocolError):
        receiver.next_event()
    receiver.receive_data(b"\x99" * 100)  # ignored: nothing more is read from a failed peer
    with pytest.raises(RemoteProtocolError):
        receiver.next_event()
    if receiver.our_state is not CLOSED:
        assert receiver.send(Goodbye(code=info.value.close_code, reason="protocol error"))
        assert receiver.our_state is CLOSED


def test_after_a_peer_error_only_a_farewell_may_be_sent() -> None:
    p = ConnectionPair()
    p.handshake()
    server = p.conn[SERVER]
    server.receive_data(b"\x99\x00\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0x99"):
        server.next_event()
    with pytest.raises(LocalProtocolError, match="farewell"):
        server.send(Ping(nonce=1))
    assert server.our_state is OPEN
    assert server.send(GOODBYE)


def test_oversized_frame_from_the_peer_closes_with_frame_too_large_after_the_header_alone() -> None:
    client = BridgeConnection(CLIENT)
    client.receive_data(b"\x01\x00\x00\x00\x40\x01")  # Welcome of 16385 bytes: header only
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.close_code is CloseCode.FRAME_TOO_LARGE
    assert client.their_state is ERROR
    assert client.send(Goodbye(code=info.value.close_code, reason="frame too large"))


def test_connection_applies_its_configured_ccid_limit() -> None:
    server = BridgeConnection(SERVER, max_ccid_payload=6 + 271)
    server.receive_data(b"\x30\x00\x00\x00\x01\x16")  # 278 > 277
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.close_code is CloseCode.FRAME_TOO_LARGE


# --- versions -------------------------------------------------------------------------------


def test_client_refuses_a_welcome_of_another_major_version_and_can_say_goodbye() -> None:
    client = BridgeConnection(CLIENT)
    # version 1: a server from before LeaseExchange/Prefetched/SpeculationPaths (issue 17)
    client.receive_data(encode_message(Welcome(version=1, server="s", identity="i", heartbeat_interval=5.0)))
    with pytest.raises(RemoteProtocolError, match="version 1") as info:
        client.next_event()
    assert info.value.close_code is CloseCode.UNSUPPORTED_VERSION
    assert client.their_state is ERROR
    with pytest.raises(LocalProtocolError):
        client.send(HELLO)
    client.send(Goodbye(code=CloseCode.UNSUPPORTED_VERSION, reason="version"))
    assert client.our_state is CLOSED


def test_server_refuses_a_client_hello_of_another_major_version_with_refused() -> None:
    p = ConnectionPair()
    p.send(SERVER, WELCOME)
    server = p.conn[SERVER]
    server.receive_data(encode_message(ClientHello(version=0, software="old")))
    with pytest.raises(RemoteProtocolError, match="version 0") as info:
        server.next_event()
    assert info.value.close_code is CloseCode.UNSUPPORTED_VERSION
    refusal = Refused(
        version=PROTOCOL_VERSION, code=info.value.close_code, reason="not_allowed", message="upgrade"
    )
    p.conn[CLIENT].receive_data(server.send(refusal))
    assert server.our_state is CLOSED
    assert drain(p.conn[CLIENT]) == [refusal]
    assert p.conn[CLIENT].their_state is CLOSED


def test_client_reads_a_refusal_whatever_its_version() -> None:
    client = BridgeConnection(CLIENT)
    refusal = Refused(version=7, code=CloseCode.UNSUPPORTED_VERSION, reason="not_allowed", message="upgrade")
    client.receive_data(encode_message(refusal))
    assert client.next_event() == refusal
    assert client.their_state is CLOSED


# --- the transition table, every (role, states, input) ----------------------------------------


def test_every_role_state_and_message_type_either_follows_the_table_or_changes_nothing() -> None:
    """h2-style: all 2 roles x 4 x 4 states x 4 reached-OPEN sets x 16 message types."""
    reached_sets = [set(), {CLIENT}, {SERVER}, {CLIENT, SERVER}]
    for role, mine, theirs, reached, msg_type in itertools.product(
        Role, ConnState, ConnState, reached_sets, MESSAGE_TYPES
    ):
        other = SERVER if role is CLIENT else CLIENT
        cs = ConnectionState()
        cs.states = {role: mine, other: theirs}
        cs.reached_open = set(reached)
        try:
            cs.process_message(role, msg_type)
        except LocalProtocolError:
            assert cs.states == {role: mine, other: theirs}
            assert cs.reached_open == reached
        else:
            assert cs.states[role] is TRANSITIONS[role][mine][msg_type]
            assert cs.states[other] is theirs
            assert mine in (AWAIT, OPEN)
            assert theirs is not ERROR or msg_type in (Goodbye, Refused)


# --- Hypothesis: random sends, deliveries, raw frames and EOFs --------------------------------

RANK = {AWAIT: 0, OPEN: 1, CLOSED: 2, ERROR: 3}
RAW_FRAMES = [
    b"\x99\x00\x00\x00\x00\x00",  # unknown type
    b"\x40\x01\x00\x00\x00\x0c" + b'{"nonce":42}',  # flags
    b"\x40\x00\x00\x00\x40\x01",  # too large
    b"\x40\x00\x00\x00\x00\x02{}",  # missing key
    *(encode_message(m) for m in SAMPLES),  # valid frames the sender never sent
]
_send = st.tuples(st.just("send"), st.sampled_from(Role), st.sampled_from(SAMPLES))
_deliver = st.tuples(st.just("deliver"), st.sampled_from(Role), st.integers(1, 200))
_eof = st.tuples(st.just("eof"), st.sampled_from(Role), st.just(0))
action = st.one_of(_send, _send, _send, _deliver, _deliver, _eof)  # one_of picks branches evenly
raw_action = st.tuples(st.just("raw"), st.sampled_from(Role), st.sampled_from(RAW_FRAMES))


class Harness:
    def __init__(self, *, handshake: bool) -> None:
        pair = ConnectionPair()
        if handshake:
            pair.handshake()
        self.conn = pair.conn
        self.outbox = {CLIENT: b"", SERVER: b""}
        self.eof_sent: set[Role] = set()
        self.failed: set[Role] = set()  # receivers that raised RemoteProtocolError
        self.injected = False

    def step(self, kind: str, role: Role, arg: Any) -> None:
        conn, before = self.conn[role], self.snapshot()
        if kind == "send":
            try:
                data = conn.send(arg)
            except LocalProtocolError:
                assert self.snapshot() == before
                return
            if role not in self.eof_sent:
                self.outbox[role] += data
        elif kind == "raw" and role not in self.eof_sent:
            self.outbox[role] += arg
            self.injected = True
        elif kind == "deliver":
            self.deliver(role, arg)
        elif kind == "eof" and role not in self.eof_sent:
            self.deliver(role, len(self.outbox[role]))
            self.eof_sent.add(role)
            self.receive(role, b"")

    def deliver(self, role: Role, size: int) -> None:
        chunk, self.outbox[role] = self.outbox[role][:size], self.outbox[role][size:]
        if chunk and role not in self.eof_sent:
            self.receive(role, chunk)

    def receive(self, sender: Role, data: bytes) -> None:
        receiver = SERVER if sender is CLIENT else CLIENT
        conn = self.conn[receiver]
        conn.receive_data(data)
        try:
            drain(conn)
        except RemoteProtocolError:
            self.failed.add(receiver)
        if receiver in self.failed:
            assert conn.their_state is ERROR
            with pytest.raises(RemoteProtocolError):
                conn.next_event()

    def snapshot(self) -> tuple[ConnState, ...]:
        return tuple(s for c in self.conn.values() for s in (c.our_state, c.their_state))

    def check(self, previous: tuple[ConnState, ...]) -> None:
        now = self.snapshot()
        for old, new in zip(previous, now, strict=True):
            assert RANK[new] >= RANK[old]  # never goes back
            assert old is not ERROR or new is ERROR  # ERROR is for good
        for conn in self.conn.values():
            assert conn.our_state is not ERROR  # illegal sends are refused, not recorded
        if not self.injected:
            for sender, receiver in ((CLIENT, SERVER), (SERVER, CLIENT)):
                seen = self.conn[receiver].their_state
                actual = self.conn[sender].our_state
                # The receiver's view lags the sender (bytes in flight) but never leads it,
                # except that EOF closes a peer that never said goodbye.
                assert seen is ERROR or RANK[seen] <= RANK[actual] or sender in self.eof_sent


def run_actions(actions: list[tuple[str, Role, Any]], *, handshake: bool) -> None:
    h = Harness(handshake=handshake)
    for kind, role, arg in actions:
        previous = h.snapshot()
        h.step(kind, role, arg)  # catches exactly the Local/RemoteProtocolErrors it expects
        h.check(previous)


@settings(max_examples=300)
@given(st.lists(action, max_size=40), st.booleans())
def test_random_conversations_keep_both_views_of_the_state_machine_consistent(
    actions: list[tuple[str, Role, Any]], handshake: bool
) -> None:
    run_actions(actions, handshake=handshake)


@settings(max_examples=300)
@given(st.lists(action | raw_action, max_size=40), st.booleans())
def test_random_conversations_with_injected_frames_fail_only_with_protocol_errors(
    actions: list[tuple[str, Role, Any]], handshake: bool
) -> None:
    run_actions(actions, handshake=handshake)


@settings(max_examples=100)
@given(st.lists(st.sampled_from([m for m in SAMPLES if type(m) not in (Welcome, ClientHello)]), max_size=10))
def test_after_handshake_legal_messages_arrive_intact_in_both_directions(msgs: list[Message]) -> None:
    p = ConnectionPair()
    p.handshake()
    for msg in msgs:
        role = CLIENT if TRANSITIONS[CLIENT][OPEN].get(type(msg)) else SERVER
        if p.conn[role].our_state is not OPEN or p.conn[role].their_state is not OPEN:
            break
        assert p.send(role, msg) == [msg]


# --- send_failed (h11's Connection.send_failed) ------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("at", ["greeting", "open"])
def test_send_failed_puts_our_side_in_error_and_refuses_every_later_send(role: Role, at: str) -> None:
    pair = ConnectionPair()
    if at == "open":
        pair.handshake()
    conn = pair.conn[role]
    their_state = conn.their_state
    conn.send_failed()
    assert (conn.our_state, conn.their_state) == (ERROR, their_state)
    for msg in SAMPLES:
        with pytest.raises(LocalProtocolError):
            conn.send(msg)
    assert conn.our_state is ERROR


def test_send_failed_is_idempotent_and_leaves_receiving_alone() -> None:
    pair = ConnectionPair()
    pair.handshake()
    client = pair.conn[CLIENT]
    client.send_failed()
    client.send_failed()
    assert client.our_state is ERROR
    client.receive_data(pair.conn[SERVER].send(Ping(nonce=3)))
    assert drain(client) == [Ping(nonce=3)]  # frames already in flight are still read


def test_every_role_and_state_goes_to_error_on_send_failed() -> None:
    for role, mine, theirs in itertools.product(Role, ConnState, ConnState):
        other = SERVER if role is CLIENT else CLIENT
        cs = ConnectionState()
        cs.states = {role: mine, other: theirs}
        cs.process_send_failed(role)
        assert cs.states == {role: ERROR, other: theirs}
