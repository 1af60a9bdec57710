"""F11: a wedged token (a card that keeps asking for more time, forever) is bounded by the CCID
driver's max wait, through the real server: the client gets an explicit CCID failure (never a
status word), the lease ends `device_error`, the VERIFY that was at the card counts as a PIN
attempt, and once the token is replugged the server serves it again.

The simulated token holds its answer behind CCID time-extension frames (CCID 1.1 §6.2.7) for
an hour. The product's driver caps one exchange at the token's `timeouts.max_s` (60 s by
default); the test configures 4 s, so the run stays short while the server, TLS, driver and
simulator are the real ones. The answer may take up to three caps: the exchange is cut at the
first, then the driver's recovery escalates (issue 15 item 6): a cold reset bounded by the
second, a CCID Abort bounded by the third, and a USB reset.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
from inproc import (
    SELECT_PIV,
    SW_OK,
    VERIFY_123456,
    Pki,
    apdu,
    open_lease,
    power_on,
    raw_client,
    running_server,
    wait_until,
)

from protocol import ccid, wire

MAX_WAIT_S = 4.0


async def _until(c: object, cls: type, seen: list[object]) -> object:
    while True:
        m = await c.receive()  # type: ignore[attr-defined]
        seen.append(m)
        if isinstance(m, wire.Ping):
            await c.send(wire.Pong(nonce=m.nonce))  # type: ignore[attr-defined]
        if isinstance(m, cls):
            return m


async def test_a_wedged_token_is_cut_at_the_drivers_max_wait_and_the_lease_ends_with_a_reason(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    seen: list[object] = []
    token = {
        "name": "codesign",
        "match": {"simulate": "yubikey5"},
        "allow": ["build-vm-01"],
        "timeouts": {"max_s": MAX_WAIT_S},
    }
    async with running_server(tmp_path, heartbeat_s=2.0, audit={"path": "audit.log"}, tokens=[token]) as (
        server,
        port,
    ):
        sim = server.tokens[0].simulated
        assert sim is not None
        async with raw_client(pki, port) as c:
            with trio.fail_after(60):
                granted = await open_lease(c)
                await power_on(c, granted.epoch, 0)
                assert (await apdu(c, granted.epoch, 1, SELECT_PIV))[-2:] == SW_OK
                sim.faults.delay_next_s = 3600.0  # wedged: time extensions for an hour
                sent = time.monotonic()
                msg = ccid.xfr_block(2, VERIFY_123456).encode()
                await c.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=msg))
                frame = await _until(c, wire.CcidFrame, seen)
                answered_after = time.monotonic() - sent
                ended = await _until(c, wire.LeaseEnded, seen)
        sim.unplug()  # the operator replugs the wedged token
        await wait_until(lambda: not server.tokens[0].present, what="absence", within=3 * MAX_WAIT_S)
        sim.replug()
        await wait_until(lambda: server.tokens[0].present, what="the token back", within=3 * MAX_WAIT_S)
        async with raw_client(pki, port) as again:
            with trio.fail_after(30):
                regranted = await open_lease(again)
                await power_on(again, regranted.epoch, 0)
                after = await apdu(again, regranted.epoch, 1, SELECT_PIV)

    assert isinstance(frame, wire.CcidFrame)
    answer = ccid.decode_message(frame.message)
    assert answer.seq == 2
    assert answer.command_status == ccid.CommandStatus.FAILED
    assert answer.data == b""  # an explicit reader failure, no status word
    assert MAX_WAIT_S - 0.5 <= answered_after <= 3 * MAX_WAIT_S + 3, answered_after
    assert isinstance(ended, wire.LeaseEnded)
    assert (ended.epoch, ended.reason) == (granted.epoch, wire.LeaseEndReason.DEVICE_ERROR)
    assert after[-2:] == SW_OK  # the server serves the token again
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    released = [(e["lease_epoch"], e["reason"]) for e in audit if e["event"] == "lease.released"]
    assert (granted.epoch, "device_error") in released
    verifies = [e for e in audit if e["event"] == "pin.verified" and e["lease_epoch"] == granted.epoch]
    assert [e["outcome"] for e in verifies] == ["failed"]  # the card may have counted it (P2)
