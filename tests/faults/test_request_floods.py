"""A client that repeats what the server already refused (issue 13 item 3).

Two floods over real TLS against the in-process server with an audit log:
- a queued client re-sends `LeaseRequest`: duplicates cost no audit line, and a client that
  keeps at it is told `Goodbye(TOO_MANY_REQUESTS)` and disconnected;
- the holder sends commands the policy refuses: the first few are audited one by one, the
  rest are counted into one `command.refused_summary` line, and it is disconnected likewise.
The holder's latency under both floods is in bench/floods.py (docs/performance.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from inproc import Pki, expect, hello, open_lease, power_on, raw_client, running_server, wait_until

from bridge_server.guard.flood_limits import REFUSALS_AUDITED_PER_LEASE
from bridge_server.net.listener import TARPIT_S
from protocol import ccid, wire
from protocol.errors import CloseCode
from protocol.runtime.framed import FramedConnection

FLOOD = 500
PUT_DATA = bytes.fromhex("00DB3FFF055C035FC10A")  # PIV PUT DATA: refused for non-admins


def put_data(seq: int) -> bytes:
    return ccid.xfr_block(seq % 256, PUT_DATA).encode()


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Flood:
    """FLOOD messages sent with at most WINDOW unanswered (a client that reads its answers)."""

    WINDOW = 16

    def __init__(self, client: FramedConnection, msgs: list[object]) -> None:
        self.client = client
        self.msgs = msgs
        self.window = trio.Semaphore(self.WINDOW)
        self.seen: list[object] = []

    async def send(self) -> None:
        for msg in self.msgs:
            await self.window.acquire()
            try:
                await self.client.send(msg)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def goodbye(self) -> wire.Goodbye | None:
        """Read the answers until Goodbye, the end of the connection or all FLOOD answers."""
        with trio.fail_after(20):
            while True:
                try:
                    msg = await self.client.receive()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if isinstance(msg, wire.Goodbye):
                    return msg
                if isinstance(msg, wire.ConnectionClosed):
                    return None
                if isinstance(msg, wire.Ping):
                    await self.client.send(wire.Pong(nonce=msg.nonce))
                self.seen.append(msg)
                if isinstance(msg, wire.ErrorMessage):
                    self.window.release()
                    if sum(isinstance(m, wire.ErrorMessage) for m in self.seen) >= FLOOD:
                        return None  # every request was answered and the client is still connected

    async def run(self) -> wire.Goodbye | None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.send)
            goodbye = await self.goodbye()
            nursery.cancel_scope.cancel()
        return goodbye


async def test_duplicate_lease_requests_cost_no_audit_line_and_a_persistent_sender_is_disconnected(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "build-vm-02"))
    audit = tmp_path / "audit.jsonl"
    allow = ("build-vm-01", "build-vm-02")
    async with (
        running_server(tmp_path, heartbeat_s=5.0, allow=allow, audit={"path": str(audit)}) as (
            _,
            port,
        ),
        raw_client(pki, port) as holder,
        raw_client(pki, port, "build-vm-02") as flooder,
    ):
        await open_lease(holder)
        await hello(flooder)
        await flooder.send(wire.LeaseRequest(token_id=0))
        await expect(flooder, wire.LeaseQueued)
        before = len(audit_lines(audit))
        flood = Flood(flooder, [wire.LeaseRequest(token_id=0)] * FLOOD)
        goodbye, seen = await flood.run(), flood.seen
        new = audit_lines(audit)[before:]
    assert goodbye is not None and goodbye.code is CloseCode.TOO_MANY_REQUESTS, (
        goodbye,
        len(seen),
        seen[-3:],
    )
    assert [e for e in new if e["event"] == "lease.requested"] == []
    ejected = [e for e in new if e["event"] == "connection.ejected"]
    assert len(ejected) == 1 and ejected[0]["client_id"] == "build-vm-02", new
    refusals = [m for m in seen if isinstance(m, wire.ErrorMessage) and m.code == "already_leased"]
    assert 1 <= len(refusals) < FLOOD


async def test_refused_commands_are_audited_in_a_summary_and_a_persistent_holder_is_disconnected(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    audit = tmp_path / "audit.jsonl"
    async with running_server(tmp_path, heartbeat_s=5.0, audit={"path": str(audit)}) as (_server, port):
        async with raw_client(pki, port) as holder:
            granted = await open_lease(holder)
            await power_on(holder, granted.epoch)
            before = len(audit_lines(audit))
            frames = [
                wire.CcidFrame(
                    token_id=0, epoch=granted.epoch, message=ccid.xfr_block(i % 256, PUT_DATA).encode()
                )
                for i in range(1, FLOOD + 1)
            ]
            flood = Flood(holder, frames)
            goodbye, seen = await flood.run(), flood.seen

        def released() -> bool:
            return any(e["event"] == "lease.released" for e in audit_lines(audit)[before:])

        await wait_until(released, what="the lease to end", within=5)
        new = audit_lines(audit)[before:]
    assert goodbye is not None and goodbye.code is CloseCode.TOO_MANY_REQUESTS, (
        goodbye,
        len(seen),
        seen[-3:],
    )
    individual = [e for e in new if e["event"] == "command.refused"]
    summaries = [e for e in new if e["event"] == "command.refused_summary"]
    assert len(individual) == REFUSALS_AUDITED_PER_LEASE
    assert len(summaries) == 1, new
    refused = sum(1 for m in seen if isinstance(m, wire.ErrorMessage) and m.code == "command_refused")
    assert summaries[0]["count"] == refused - REFUSALS_AUDITED_PER_LEASE
    assert summaries[0]["reasons"] == {"policy": summaries[0]["count"]}
    assert len([e for e in new if e["event"] == "connection.ejected"]) == 1


async def test_an_ejected_client_is_refused_with_the_reason_when_it_reconnects(tmp_path: Path) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "build-vm-02"))
    allow = ("build-vm-01", "build-vm-02")
    async with running_server(tmp_path, heartbeat_s=5.0, allow=allow) as (server, port):
        server.hub.penalties.ban("build-vm-02", trio.current_time())
        async with raw_client(pki, port, "build-vm-02") as client:
            with trio.fail_after(TARPIT_S + 2):
                refused = await client.receive()
        async with raw_client(pki, port) as other:  # another identity is not affected
            assert isinstance(await other.receive(), wire.Welcome)
    assert isinstance(refused, wire.Refused), refused
    assert refused.code is CloseCode.TOO_MANY_REQUESTS
    assert "retry in" in refused.message
