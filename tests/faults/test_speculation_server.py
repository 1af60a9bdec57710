"""Verified speculation (issue 17) on the real server over mutual TLS, with the simulated card.

The application is the vpcd side of the real client (Tunnel + VpcdLink) or a bare wire client;
the card's own evidence (which epoch sent which instruction) proves what reached it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.testing
from inproc import (
    SELECT_PIV,
    SW_OK,
    VERIFY_123456,
    Pki,
    apdu,
    expect,
    hello,
    make_tunnel,
    open_lease,
    raw_client,
    running_server,
    wait_until,
)

from bridge_client.vpcd_link import VpcdLink
from protocol import NEED_DATA, ccid, wire
from protocol.runtime.framed import FramedConnection
from protocol.vpcd import Response, VpcdControl, VpcdReaderSide

GET_CHUID = bytes.fromhex("00CB3FFF055C035FC10200")
GET_CERT_9A = bytes.fromhex("00CB3FFF055C035FC10500")  # Le 256: a long object, answered 61xx
NEW_CHUID = bytes.fromhex("00DB3FFF0E5C035FC1025307300100340112FE")  # PUT DATA: a renewed object
LEASE = {"linger_s": 0.05, "idle_timeout_s": 60.0}
SIGNER, OPS = "build-vm-01", "ops-laptop"


class _VpcdSlot:
    """The vpcd side of one slot: the link connects to it, the test plays the application."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](4)

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:  # VpcdLink.open_stream
        near, far = trio.testing.memory_stream_pair()
        await self._send.send(far)
        return near

    async def inserted(self) -> _App:
        return _App(await self._receive.receive())


