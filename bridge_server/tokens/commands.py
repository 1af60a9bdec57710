"""What a session or an admin asks of a `TokenManager`: one small frozen type per request.

The manager's inbox carries exactly these (`Command`); `TokenManager._handle` dispatches on the
type, so each command holds only the fields it needs and a new request is a new type that mypy
makes the loop handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import trio

from bridge_server.net.hub import Subscriber
from protocol.speculation import LeaseExchange

__all__ = [
    "COMMAND_TYPES",
    "CheckServerPin",
    "Command",
    "ReleaseLease",
    "RequestLease",
    "ResetToken",
    "RevokeLease",
    "Shutdown",
    "SubmitFrame",
    "Wake",
]


@dataclass(frozen=True, slots=True)
class RequestLease:
    """The client's `LeaseRequest`, or its `LeaseExchange` (`batch`: run once granted)."""

    sub: Subscriber
    batch: LeaseExchange | None = None


@dataclass(frozen=True, slots=True)
class ReleaseLease:
    """The client's `LeaseRelease` of the lease with `epoch`."""

    sub: Subscriber
    epoch: int


@dataclass(frozen=True, slots=True)
class SubmitFrame:
    """One CCID message (`raw`, still encoded) under the lease with `epoch`."""

    sub: Subscriber
    epoch: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do but look at the pending detaches (sent by the sync `detach`)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """End every lease with `shutdown`, power the card off, stop the loop."""


@dataclass(frozen=True, slots=True)
class RevokeLease:
    """Admin: end the current lease with `revoked`."""


@dataclass(frozen=True, slots=True)
class ResetToken:
    """Admin: end the lease, release the USB device and open it again."""


@dataclass(frozen=True, slots=True)
class CheckServerPin:
    """Admin (`tokenbridge pin test`): check the server-held PIN against the card while nobody
    holds a lease (bridge_server/tokens/pin_check.py); the answer goes to `reply`."""

    actor: str
    reply: trio.MemorySendChannel[dict[str, Any]]


Command: TypeAlias = (
    RequestLease | ReleaseLease | SubmitFrame | Wake | Shutdown | RevokeLease | ResetToken | CheckServerPin
)
COMMAND_TYPES: Final[tuple[type[Command], ...]] = (
    RequestLease,
    ReleaseLease,
    SubmitFrame,
    Wake,
    Shutdown,
    RevokeLease,
    ResetToken,
    CheckServerPin,
)
SessionCommand: TypeAlias = RequestLease | ReleaseLease | SubmitFrame
