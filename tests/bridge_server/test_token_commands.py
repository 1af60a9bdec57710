"""Sessions and admins reach a TokenManager through one typed command per request
(bridge_server/tokens/commands.py), never a string `kind`."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing
from server_fakes import Client, FakeDevice, make_manager

from bridge_server.net.hub import Hub
from bridge_server.tokens import commands as cmds


def test_every_command_is_a_small_frozen_dataclass_with_only_the_fields_it_needs() -> None:
    fields = {c: tuple(f.name for f in dataclasses.fields(c)) for c in cmds.COMMAND_TYPES}
    assert fields == {
        cmds.RequestLease: ("sub", "batch"),  # batch: a LeaseExchange (issue 17)
        cmds.ReleaseLease: ("sub", "epoch"),
        cmds.SubmitFrame: ("sub", "epoch", "raw"),
        cmds.Wake: (),
        cmds.Shutdown: (),
        cmds.RevokeLease: (),
        cmds.ResetToken: (),
        cmds.CheckServerPin: ("actor", "reply"),
    }
    for command_type in cmds.COMMAND_TYPES:
        assert command_type.__dataclass_params__.frozen  # type: ignore[attr-defined]


async def test_each_request_puts_its_own_command_type_in_the_inbox() -> None:
    hub = Hub()
    manager = make_manager(hub, FakeDevice())  # not running: the commands stay in the inbox
    client = Client(hub, "vm1")
    await manager.request_lease(client.sub)
    await manager.release_lease(client.sub, 7)
    await manager.submit_frame(client.sub, 7, b"\x62" + bytes(9))
    await manager.revoke_lease()
    await manager.reset_token()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.shutdown)  # then waits for the leases to end: nobody runs them
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    manager.detach(client.sub.conn_id)
    queued = []
    with pytest.raises(trio.WouldBlock):
        while True:
            queued.append(manager._inbox.receive_nowait())
    assert queued == [
        cmds.RequestLease(client.sub),
        cmds.ReleaseLease(client.sub, 7),
        cmds.SubmitFrame(client.sub, 7, b"\x62" + bytes(9)),
        cmds.RevokeLease(),
        cmds.ResetToken(),
        cmds.Shutdown(),
        cmds.Wake(),
    ]