class _App:
    """An application's APDUs through pcscd, as vpcd hands them to the card side."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream, self.reader = stream, VpcdReaderSide()

    async def control(self, code: VpcdControl) -> None:
        await self.stream.send_all(self.reader.send_control(code))

    async def transmit(self, command: bytes) -> bytes | None:
        """The answer, or None when the card was removed instead (the connection closed)."""
        await self.stream.send_all(self.reader.send_apdu(command))
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                self.reader.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            return event.data if isinstance(event, Response) else None


async def _taught(client: FramedConnection) -> wire.SpeculationPaths:
    while True:
        msg = await client.receive()
        if isinstance(msg, wire.SpeculationPaths):
            return msg
        if isinstance(msg, wire.Ping):
            await client.send(wire.Pong(nonce=msg.nonce))


async def _learn_a_path(client: FramedConnection, *commands: bytes) -> wire.SpeculationPaths:
    """One lease that sends `commands` and releases; the paths the server teaches after it."""
    granted = await open_lease(client)
    for seq, command in enumerate(commands):
        await apdu(client, granted.epoch, seq, command)
    await client.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
    await expect(client, wire.LeaseEnded)
    return await _taught(client)


def _instructions(server: Any, epoch: int) -> list[int]:
    return [r.ins for r in server.tokens[0].simulated.evidence.apdus if r.epoch == epoch]


async def test_a_lease_teaches_only_the_plain_reads_before_the_first_verify(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path, lease=LEASE) as (_, port), raw_client(pki, port) as client:
        granted = await open_lease(client)
        select = await apdu(client, granted.epoch, 0, SELECT_PIV)
        chuid = await apdu(client, granted.epoch, 1, GET_CHUID)
        assert await apdu(client, granted.epoch, 2, VERIFY_123456) == SW_OK
        after_pin = await apdu(client, granted.epoch, 3, GET_CHUID)  # the same read, after a PIN
        await client.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
        taught = await _taught(client)
    assert taught.paths == (((SELECT_PIV, select), (GET_CHUID, chuid)),)
    steps = [step for path in taught.paths for step in path]
    assert all(command[1] != 0x20 for command, _ in steps)  # no VERIFY, not even its status word
    assert len(steps) == 2 and after_pin == chuid  # the read after the PIN is not on the path


async def test_a_long_answer_comes_with_its_get_response_chain_already_fetched(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path, lease=LEASE) as (server, port), raw_client(pki, port) as client:
        granted = await open_lease(client)
        await apdu(client, granted.epoch, 0, SELECT_PIV)
        await client.send(
            wire.CcidFrame(token_id=0, epoch=granted.epoch, message=ccid.xfr_block(1, GET_CERT_9A).encode())
        )
        chain = await expect(client, wire.Prefetched)
        first = ccid.decode_message((await expect(client, wire.CcidFrame)).message).data
    assert first[-2] == 0x61 and chain.epoch == granted.epoch
    assert [c for c, _ in chain.steps] == [
        bytes((0, 0xC0, 0, 0, r[-1])) for r in (first, *(r for _, r in chain.steps[:-1]))
    ]
    assert chain.steps[-1][1][-2:] == SW_OK
    # the card saw every GET RESPONSE, counted like the client's own APDUs
    assert _instructions(server, granted.epoch) == [0xA4, 0xCB, *[0xC0] * len(chain.steps)]
    assert server.tokens[0].spec.prefetched == len(chain.steps)


async def test_switched_off_nothing_is_taught_or_prefetched(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path, lease=LEASE, token={"speculation": False}) as (server, port):
        async with raw_client(pki, port) as client:
            granted = await open_lease(client)
            await apdu(client, granted.epoch, 0, SELECT_PIV)
            data = await apdu(client, granted.epoch, 1, GET_CERT_9A)  # expect() fails on a Prefetched
            await client.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
            await expect(client, wire.LeaseEnded)
            with trio.move_on_after(0.5):
                msg = await client.receive()
                assert not isinstance(msg, wire.SpeculationPaths | wire.Prefetched), msg
        assert data[-2] == 0x61
        assert server.tokens[0].spec.paths == [] and server.tokens[0].spec.prefetched == 0


async def test_two_clients_alternating_never_see_each_others_deferred_commands(tmp_path: Path) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "build-vm-02"))
    allow = ("build-vm-01", "build-vm-02")
    async with (
        running_server(tmp_path, lease=LEASE, allow=allow) as (server, port),
        raw_client(pki, port) as a,
        raw_client(pki, port, stem="build-vm-02") as b,
    ):
        taught = await _learn_a_path(a, SELECT_PIV, GET_CHUID)
        await hello(b)
        assert await _taught(b) == taught  # b was allowed too: the same public reads
        await b.send(wire.LeaseRequest(token_id=0))
        b_epoch = (await expect(b, wire.LeaseGranted)).epoch
        # a defers the taught path and asks for the lease while b holds it: queued
        live = ccid.xfr_block(7, GET_CERT_9A).encode()
        await a.send(wire.LeaseExchange(token_id=0, deferred=taught.paths[0], message=live))
        await expect(a, wire.LeaseQueued)
        await apdu(b, b_epoch, 0, SELECT_PIV)
        await b.send(wire.LeaseRelease(token_id=0, epoch=b_epoch))
        a_epoch = (await expect(a, wire.LeaseGranted)).epoch
        await expect(a, wire.Prefetched)
        answer = ccid.decode_message((await expect(a, wire.CcidFrame)).message)
        seen_by_b: list[object] = []
        with trio.move_on_after(0.5):
            while True:
                seen_by_b.append(await b.receive())
    assert answer.seq == 7 and answer.data[-2] == 0x61
    assert _instructions(server, b_epoch) == [0xA4]  # b's own command only
    # a's deferred steps were replayed in a's own lease, after the cold reset, then its command
    assert _instructions(server, a_epoch)[:3] == [0xA4, 0xCB, 0xCB]
    assert not [m for m in seen_by_b if isinstance(m, wire.CcidFrame | wire.Prefetched | wire.LeaseGranted)]
    assert server.tokens[0].spec.hits == 2


async def test_a_certificate_renewed_between_two_leases_removes_the_card_instead_of_standing(
    tmp_path: Path,
) -> None:
    """An admin renews an object the client was taught; the client's deferred answer is replayed
    on the renewed card, differs, and the application sees its card removed, then the new one."""
    pki = Pki(tmp_path, clients=(SIGNER, OPS))
    allow = (SIGNER, OPS)
    async with (
        running_server(tmp_path, lease=LEASE, allow=allow, admins=[OPS]) as (server, port),
        trio.open_nursery() as nursery,
    ):
        tunnel = make_tunnel(pki, port)
        await nursery.start(tunnel.run)
        await wait_until(lambda: tunnel.tokens["codesign"].usable, what="token visible", within=10)
        slot = _VpcdSlot()
        await nursery.start(VpcdLink(tunnel, "codesign", open_stream=slot, flush_after_s=30.0).run)
        app = await slot.inserted()
        # First signature: everything live; the server learns SELECT + GET CHUID.
        select = await app.transmit(SELECT_PIV)
        old_chuid = await app.transmit(GET_CHUID)
        await app.control(VpcdControl.POWER_OFF)
        cache = tunnel.speculation["codesign"]
        await wait_until(lambda: cache.steps == 2, what="the path taught", within=10)
        # The admin renews the CHUID in a lease of its own, and holds it.
        async with raw_client(pki, port, stem=OPS) as ops:
            granted = await open_lease(ops)
            assert await apdu(ops, granted.epoch, 0, SELECT_PIV) == select
            assert await apdu(ops, granted.epoch, 1, VERIFY_123456) == SW_OK
            assert await apdu(ops, granted.epoch, 2, NEW_CHUID) == SW_OK
            # The next signature starts: both reads answered on the build VM, no network.
            await app.control(VpcdControl.POWER_ON)
            assert await app.transmit(SELECT_PIV) == select
            assert await app.transmit(GET_CHUID) == old_chuid  # deferred, not yet verified
            removed: list[bytes | None] = []

            async def off_the_path() -> None:  # lease + deferred steps + this command: queued
                removed.append(await app.transmit(GET_CERT_9A))

            nursery.start_soon(off_the_path)
            await wait_until(lambda: server.tokens[0].book.waiting, what="queued", within=10)
            await ops.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
            # The replay meets the renewed CHUID: no answer, the card is removed.
            await wait_until(lambda: removed, what="the application's answer", within=10)
        assert removed == [None]
        assert server.tokens[0].spec.mismatches == 1
        failed_epoch = max(e for e in server.tokens[0].simulated.evidence.epochs() if e is not None)
        assert _instructions(server, failed_epoch) == [0xA4, 0xCB]  # the certificate read never ran
        # The card comes back; the application retries and reads the renewed object.
        app = await slot.inserted()
        assert await app.transmit(SELECT_PIV) == select
        new_chuid = await app.transmit(GET_CHUID)
        assert new_chuid is not None and new_chuid != old_chuid and new_chuid[-2:] == SW_OK
        nursery.cancel_scope.cancel()


async def test_a_deferred_verify_is_refused_before_the_card_sees_it(tmp_path: Path) -> None:
    """Only plain reads are ever taught, so a client deferring anything else is not believed."""
    pki = Pki(tmp_path)
    async with running_server(tmp_path, lease=LEASE) as (server, port), raw_client(pki, port) as client:
        await hello(client)
        deferred = ((VERIFY_123456, SW_OK),)
        live = ccid.xfr_block(1, GET_CHUID).encode()
        await client.send(wire.LeaseExchange(token_id=0, deferred=deferred, message=live))
        epoch = (await expect(client, wire.LeaseGranted)).epoch
        ended = await expect(client, wire.LeaseEnded)
    assert ended.reason == "card_changed"
    assert _instructions(server, epoch) == []  # neither the VERIFY nor the command after it ran
    assert server.tokens[0].simulated.evidence.snapshot().pin_attempts == 0
