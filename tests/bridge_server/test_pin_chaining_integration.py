"""The chained wrong-PIN attack (issue 13 item 1) through the whole server over real TLS.

With `pin_guard: {min_retries_left: 0, max_failures: 3}` (a valid config) the attack used to
lock the simulated card (3 retries) while the audit recorded `pin.verified outcome=ok` three
times. Now the chained chunk is refused before the card, for a client and for an admin alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from inproc import Pki, apdu, expect, open_lease, power_on, raw_client, running_server

from protocol import wire
from protocol.runtime.framed import FramedConnection

CANARY = "918273"
WRONG_PIN_CHAINED = bytes.fromhex("1020008008") + CANARY.encode().ljust(8, b"\xff")
LAST_CHUNK = bytes.fromhex("00200080")  # data-less: the chain's end, or a status query
SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")


async def refused(client: FramedConnection, epoch: int, seq: int, command: bytes) -> bytes:
    """The answer to a command the server refuses, after checking the ErrorMessage that follows it."""
    answer = await apdu(client, epoch, seq, command)
    error = await expect(client, wire.ErrorMessage)
    assert error.code == "command_refused"
    assert "chained PIN command" in error.message and "one APDU" in error.message
    return answer


@pytest.mark.parametrize("stem", ["build-vm-01", "ops-laptop"], ids=["client", "admin"])
async def test_a_chained_wrong_pin_is_refused_before_the_card_and_audited_as_refused(
    tmp_path: Path, stem: str
) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "ops-laptop"))
    audit = tmp_path / "audit.jsonl"
    extra = {
        "admins": ["ops-laptop"],
        "pin_guard": {"min_retries_left": 0, "max_failures": 3},
        "audit": {"path": str(audit)},
    }
    allow = ("build-vm-01", "ops-laptop")
    with trio.fail_after(30):
        async with running_server(tmp_path, allow=allow, **extra) as (server, port):
            card = server.tokens[0].simulated.card
            retries = card.pin_retries_left
            async with raw_client(pki, port, stem) as client:
                epoch = (await open_lease(client)).epoch
                await power_on(client, epoch)
                assert (await apdu(client, epoch, 1, SELECT_PIV))[-2:] == b"\x90\x00"
                for seq in range(2, 2 * retries + 4, 2):
                    assert await refused(client, epoch, seq, WRONG_PIN_CHAINED) == b"\x68\x84"
                    status = await apdu(client, epoch, seq + 1, LAST_CHUNK)
                    assert status == bytes((0x63, 0xC0 | retries))  # a status query: nothing spent
                await client.send(wire.LeaseRelease(token_id=0, epoch=epoch))
            assert card.pin_retries_left == retries  # the simulator's counter never moved
            assert card.counters.pin_attempts == 0
    text = audit.read_text()
    assert CANARY not in text and CANARY.encode().hex() not in text.lower()
    lines = [json.loads(x) for x in text.splitlines()]
    assert not [e for e in lines if e["event"] == "pin.verified" and e["outcome"] == "ok"]
    refusals = [e for e in lines if e["event"] == "command.refused"]
    assert len(refusals) == retries + 1
    assert {(e["reason"], e["sw"], e["client_id"]) for e in refusals} == {("pin_chaining", "6884", stem)}
