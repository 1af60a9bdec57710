"""The whole server over real TLS on loopback, with the simulator behind pyusb, per profile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from inproc import Pki, apdu, expect, raw_client

from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from protocol import ccid, wire
from protocol.errors import CloseCode
from protocol.runtime.framed import FramedConnection

PROFILES = ("safenet-5110", "yubikey5", "etoken-fusion", "epass2003")
SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")
VERIFY_123456 = bytes.fromhex("0020008008313233343536FFFF")
DIGEST = bytes(range(32))
# SP 800-73-4 GENERAL AUTHENTICATE, P-256 key 9D: 7C { 82 00, 81 20 <digest> }
SIGN_9D = bytes.fromhex("0087119D267C2482008120") + DIGEST + b"\x00"


def server_config(folder: Path, profile: str) -> Any:
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"},
        "tokens": [{"name": "codesign", "match": {"simulate": profile}, "allow": ["build-vm-01"]}],
    }
    return parse_server_config(doc, folder / "server.yaml")


@asynccontextmanager
async def running(folder: Path, profile: str) -> AsyncIterator[tuple[BridgeServer, int]]:
    server = BridgeServer(server_config(folder, profile))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.run)
        port = listeners[0].socket.getsockname()[1]
        try:
            yield server, port
        finally:
            server.request_shutdown()


@asynccontextmanager
async def connect(pki: Pki, port: int, stem: str) -> AsyncIterator[FramedConnection]:
    async with raw_client(pki, port, stem) as client:
        yield client


async def open_lease(client: FramedConnection) -> wire.LeaseGranted:
    assert isinstance(await client.receive(), wire.Welcome)
    await client.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="integration-test"))
    status = await expect(client, wire.TokenStatus)
    assert (status.present, status.allowed) == (True, True)
    await client.send(wire.LeaseRequest(token_id=0))
    return await expect(client, wire.LeaseGranted)


@pytest.mark.parametrize("profile", PROFILES)
async def test_sign_through_the_server_over_mutual_tls(profile: str, tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    with trio.fail_after(30):
        async with running(tmp_path, profile) as (server, port), connect(pki, port, "build-vm-01") as client:
            granted = await open_lease(client)
            power_on = ccid.icc_power_on(0).encode()
            await client.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=power_on))
            atr = ccid.decode_message((await expect(client, wire.CcidFrame)).message)
            assert atr.data == granted.atr
            selected = await apdu(client, granted.epoch, 1, SELECT_PIV)
            assert selected[-2:] == b"\x90\x00"
            assert selected[0] == 0x61  # SP 800-73-4 application property template
            assert await apdu(client, granted.epoch, 2, SIGN_9D) == b"\x69\x82"
            assert await apdu(client, granted.epoch, 3, VERIFY_123456) == b"\x90\x00"
            signature = await apdu(client, granted.epoch, 4, SIGN_9D)
            assert signature[-2:] == b"\x90\x00"
            assert signature[0] == 0x7C
            sim = server.tokens[0].simulated
            assert sim.current_epoch == granted.epoch
            await client.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
            assert (await expect(client, wire.LeaseEnded)).reason == "released"
            # A new lease starts from a cold-reset card: the PIN verified above is gone.
            await client.send(wire.LeaseRequest(token_id=0))
            second = await expect(client, wire.LeaseGranted)
            assert second.epoch > granted.epoch
            await apdu(client, second.epoch, 5, SELECT_PIV)
            assert await apdu(client, second.epoch, 6, SIGN_9D) == b"\x69\x82"


async def test_valid_certificate_allowed_nowhere_gets_a_reasoned_refusal(tmp_path: Path) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "stranger"))
    with trio.fail_after(30):
        async with running(tmp_path, "yubikey5") as (_server, port), connect(pki, port, "stranger") as client:
            refused = await client.receive()
            assert isinstance(refused, wire.Refused)
            assert refused.code is CloseCode.NOT_AUTHORIZED


async def test_shutdown_sends_lease_ended_and_goodbye(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    with trio.fail_after(30):
        async with (
            running(tmp_path, "yubikey5") as (server, port),
            connect(pki, port, "build-vm-01") as client,
        ):
            granted = await open_lease(client)
            server.request_shutdown()
            ended = await expect(client, wire.LeaseEnded)
            assert (ended.epoch, ended.reason) == (granted.epoch, "shutdown")
            bye = await expect(client, wire.Goodbye)
            assert bye.code is CloseCode.SHUTTING_DOWN
