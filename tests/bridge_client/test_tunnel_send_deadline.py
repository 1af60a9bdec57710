"""P5: a server that stops reading cannot hold the tunnel's receive loop forever.

Found by tests/lint/test_deadline_lint.py: answering a server Ping (or handing back an unwanted
lease) sends from inside the receive loop, outside its silence deadline. Over a flow-controlled
connection (a lockstep stream: a write waits until the far end reads), a server that sends a
Ping and then reads nothing blocks that Pong. The tunnel must give up after the same silence
bound as for a server that says nothing (MISSED_HEARTBEATS intervals) and connect again.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from client_fakes import Certs, FakeServer, LockstepNet, make_tunnel
from structlog.testing import capture_logs

from bridge_client.tunnel import MISSED_HEARTBEATS
from protocol import wire

HEARTBEAT_S = 10.0


async def test_a_server_that_stops_reading_is_given_up_after_the_heartbeat_bound(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    net = LockstepNet()
    tunnel = make_tunnel(certs, net)
    with capture_logs() as logs:
        await nursery.start(tunnel.run)
        server = await FakeServer.accept(net, certs.server_ctx())  # type: ignore[arg-type]
        await server.welcome(heartbeat=HEARTBEAT_S)
        await server.send(wire.Ping(nonce=7))  # and from now on reads nothing: the Pong blocks
        stalled_at = trio.current_time()
        bound = MISSED_HEARTBEATS * HEARTBEAT_S
        with trio.fail_after(bound + 10):
            await net.accept()  # the tunnel gave up and connected again
        reconnected_after = trio.current_time() - stalled_at
    lost: list[dict[str, Any]] = [e for e in logs if e["event"] == "tunnel.heartbeat_lost"]
    assert len(lost) == 1
    assert bound <= reconnected_after <= bound + 2.0  # + the first reconnect backoff (1 s)
    down = [e for e in logs if e["event"] == "tunnel.disconnected"]
    assert down and "took nothing we sent" in down[0]["reason"]
