"""The one way a client opens a greeted connection to tokenbridge-server.

`connect()` opens TCP, does the TLS 1.3 handshake (the server's certificate is checked
against the CA, its name against `server_name` and its role with `check_peer_purpose`),
reads the server's first frame and, on Welcome, answers ClientHello. It returns a `Greeted`
(the framed connection, its stream and the Welcome), or raises:

- `ConnectRefused`: the server's first frame was Refused (its reason code and message);
- `ConnectFailed`: anything else, with `stage` saying where ("network", "tls", "closed" when
  the server cut us off right after the handshake, "greeting" for a wrong first frame).

`str()` of both is the operator-readable reason the tunnel, `tokenbridge doctor` and the
admin CLI print. No timeouts here (STYLE): callers wrap the call in `trio.fail_after`, and a
`trio.TooSlowError` is theirs to describe (`describe_connect_error`).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

import trio

from protocol.connection import BridgeConnection, ConnectionClosed, Role
from protocol.errors import BridgeError, TlsSetupError
from protocol.runtime.address import Address
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import HOSTNAME_MISMATCH, check_peer_purpose, describe_handshake_error
from protocol.wire import PROTOCOL_VERSION, ClientHello, Refused, Welcome

__all__ = [
    "ConnectFailed",
    "ConnectRefused",
    "Greeted",
    "OpenStream",
    "connect",
    "connect_error_cause",
    "describe_connect_error",
]

OpenStream = Callable[[str, int], Awaitable[trio.abc.Stream]]
Stage = Literal["network", "tls", "closed", "greeting", "refused"]

CLOSED_EARLY: Final = (
    "it closed the connection right after the TLS handshake, so it most likely refused "
    "our client certificate (another CA, expired or revoked; the server log's "
    "tls.handshake_failed line says which)"
)
NAME_FIX: Final = "fix server or server_name in the client config"


class ConnectFailed(BridgeError):
    """No greeted connection; `str()` says why in operator words, `stage` where it stopped."""

    def __init__(self, reason: str, *, stage: Stage) -> None:
        super().__init__(reason)
        self.stage: Stage = stage


class ConnectRefused(ConnectFailed):
    """The server answered the handshake with Refused (`code`, `message` as it sent them)."""

    def __init__(self, address: Address, code: str, message: str) -> None:
        super().__init__(f"server {address} refused this client: {code}: {message}", stage="refused")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Greeted:
    """An open connection after Welcome and our ClientHello; close it with `aclose()`."""

    conn: FramedConnection
    stream: trio.SSLStream[trio.abc.Stream]
    welcome: Welcome

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def connect(
    address: Address,
    ssl_context: ssl.SSLContext,
    *,
    server_name: str,
    software: str,
    open_stream: OpenStream = trio.open_tcp_stream,
    name_fix: str = NAME_FIX,
) -> Greeted:
    """TCP, TLS, the server's first frame and our ClientHello (see the module docstring).

    `name_fix` finishes the hint of a hostname mismatch ("fix ... in the client config").
    """
    try:
        tcp = await open_stream(address.host, address.port)
    except OSError as exc:
        raise ConnectFailed(describe_connect_error(exc, address), stage="network") from exc
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=server_name)
    try:
        await _handshake(stream, address, server_name, name_fix)
        conn = FramedConnection(stream, BridgeConnection(Role.CLIENT))
        welcome = await _greeting(conn, address)
        await conn.send(ClientHello(version=PROTOCOL_VERSION, software=software))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Greeted(conn, stream, welcome)


async def _handshake(
    stream: trio.SSLStream[trio.abc.Stream], address: Address, server_name: str, name_fix: str
) -> None:
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        why = describe_handshake_error(exc)
        if why == HOSTNAME_MISMATCH:
            why += f" (the server certificate does not name {server_name!r}; {name_fix})"
        raise ConnectFailed(f"TLS handshake with {address} failed: {why}", stage="tls") from exc
    try:
        check_peer_purpose(stream)  # OpenSSL takes a server certificate with no EKU, or both
    except TlsSetupError as exc:
        raise ConnectFailed(f"TLS handshake with {address} failed: {exc}", stage="tls") from exc


async def _greeting(conn: FramedConnection, address: Address) -> Welcome:
    # TLS 1.3: the server checks our certificate after our side of the handshake is done,
    # so its verdict shows on this first read: an alert, a cut connection or a plain close.
    try:
        first = await conn.receive()
    except trio.BrokenResourceError as exc:
        why = describe_handshake_error(exc)
        if not why.startswith("peer refused our certificate"):
            why = CLOSED_EARLY
        raise ConnectFailed(f"server {address} refused this client: {why}", stage="closed") from exc
    if isinstance(first, ConnectionClosed):
        raise ConnectFailed(f"server {address} refused this client: {CLOSED_EARLY}", stage="closed")
    if isinstance(first, Refused):
        raise ConnectRefused(address, first.reason, first.message)
    if not isinstance(first, Welcome):
        raise ConnectFailed(
            f"server's first frame was {type(first).__name__}, expected Welcome (is {address} a "
            "tokenbridge-server of this version?)",
            stage="greeting",
        )
    return first


def connect_error_cause(exc: BaseException) -> BaseException:
    """The error worth reporting from a failed `trio.open_tcp_stream`.

    trio raises OSError("all attempts to connect to ... failed") from a group of the
    per-address errors (ConnectionRefusedError...): the first of those says what happened.
    """
    cause = exc.__cause__
    if type(exc) is OSError and exc.strerror is None and isinstance(cause, BaseExceptionGroup):
        leaves = [e for e in cause.exceptions if isinstance(e, OSError)]
        if leaves:
            return leaves[0]
    return exc


def describe_connect_error(exc: BaseException, address: Address) -> str:
    """A failed connection attempt (timeout, refused, unreachable, broken) in operator words."""
    exc = connect_error_cause(exc)
    if isinstance(exc, trio.TooSlowError):
        return f"timed out connecting to {address} (server down or a firewall drops packets)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {address} (is tokenbridge-server running and listening there?)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot reach {address}: {exc.strerror}"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return f"connection to {address} broke: {describe_handshake_error(exc.__cause__)}"
    return f"connection to {address} failed: {exc!r}"
