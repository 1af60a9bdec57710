"""P5: `tokenbridge` admin commands over the network give up on a peer that accepts TCP and then
says nothing (a firewall black hole, a stuck or foreign server), with a reason, instead of
hanging. Found by reviewing the callers of `connect()` for tests/lint/test_deadline_lint.py: the
admin client was the one caller without a deadline."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import trio
from inproc import Pki

from bridge_admin import client as admin_client
from bridge_admin.client import AdminClientError, AdminSession, Target
from protocol.runtime.address import Address

DEADLINE_S = 0.5


async def test_an_admin_connection_to_a_silent_peer_fails_with_a_reason_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_client, "CONNECT_TIMEOUT_S", DEADLINE_S)
    Pki(tmp_path)
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)  # accepted, never read, never answered
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        target = Target(
            address=Address("127.0.0.1", port),
            server_name="localhost",
            cert=tmp_path / "build-vm-01.pem",
            key=tmp_path / "build-vm-01.key",
            ca=tmp_path / "ca.pem",
        )
        started = time.monotonic()
        with trio.fail_after(30), pytest.raises(AdminClientError) as caught:
            async with AdminSession(target):
                pass
        took = time.monotonic() - started
        nursery.cancel_scope.cancel()
    assert held, "the peer never saw the connection"
    assert "did not complete the TLS handshake" in str(caught.value)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert DEADLINE_S <= took < DEADLINE_S + 5
