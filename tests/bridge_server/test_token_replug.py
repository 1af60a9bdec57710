"""F5 / F6: replug under a verified lease, and a different token in its place (issue 18 item 7).

Through the real server over mutual TLS, with the simulated token behind the pyusb backend:
unplugging it under a lease whose PIN was verified ends the lease with `token_gone`; after the
replug the client must lease again and the card wants the PIN again (6982 on a signature
without VERIFY). A token with another serial plugged in where it was is refused, and that shows
in status (a warning and `refused_device`) and metrics (`tokenbridge_token_refused_device`), not
only in the log; the flag clears when the right token is back.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from inproc import (
    SELECT_PIV,
    SIGN_9D,
    SW_OK,
    SW_SECURITY_NOT_SATISFIED,
    VERIFY_123456,
    Pki,
    apdu,
    expect,
    hello,
    open_lease,
    power_on,
    raw_client,
    running_server,
    wait_until,
)

from bridge_server.app import BridgeServer
from bridge_server.observe.metrics import server_rows
from bridge_server.observe.status import build_status
from protocol import wire

ABSENCE_BOUND_S = 2.0  # reliability-anchors F5: absence detected within 2 s


def refused_flag(server: BridgeServer) -> float:
    return next(v for n, v, _ in server_rows(server) if n == "tokenbridge_token_refused_device")


async def test_replug_under_a_verified_lease_ends_it_and_the_card_wants_the_pin_again(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path, heartbeat_s=5.0) as (server, port), raw_client(pki, port) as c:
        with trio.fail_after(30):
            first = await open_lease(c)
            await power_on(c, first.epoch, 0)
            assert (await apdu(c, first.epoch, 1, SELECT_PIV))[-2:] == SW_OK
            assert await apdu(c, first.epoch, 2, VERIFY_123456) == SW_OK
            assert (await apdu(c, first.epoch, 3, SIGN_9D))[-2:] == SW_OK
            sim = server.tokens[0].simulated
            assert sim is not None
            start = trio.current_time()
            sim.unplug()
            ended = await expect(c, wire.LeaseEnded)
            detected_after = trio.current_time() - start
            sim.replug()
            await wait_until(lambda: server.tokens[0].present, what="the token back", within=5)
            await c.send(wire.LeaseRequest(token_id=0))
            second = await expect(c, wire.LeaseGranted)
            await power_on(c, second.epoch, 4)
            assert (await apdu(c, second.epoch, 5, SELECT_PIV))[-2:] == SW_OK
            after = await apdu(c, second.epoch, 6, SIGN_9D)
    assert (ended.epoch, ended.reason) == (first.epoch, "token_gone")
    assert detected_after <= ABSENCE_BOUND_S
    assert second.epoch != first.epoch
    assert after == SW_SECURITY_NOT_SATISFIED


async def test_a_different_serial_in_the_tokens_port_is_refused_and_flagged_in_status_and_metrics(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path)
    async with (
        running_server(tmp_path, heartbeat_s=5.0, audit={"path": "audit.log"}) as (server, port),
        raw_client(pki, port) as c,
    ):
        with trio.fail_after(30):
            await hello(c)
            sim = server.tokens[0].simulated
            assert sim is not None
            original = sim.serial
            assert build_status(server)["tokens"][0]["refused_device"] is None
            assert refused_flag(server) == 0
            sim.unplug()
            await wait_until(
                lambda: not server.tokens[0].present, what="absence", within=ABSENCE_BOUND_S + 0.5
            )
            sim.replug(serial="IMPOSTOR-1")
            await wait_until(
                lambda: server.tokens[0].device.refused_serial is not None, what="the refusal", within=5
            )
            doc = build_status(server)
            flag = refused_flag(server)
            await c.send(wire.LeaseRequest(token_id=0))
            await trio.sleep(1.5)  # a few presence polls: the impostor must never be granted
            assert not server.tokens[0].present
            assert server.tokens[0].book.holder is None
            sim.unplug()
            sim.replug(serial=original)
            await wait_until(lambda: server.tokens[0].present, what="the right token back", within=5)
            cleared = build_status(server)
            cleared_flag = refused_flag(server)
    token = doc["tokens"][0]
    assert (token["refused_device"], token["present"], token["state"]) == ("IMPOSTOR-1", False, "absent")
    assert any("IMPOSTOR-1" in w["message"] and "refused" in w["message"] for w in doc["warnings"])
    assert flag == 1
    assert cleared["tokens"][0]["refused_device"] is None
    assert not any("IMPOSTOR-1" in w["message"] for w in cleared["warnings"])
    assert cleared_flag == 0
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    refused = [e for e in audit if e["event"] == "token.refused"]
    assert [(e["device"], e["expected"]) for e in refused] == [("IMPOSTOR-1", original)]
