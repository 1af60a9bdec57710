"""F8: SIGTERM while an APDU is at the card (issue 18 item 6).

Through the real server and its real signal handler (`watch_signals`, as `serve_forever` runs
it), with the simulated token holding a signature for longer than the grace period: the client
gets an explicit CCID failure for the command in flight (bStatus "failed", never a status word
the card did not send), the lease ends `shutdown` (LeaseEnded and the audit), the card is
powered off, and all of it within the grace period plus the bounded cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import trio
from inproc import (
    SELECT_PIV,
    SIGN_9D,
    SW_OK,
    VERIFY_123456,
    Pki,
    apdu,
    open_lease,
    power_on,
    raw_client,
    server_config,
)

from bridge_server.app import BridgeServer, watch_signals
from bridge_server.tokens.manager import CLEANUP_TIMEOUT_S
from protocol import ccid, wire

GRACE_S = 1.0
SLOW_SIGN_S = 3.0  # longer than the grace period: the card is still busy when it ends


async def test_sigterm_with_a_signature_in_flight_fails_it_explicitly_and_powers_the_card_off(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    config = server_config(
        tmp_path, heartbeat_s=5.0, allow=("build-vm-01",), limits={"grace_period_s": GRACE_S},
        audit={"path": "audit.log"},
    )  # fmt: skip
    server = BridgeServer(config)
    received: list[object] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals, server)
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        sim = server.tokens[0].simulated
        assert sim is not None
        async with raw_client(pki, port) as c:
            with trio.fail_after(30):
                granted = await open_lease(c)
                await power_on(c, granted.epoch, 0)
                assert (await apdu(c, granted.epoch, 1, SELECT_PIV))[-2:] == SW_OK
                assert await apdu(c, granted.epoch, 2, VERIFY_123456) == SW_OK
                offs_before = sim.evidence.power_offs
                sim.faults.slow_sign_s = SLOW_SIGN_S
                msg = ccid.xfr_block(3, SIGN_9D).encode()
                await c.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=msg))
                signatures = sim.evidence.signatures
                while sim.evidence.signatures == signatures:  # noqa: ASYNC110 -- the card's own thread
                    await trio.sleep(0.01)
                sent_at = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
                failed_within = float("inf")
                try:
                    while True:
                        m = await c.receive()
                        received.append(m)
                        if isinstance(m, wire.CcidFrame):
                            failed_within = time.monotonic() - sent_at
                        if isinstance(m, wire.Goodbye | wire.ConnectionClosed):
                            break
                except trio.BrokenResourceError:
                    pass
    stopped_within = time.monotonic() - sent_at
    frames = [ccid.decode_message(m.message) for m in received if isinstance(m, wire.CcidFrame)]
    assert len(frames) == 1, received
    (answer,) = frames
    assert answer.seq == 3
    assert (answer.command_status, answer.error) == (ccid.CommandStatus.FAILED, ccid.SlotError.CMD_ABORTED)
    assert answer.data == b""  # no status word of any kind
    kinds = [type(m).__name__ for m in received]
    assert kinds[-3:] == ["CcidFrame", "LeaseEnded", "Goodbye"], kinds  # the cause before the farewell
    ended = [m for m in received if isinstance(m, wire.LeaseEnded)]
    assert [(e.epoch, e.reason) for e in ended] == [(granted.epoch, "shutdown")]
    assert failed_within < GRACE_S  # abandoned at half the grace period, not when the card is done
    assert stopped_within < GRACE_S + CLEANUP_TIMEOUT_S
    assert sim.evidence.power_offs > offs_before  # powered off once the card had finished
    assert sim.evidence.events[-1][0] == "power_off"
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    released = [e for e in audit if e["event"] == "lease.released"]
    assert [(e["lease_epoch"], e["reason"]) for e in released] == [(granted.epoch, "shutdown")]


async def test_a_verify_abandoned_at_shutdown_counts_as_a_pin_attempt(tmp_path: Path) -> None:
    """P2: the card may have counted the PIN; the guard must count it too (answer lost = tried)."""
    pki = Pki(tmp_path)
    config = server_config(
        tmp_path, heartbeat_s=5.0, allow=("build-vm-01",), limits={"grace_period_s": GRACE_S},
        audit={"path": "audit.log"},
    )  # fmt: skip
    server = BridgeServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals, server)
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        sim = server.tokens[0].simulated
        assert sim is not None
        async with raw_client(pki, port) as c:
            with trio.fail_after(30):
                granted = await open_lease(c)
                await power_on(c, granted.epoch, 0)
                assert (await apdu(c, granted.epoch, 1, SELECT_PIV))[-2:] == SW_OK
                attempts = sim.evidence.pin_attempts
                sim.faults.delay_next_s = SLOW_SIGN_S  # the card answers the VERIFY late
                msg = ccid.xfr_block(2, VERIFY_123456).encode()
                await c.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=msg))
                while sim.evidence.pin_attempts == attempts:  # noqa: ASYNC110 -- the card's own thread
                    await trio.sleep(0.01)
                os.kill(os.getpid(), signal.SIGTERM)
                frame = None
                while frame is None:
                    m = await c.receive()
                    if isinstance(m, wire.CcidFrame):
                        frame = ccid.decode_message(m.message)
    assert frame is not None and frame.error == ccid.SlotError.CMD_ABORTED and frame.data == b""
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    pins = [(e["sw"], e["client_id"]) for e in audit if e["event"] == "pin.verified"]
    assert pins == [("6F00", "build-vm-01")]  # counted, with no answer to go by
