"""`BridgeConnection`: the sans-I/O bridge protocol endpoint, in the h11 style (DESIGN §3).

Bytes in through `receive_data` (`b""` = EOF), events out through `next_event`, bytes out from
`send`; there is no hidden outbound buffer and no I/O. Framing and field validation live in
`protocol/wire.py`; every state rule lives in `protocol/_transitions.py`. What this module adds:
the version check on the greeting frames, the conversion of illegal peer moves into
`RemoteProtocolError`, and the sticky ERROR state after one.

As in h11, `send` commits the state transition when it returns the bytes, before they reach
the stream. The I/O layer that fails to write them (the stream broke, or the send was
cancelled half-way) must call `send_failed()`: our side moves to ERROR and every later `send`
raises `LocalProtocolError` (`protocol/runtime/framed.py` does this).
"""

from __future__ import annotations

from protocol._sentinel import NEED_DATA, NeedData
from protocol._transitions import ConnectionState, ConnState, Role
from protocol.errors import CloseCode, LocalProtocolError, RemoteProtocolError
from protocol.wire import (
    MAX_CCID_PAYLOAD,
    MAX_CONTROL_PAYLOAD,
    PROTOCOL_VERSION,
    ClientHello,
    ConnectionClosed,
    FrameDecoder,
    Message,
    Welcome,
    decode_message,
    encode_message,
)

__all__ = ["BridgeConnection", "ConnState", "ConnectionClosed", "Role"]


class BridgeConnection:
    """One end of a bridge connection.

    Args:
        role: which end we are.
        max_control_payload, max_ccid_payload: the largest payloads we accept from the peer
            (the protocol maximums by default; what we send is always held to those).
    """

    def __init__(
        self,
        role: Role,
        *,
        max_control_payload: int = MAX_CONTROL_PAYLOAD,
        max_ccid_payload: int = MAX_CCID_PAYLOAD,
    ) -> None:
        if not isinstance(role, Role):
            raise ValueError(f"expected Role.CLIENT or Role.SERVER, not {role!r}")
        self._our_role = role
        self._their_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._state = ConnectionState()
        # Only the server sends ADMIN_RESPONSE: a server's decoder holds it to the control limit.
        self._decoder = FrameDecoder(
            max_control_payload=max_control_payload,
            max_ccid_payload=max_ccid_payload,
            large_admin_response=role is Role.CLIENT,
        )
        self._error: RemoteProtocolError | None = None

    @property
    def our_role(self) -> Role:
        return self._our_role

    @property
    def their_role(self) -> Role:
        return self._their_role

    @property
    def our_state(self) -> ConnState:
        return self._state.states[self._our_role]

    @property
    def their_state(self) -> ConnState:
        return self._state.states[self._their_role]

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer; `b""` means it closed its end.

        Call `next_event` until it returns `NEED_DATA` before feeding more. Once the peer is
        in ERROR, further bytes are dropped unread.

        Raises:
            LocalProtocolError: data after EOF, or called before the buffered events were pulled.
        """
        if self._error is None:
            self._decoder.receive_data(data)

    def next_event(self) -> Message | ConnectionClosed | NeedData:
        """Return the next message from the peer, `ConnectionClosed` (repeatedly) after a clean
        EOF, or `NEED_DATA`.

        Raises:
            RemoteProtocolError: the peer broke the protocol (bad frame, illegal message for
                its role or state, unsupported version). `their_state` becomes ERROR and every
                later call raises again; `send(Goodbye(...))` still works. Any other
                exception from here is a bug.
        """
        if self._error is not None:
            raise RemoteProtocolError(f"peer already failed: {self._error}", self._error.close_code)
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        except LocalProtocolError as exc:  # an illegal move by the peer, seen by _transitions
            remote = RemoteProtocolError(str(exc), exc.close_code)
            self._fail(remote)
            raise remote from None

    def _next_event(self) -> Message | ConnectionClosed | NeedData:
        frame = self._decoder.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        if isinstance(frame, ConnectionClosed):
            self._state.process_eof(self._their_role)
            return frame
        msg = decode_message(frame.frame_type, frame.payload)
        self._state.process_message(self._their_role, type(msg))
        _check_version(msg)
        return msg

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._state.process_error(self._their_role)

    def send(self, msg: Message) -> bytes:
        """Return the bytes that carry `msg` to the peer, and apply its state transition.

        Raises:
            LocalProtocolError: `msg` is illegal for our role or state, or a field is out of
                range. Nothing changes: the message is simply not sent.
        """
        data = encode_message(msg)
        self._state.process_message(self._our_role, type(msg))
        return data

    def send_failed(self) -> None:
        """Tell the state machine that bytes from `send` did not all reach the peer.

        Our side moves to ERROR for good (the stream may hold part of a frame): every later
        `send` raises `LocalProtocolError`. Receiving is unaffected. Idempotent.
        """
        self._state.process_send_failed(self._our_role)


def _check_version(msg: Message) -> None:
    # docs/protocol.md §4.1: only the major version exists; any other number is another
    # protocol. Refused is let through whatever its version so the client can show why.
    if isinstance(msg, Welcome | ClientHello) and msg.version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"peer speaks protocol version {msg.version}, we speak {PROTOCOL_VERSION}",
            CloseCode.UNSUPPORTED_VERSION,
        )
