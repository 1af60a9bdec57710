"""Client-side errors. Each says what failed in words an operator can act on."""

from __future__ import annotations

from protocol.errors import BridgeError


class TunnelError(BridgeError):
    """The tunnel to the server is down or refused us."""


class TunnelDown(TunnelError):
    """No connection to the server right now (the operation cannot be carried out)."""


class TunnelRefused(TunnelError):
    """The server refused this client (its first frame said why)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"server refused this client: {reason}: {message}")
        self.reason = reason
        self.message = message


class LeaseError(TunnelError):
    """A lease could not be obtained or was lost (queue timeout, not allowed, revoked...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class CardFailure(TunnelError):
    """The server reported a reader-level failure for an exchange (never a status word)."""
