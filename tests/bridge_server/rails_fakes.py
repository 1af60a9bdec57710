"""Helpers for the guardrail tests: a token manager over the simulator's PIV card, with an audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing
from server_fakes import LEASE, Client, FakeCard, FakeDevice

from bridge_server.config import PolicyConfig, TokenConfig, TokenMatch
from bridge_server.guard.audit import AuditLog
from bridge_server.guard.guardrails import Guardrails
from bridge_server.guard.pin_guard import PinGuard, PinGuardStore
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from bridge_server.tokens.manager import TokenManager
from protocol import ccid, wire

ATR = bytes.fromhex("3BD518008131FE7D8073C82110F4")
CANARY = "918273"  # a PIN that must never show up anywhere


def verify_apdu(pin: str) -> bytes:
    """SP 800-73-4 VERIFY of the PIV application PIN, padded with FF to 8 bytes."""
    return bytes.fromhex("0020008008") + pin.encode().ljust(8, b"\xff")


STATUS_QUERY = bytes.fromhex("00200080")
SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")


class PivDriver:
    """The simulator's PIV card as a `CardDriver`: a real retry counter behind the token task."""

    def __init__(self, card: PivCard) -> None:
        self.card = card
        self.commands: list[bytes] = []

    async def power_on(self) -> bytes:
        self.card.power_on()
        return ATR

    async def power_off(self) -> None:
        self.card.power_off()

    async def transmit(self, apdu: bytes) -> bytes:
        self.commands.append(apdu)
        return self.card.execute(apdu)

    async def slot_present(self) -> bool:
        return True


class PivDevice(FakeDevice):
    def __init__(self, card: PivCard) -> None:
        super().__init__(FakeCard())
        self.card = PivDriver(card)  # type: ignore[assignment]


def make_rails(
    tmp: Path,
    *,
    min_retries_left: int = 2,
    max_failures: int = 1,
    allow_management: tuple[str, ...] = (),
    audit_path: Path | None = None,
) -> Guardrails:
    guard = PinGuard(min_retries_left=min_retries_left, max_failures=max_failures)
    return Guardrails(
        "codesign",
        policy=PolicyConfig(allow_management=allow_management),
        guard=guard,
        store=PinGuardStore(tmp / "pin-guard.json"),
        audit=AuditLog(audit_path or tmp / "audit.jsonl", use_thread=False),
    )


def make_manager(hub: Hub, device: FakeDevice, rails: Guardrails) -> TokenManager:
    token = TokenConfig(
        name="codesign",
        match=TokenMatch(vid=0x0529, pid=0x0620),
        allow=("vm1", "vm2", "ops"),
        policy=rails.policy,
    )
    return TokenManager(0, token, LEASE, hub, device.open, first_epoch=1000, guardrails=rails)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def lease(manager: TokenManager, client: Client) -> int:
    await manager.request_lease(client.sub)
    await settle()
    granted = client.of_type(wire.LeaseGranted)
    assert len(granted) == 1, granted
    return int(granted[0].epoch)


async def apdu(manager: TokenManager, client: Client, epoch: int, command: bytes) -> tuple[bytes, list[Any]]:
    """Send one command APDU under the lease; (response APDU, other messages the client got)."""
    await manager.submit_frame(client.sub, epoch, ccid.xfr_block(1, command).encode())
    await settle()
    out = client.drain()
    frames = [m for m in out if isinstance(m, wire.CcidFrame)]
    assert len(frames) == 1, out
    return ccid.decode_message(frames[0].message).data, [m for m in out if not isinstance(m, wire.CcidFrame)]
