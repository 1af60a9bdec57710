"""What the tunnel knows (token table, its own status) and how connection failures read.

Split out of tunnel.py so the connection loop stays readable; everything here is plain data.
How a failed connection reads is `protocol.runtime.connect.describe_connect_error`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass
class TokenState:
    """What this client knows about one remote token."""

    name: str
    token_id: int | None = None
    present: bool = False
    allowed: bool = False
    atr: bytes = b""
    server_state: str = ""
    epoch: int | None = None
    queue_position: int | None = None
    lease_since: float | None = None
    # Incremented whenever a lease we held ended for a reason other than our own release.
    lost_generation: int = 0

    @property
    def usable(self) -> bool:
        return self.token_id is not None and self.present and self.allowed and 1 <= len(self.atr) <= 33


class Pending:
    """One outstanding request answered by the receive loop."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def resolve(self, value: object) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    async def wait(self) -> object:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class TunnelStatus:
    state: str = "starting"  # starting, connecting, connected, retrying, refused
    reason: str = ""
    server: str = ""
    identity: str = ""
    connected_since: float | None = None
    rtt_ms: float | None = None
    attempts: int = 0
    connects: int = 0  # attempts that reached Welcome (for /metrics: reconnects = connects - 1)
