"""The exception tree shared by every tokenbridge package.

One root (`BridgeError`). Protocol errors split by whose fault they are: `LocalProtocolError`
means *we* tried something illegal (a bug), `RemoteProtocolError` means the peer sent
something illegal and carries the close code we answer with. Card status words (63Cx,
6982...) are data, never exceptions.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Why a bridge connection was closed (sent in `Goodbye` and `Refused`)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    NOT_AUTHORIZED = 4
    HEARTBEAT_TIMEOUT = 5
    SHUTTING_DOWN = 6
    INTERNAL_ERROR = 7
    TOO_MANY_CONNECTIONS = 8
    REVOKED = 9
    TOO_MANY_REQUESTS = 10


class BridgeError(Exception):
    """Root of every deliberate tokenbridge exception."""


class ProtocolError(BridgeError):
    """A protocol rule was broken. Abstract: raise a Local or Remote subclass."""

    close_code: CloseCode

    def __init__(self, msg: str, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(msg)
        self.close_code = close_code

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.close_code))


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class MalformedFrameError(RemoteProtocolError):
    """A bridge frame could not be decoded."""


class MalformedCcidMessageError(RemoteProtocolError):
    """A CCID message could not be decoded (bad length, type or field)."""


class MalformedApduError(RemoteProtocolError):
    """An APDU could not be parsed."""


class MalformedAtrError(RemoteProtocolError):
    """An ATR is malformed (bad TS, truncated, wrong TCK, too long)."""


class T1Error(RemoteProtocolError):
    """The T=1 exchange failed beyond recovery (retries and resynchs exhausted)."""


class ConfigError(BridgeError):
    """A configuration file is wrong. Says which file, which key and what is wrong."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.key, self.problem))


class TlsSetupError(BridgeError):
    """Certificates, keys or CRLs could not be loaded or are unusable."""
