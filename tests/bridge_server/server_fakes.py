"""Fakes for the server's async tests: a card that remembers a verified PIN, and helpers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import trio

from bridge_server.config import LeaseConfig, TokenConfig, TokenMatch
from bridge_server.errors import DeviceError, DeviceGoneError, DeviceNotFoundError
from bridge_server.net.hub import Hub, Subscriber
from bridge_server.tokens.device import OpenedCard
from bridge_server.tokens.manager import TokenManager
from protocol.runtime.tls import PeerIdentity

ATR = bytes.fromhex("3BD518008131FE7D8073C82110F4")
PIN = bytes.fromhex("3132333435360000")
VERIFY = bytes.fromhex("0020008008") + PIN
SIGN = bytes.fromhex("00870780") + b"\x04\x7c\x02\x82\x00" + b"\x00"
SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")
SW_OK = b"\x90\x00"
SW_SECURITY_NOT_SATISFIED = b"\x69\x82"


class FakeCard:
    """A card driver that records calls; VERIFY sets volatile state that only a reset clears."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.verified = False
        self.gone = False
        self.fail_next: DeviceError | None = None
        self.block: trio.Event | None = None  # transmit waits on it when set

    async def power_on(self) -> bytes:
        self._check_gone()
        self.calls.append("power_on")
        self.verified = False
        return ATR

    async def power_off(self) -> None:
        self._check_gone()
        self.calls.append("power_off")
        self.verified = False

    async def transmit(self, apdu: bytes) -> bytes:
        self._check_gone()
        self.calls.append(("transmit", apdu))
        if self.block is not None:
            await self.block.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if apdu[1] == 0x20:
            self.verified = apdu[5:] == PIN
            return SW_OK if self.verified else b"\x63\xc2"
        if apdu[1] == 0x87:
            return b"\x7c\x00" + SW_OK if self.verified else SW_SECURITY_NOT_SATISFIED
        return SW_OK

    async def slot_present(self) -> bool:
        self._check_gone()
        return True

    def _check_gone(self) -> None:
        if self.gone:
            raise DeviceGoneError("usb device 0529:0620 serial 'SER1' is gone")


class FakeDevice:
    """What the opener finds: `None` (absent) or a card with a serial."""

    def __init__(self, card: FakeCard | None = None, serial: str = "SER1") -> None:
        self.card = card if card is not None else FakeCard()
        self.serial = serial
        self.plugged = True
        self.opens = 0
        self.closes = 0

    async def open(self) -> OpenedCard:
        if not self.plugged:
            raise DeviceNotFoundError("no device")
        self.opens += 1
        self.card.gone = False

        async def close() -> None:
            self.closes += 1

        return OpenedCard(driver=self.card, serial=self.serial, close=close)

    def unplug(self) -> None:
        self.plugged = False
        self.card.gone = True


def identity(name: str) -> PeerIdentity:
    return PeerIdentity(
        name=name, names=(name,), fingerprint_sha256="00" * 32, not_after=datetime(2100, 1, 1, tzinfo=UTC)
    )


class Client:
    """A subscriber with an inspectable outbox."""

    def __init__(self, hub: Hub, name: str, *, capacity: int = 64, admin: bool = False) -> None:
        self.send, self.inbox = trio.open_memory_channel[Any](capacity)
        self.sub = Subscriber(hub.next_conn_id(), identity(name), self.send, admin=admin)
        hub.add(self.sub)

    def drain(self) -> list[Any]:
        out = []
        while True:
            try:
                out.append(self.inbox.receive_nowait())
            except trio.WouldBlock:
                return out

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in self.drain() if isinstance(m, cls)]


LEASE = LeaseConfig(linger_s=2.0, idle_timeout_s=60.0, max_hold_s=1800.0, queue_timeout_s=900.0)


def make_manager(
    hub: Hub,
    device: FakeDevice,
    *,
    allow: tuple[str, ...] = ("vm1", "vm2"),
    lease: LeaseConfig = LEASE,
    opener: Callable[[], Any] | None = None,
) -> TokenManager:
    token = TokenConfig(name="codesign", match=TokenMatch(vid=0x0529, pid=0x0620), allow=allow)
    return TokenManager(0, token, lease, hub, opener or device.open, first_epoch=1000)
