"""The bridge connection state machine: both sides' states and every rule that moves them.

Rule 1: everything that affects the state machine lives in this file: the transition table
and the few cross-side preconditions that do not fit a table. `connection.py` only feeds it
(role, message type) pairs, for what we send and for what we receive alike.

Rule 2: this file knows nothing of bytes, versions or which side *we* are. It tracks a CLIENT
state and a SERVER state and answers "may this role send this message now?".

The rules (DESIGN §3, docs/protocol.md §4):

  1. Each side is in AWAIT_GREETING, OPEN, CLOSED or ERROR. Both start in AWAIT_GREETING.
  2. The server speaks first: Welcome moves it to OPEN, Refused to CLOSED.
  3. The client's first frame is ClientHello (-> OPEN), and it may only send it once the
     server has reached OPEN (it has received Welcome).
  4. The server sends nothing but Welcome, Refused and Goodbye until the client has reached
     OPEN (its ClientHello has been received).
  5. Direction: only the client sends ClientHello, LeaseRequest, LeaseExchange, LeaseRelease
     and AdminRequest; only the server sends Welcome, Refused, TokenStatus, LeaseQueued,
     LeaseGranted, LeaseEnded, AdminResponse, Prefetched and SpeculationPaths. CcidFrame,
     Ping, Pong, ErrorMessage and Goodbye go both ways.
  6. Goodbye (either side, AWAIT_GREETING or OPEN) and Refused (server, AWAIT_GREETING or
     OPEN: in answer to an unacceptable ClientHello) move the sender to CLOSED. A CLOSED side
     sends nothing more.
  7. A side whose frames broke the protocol is in ERROR for good. The other side may then
     only say farewell to it: Goodbye, or Refused from the server.
  8. EOF from a side moves it to CLOSED, unless it is in ERROR.
  9. A side whose bytes did not all leave (its send failed or was cancelled half-way) is in
     ERROR for good: the stream may hold part of a frame, so it sends nothing more (h11's
     send_failed). What the other side already sent is still read.

An illegal move raises LocalProtocolError and changes nothing; the caller turns it into a
RemoteProtocolError when the move was the peer's.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from protocol.errors import LocalProtocolError
from protocol.wire import (
    AdminRequest,
    AdminResponse,
    CcidFrame,
    ClientHello,
    ErrorMessage,
    Goodbye,
    LeaseEnded,
    LeaseExchange,
    LeaseGranted,
    LeaseQueued,
    LeaseRelease,
    LeaseRequest,
    Message,
    Ping,
    Pong,
    Prefetched,
    Refused,
    SpeculationPaths,
    TokenStatus,
    Welcome,
)


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnState(Enum):
    AWAIT_GREETING = "await_greeting"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


_C, _S = Role.CLIENT, Role.SERVER
AWAIT_GREETING, OPEN, CLOSED, ERROR = ConnState

_BOTH_WAYS: Final[frozenset[type[Message]]] = frozenset({CcidFrame, Ping, Pong, ErrorMessage})
CLIENT_SESSION_MESSAGES: Final[frozenset[type[Message]]] = _BOTH_WAYS | {
    LeaseRequest,
    LeaseExchange,
    LeaseRelease,
    AdminRequest,
}
SERVER_SESSION_MESSAGES: Final[frozenset[type[Message]]] = _BOTH_WAYS | {
    TokenStatus,
    LeaseQueued,
    LeaseGranted,
    LeaseEnded,
    AdminResponse,
    Prefetched,
    SpeculationPaths,
}
FAREWELLS: Final[frozenset[type[Message]]] = frozenset({Goodbye, Refused})

# role -> state -> message type -> next state. A missing entry is illegal (rules 2, 3, 5, 6).
TRANSITIONS: Final[dict[Role, dict[ConnState, dict[type[Message], ConnState]]]] = {
    _C: {
        AWAIT_GREETING: {ClientHello: OPEN, Goodbye: CLOSED},
        OPEN: {**dict.fromkeys(CLIENT_SESSION_MESSAGES, OPEN), Goodbye: CLOSED},
        CLOSED: {},
        ERROR: {},
    },
    _S: {
        AWAIT_GREETING: {Welcome: OPEN, Refused: CLOSED, Goodbye: CLOSED},
        OPEN: {**dict.fromkeys(SERVER_SESSION_MESSAGES, OPEN), Refused: CLOSED, Goodbye: CLOSED},
        CLOSED: {},
        ERROR: {},
    },
}
SENDABLE: Final = {role: frozenset().union(*table.values()) for role, table in TRANSITIONS.items()}


def _other(role: Role) -> Role:
    return _S if role is _C else _C


class ConnectionState:
    """Both sides' states plus which sides have ever been OPEN (for rules 3 and 4)."""

    def __init__(self) -> None:
        self.states: dict[Role, ConnState] = {_C: AWAIT_GREETING, _S: AWAIT_GREETING}
        self.reached_open: set[Role] = set()
        self.send_failed: set[Role] = set()  # in ERROR by rule 9, not for breaking the protocol

    def process_message(self, role: Role, msg_type: type[Message]) -> None:
        """Apply `role` sending a message of `msg_type`. Raises LocalProtocolError, changing nothing."""
        name = msg_type.__name__
        if msg_type not in SENDABLE[role]:
            raise LocalProtocolError(f"the {role.value} may never send {name}")  # rule 5
        state, peer = self.states[role], _other(role)
        new_state = TRANSITIONS[role][state].get(msg_type)
        if new_state is None:
            raise LocalProtocolError(f"the {role.value} may not send {name} in state {state.name}")
        if self.states[peer] is ERROR and peer not in self.send_failed and msg_type not in FAREWELLS:
            raise LocalProtocolError(f"only a farewell may follow a protocol error, not {name}")  # rule 7
        if msg_type is ClientHello and _S not in self.reached_open:
            raise LocalProtocolError("the client may not send ClientHello before Welcome")  # rule 3
        if role is _S and msg_type in SERVER_SESSION_MESSAGES and _C not in self.reached_open:
            raise LocalProtocolError(f"the server may not send {name} before ClientHello")  # rule 4
        self.states[role] = new_state
        if new_state is OPEN:
            self.reached_open.add(role)

    def process_error(self, role: Role) -> None:
        """`role` broke the protocol (rule 7)."""
        self.send_failed.discard(role)
        self.states[role] = ERROR

    def process_send_failed(self, role: Role) -> None:
        """`role`'s last send did not reach the stream whole (rule 9)."""
        if self.states[role] is not ERROR:
            self.send_failed.add(role)
        self.states[role] = ERROR

    def process_eof(self, role: Role) -> None:
        """`role` closed its end of the stream (rule 8)."""
        if self.states[role] is not ERROR:
            self.states[role] = CLOSED
