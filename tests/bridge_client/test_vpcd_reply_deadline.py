"""P5: a pcscd that stops taking the card side's replies is dropped at a deadline, not waited on
forever (found by tests/lint/test_deadline_lint.py). The vpcd connection here has flow control
(a lockstep stream: a write waits until the other side reads), so a reader that sends GET_ATR
and never reads the answer really blocks the link's write."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from client_fakes import Certs, FakeVpcd, LockstepNet, open_tunnel
from structlog.testing import capture_logs

from bridge_client.backoff import Backoff
from bridge_client.vpcd_link import VPCD_REPLY_TIMEOUT_S, VpcdLink
from protocol.vpcd import VpcdControl


async def test_a_pcscd_that_stops_reading_replies_is_dropped_at_the_deadline_and_reconnected(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, _server, _ = await open_tunnel(nursery, certs)
    net = LockstepNet()
    link = VpcdLink(
        tunnel, "codesign", backoff=Backoff(initial_s=0.25, max_s=2.0, jitter=0.0), open_stream=net
    )
    with capture_logs() as logs:
        await nursery.start(link.run)
        stuck = FakeVpcd(await net.accept())
        await stuck.control(VpcdControl.GET_ATR)  # and never reads the ATR
        sent = trio.current_time()
        with trio.fail_after(VPCD_REPLY_TIMEOUT_S + 5):  # before the tunnel's heartbeat runs out
            again = await net.accept()  # the link gave up on it and connected again
        gave_up_after = trio.current_time() - sent
        atr = await FakeVpcd(again).get_atr()
    removed: list[dict[str, Any]] = [e for e in logs if e["event"] == "reader.removed"]
    assert [e["reason"] for e in removed] == [
        f"vpcd connection error: vpcd did not take our reply within {VPCD_REPLY_TIMEOUT_S:g} s"
    ]
    assert VPCD_REPLY_TIMEOUT_S <= gave_up_after <= VPCD_REPLY_TIMEOUT_S + 2.0  # + the reconnect backoff
    assert atr  # the new connection works
