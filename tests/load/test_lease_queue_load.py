"""50 clients queueing for one token with random cancellation (reliability-anchors §7.4 L3, S9).

Two levels: the real TokenManager + Hub with a fake card under a MockClock (many seeds, fast),
and the whole server over real TLS with 50 real connections that randomly hang up.
Invariants: at most one holder at any instant; every grant goes to a live waiter; live waiters
are granted in the order they asked (FIFO); nobody is left waiting at the end.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from inproc import Pki, expect, hello, raw_client, running_server, wait_until
from server_fakes import Client, FakeDevice, make_manager

from bridge_server.net.hub import Hub
from bridge_server.tokens.leases import EndReason
from protocol import wire

N_CLIENTS = 50


class QueueModel:
    """What the server should do, from what the test did: live waiters in request order."""

    def __init__(self) -> None:
        self.waiting: list[int] = []
        self.holder: int | None = None
        self.dead: set[int] = set()


def hang_up(hub: Hub, manager: Any, client: Client) -> None:
    """What the session does when a connection goes away."""
    client.sub.closed = True
    manager.detach(client.sub.conn_id, EndReason.DISCONNECTED)
    hub.remove(client.sub)


def check_grants(clients: list[Client], model: QueueModel, grants: list[tuple[int, int]]) -> None:
    """Apply the grants seen since the last step to the model, asserting the invariants."""
    for index, _epoch in grants:
        assert model.holder is None, f"client {index} granted while {model.holder} still holds the lease"
        assert index not in model.dead, f"lease granted to cancelled waiter {index}"
        assert model.waiting and model.waiting[0] == index, f"FIFO broken: {index} before {model.waiting[:3]}"
        model.waiting.pop(0)
        model.holder = index


def collect(clients: list[Client]) -> list[tuple[int, int]]:
    out = []
    for index, client in enumerate(clients):
        for msg in client.drain():
            if isinstance(msg, wire.LeaseGranted):
                out.append((index, msg.epoch))
    return out


@pytest.mark.parametrize("seed", range(5))
async def test_50_waiters_with_random_cancellation_are_served_fifo_and_only_while_alive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    rng = random.Random(seed)
    hub, device = Hub(), FakeDevice()
    names = tuple(f"vm{i}" for i in range(N_CLIENTS))
    manager = make_manager(hub, device, allow=names)
    await nursery.start(manager.run)
    clients = [Client(hub, name, capacity=256) for name in names]
    model = QueueModel()
    epochs: dict[int, int] = {}
    for index, client in enumerate(clients):
        model.waiting.append(index)
        await manager.request_lease(client.sub)
        await trio.testing.wait_all_tasks_blocked()
        for granted_index, epoch in collect(clients):
            check_grants(clients, model, [(granted_index, epoch)])
            epochs[granted_index] = epoch
    served = 0
    while model.holder is not None:
        holder = model.holder
        # Random cancellations among the waiters, then the holder ends one way or another.
        for index in list(model.waiting):
            if rng.random() < 0.08:
                hang_up(hub, manager, clients[index])
                model.dead.add(index)
                model.waiting.remove(index)
        if rng.random() < 0.2:
            hang_up(hub, manager, clients[holder])
            model.dead.add(holder)
        else:
            await manager.release_lease(clients[holder].sub, epochs[holder])
        model.holder = None
        served += 1
        await trio.testing.wait_all_tasks_blocked()
        for index, epoch in collect(clients):
            assert epoch > max(epochs.values()), "epochs must only grow"
            check_grants(clients, model, [(index, epoch)])
            epochs[index] = epoch
    assert model.waiting == [], f"orphaned waiters: {model.waiting}"
    assert manager.book.holder is None and not manager.book.waiting
    assert served == N_CLIENTS - sum(1 for i in model.dead if i not in epochs)
    assert len(epochs) == served


async def test_50_real_connections_queue_and_hang_up_at_random(tmp_path: Path) -> None:
    """The same over real TLS: waiters that close their connection never get the lease."""
    names = tuple(f"vm{i:02d}" for i in range(N_CLIENTS))
    pki = Pki(tmp_path, clients=names)
    rng = random.Random(7)
    granted: list[tuple[str, int]] = []
    hung_up: set[str] = set()
    order: list[str] = []

    go = trio.Event()  # the first holder keeps the lease until everyone queued and some hung up

    async def waiter(name: str, queued: trio.Event, cancel_scope_out: dict[str, trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            cancel_scope_out[name] = scope
            async with raw_client(pki, port, stem=name) as client:
                await hello(client)
                await client.send(wire.LeaseRequest(token_id=0))
                order.append(name)
                first = await expect(client, wire.LeaseQueued | wire.LeaseGranted)
                queued.set()
                msg = (
                    first if isinstance(first, wire.LeaseGranted) else await expect(client, wire.LeaseGranted)
                )
                assert name not in hung_up, f"{name} got the lease after hanging up"
                granted.append((name, msg.epoch))
                await go.wait()
                await client.send(wire.LeaseRelease(token_id=0, epoch=msg.epoch))
                await expect(client, wire.LeaseEnded)

    async with running_server(tmp_path, heartbeat_s=1.0, allow=names) as (server, port):
        scopes: dict[str, trio.CancelScope] = {}
        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for name in names:  # connect one by one so the queue order is known
                queued = trio.Event()
                nursery.start_soon(waiter, name, queued, scopes)
                with trio.fail_after(10):
                    await queued.wait()
            for name in names[1:]:
                if rng.random() < 0.3:
                    hung_up.add(name)
                    scopes[name].cancel()  # closes the TCP connection: the server drops the waiter
            go.set()
        elapsed = time.monotonic() - start
        await wait_until(lambda: not server.tokens[0].book.waiting, what="empty queue", within=5)
    live = [n for n in order if n not in hung_up]
    assert [n for n, _ in granted] == live  # FIFO among live waiters, nobody skipped
    epochs = [e for _, e in granted]
    assert epochs == sorted(set(epochs))  # one holder at a time: fresh epoch each
    assert elapsed < 30
