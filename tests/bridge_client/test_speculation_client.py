"""The client's half of verified speculation (issue 17): taught paths, deferral, prefetched chains."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from client_fakes import ATR, Certs, FakeServer, FakeVpcd, MemoryNet, hold_lease, open_tunnel
from structlog.testing import capture_logs

from bridge_client.speculation import ChainBroken, PrefetchedChain, SpeculationCache
from bridge_client.tunnel import Tunnel
from bridge_client.vpcd_link import VpcdLink
from protocol import ccid, wire
from protocol.vpcd import VpcdControl

SELECT = bytes.fromhex("00A4040009A00000030800001000")
GET_CHUID = bytes.fromhex("00CB3FFF055C035FC10200")
GET_CERT = bytes.fromhex("00CB3FFF055C035FC10500")
OK = b"\x90\x00"
PATH = ((SELECT, b"\x61\x11" + OK), (GET_CHUID, b"\x53\x02\x30\x00" + OK))
GET_RESPONSE_1 = bytes.fromhex("00C0000000")
GET_RESPONSE_2 = bytes.fromhex("00C0000010")
CHAIN = ((GET_RESPONSE_1, bytes(256) + b"\x61\x10"), (GET_RESPONSE_2, bytes(16) + OK))


# -- the pure state ----------------------------------------------------------------------------


def test_the_cache_answers_along_a_taught_path_from_the_root_and_defers_each_answer() -> None:
    cache = SpeculationCache()
    cache.teach([PATH])
    assert cache.answer(GET_CHUID) is None  # not from power-on: off the path for this walk
    cache.restart()
    assert cache.answer(SELECT) == PATH[0][1]
    assert cache.answer(GET_CHUID) == PATH[1][1]
    assert cache.answer(GET_CERT) is None
    assert cache.answer(SELECT) is None  # once off the path, nothing more until a new lease
    assert cache.take_deferred() == PATH
    assert (cache.deferred, cache.hits) == (0, 2)


def test_new_paths_wait_until_the_walk_under_way_has_been_sent() -> None:
    cache = SpeculationCache()
    cache.teach([PATH])
    assert cache.answer(SELECT) == PATH[0][1]
    cache.teach([])  # withdrawn while a step is deferred: that step still goes out as promised
    assert cache.answer(GET_CHUID) == PATH[1][1]
    assert cache.take_deferred() == PATH
    cache.restart()
    assert cache.answer(SELECT) is None


def test_a_prefetched_chain_answers_exactly_its_commands() -> None:
    chain = PrefetchedChain()
    chain.load(CHAIN)
    assert chain.answer(GET_RESPONSE_1) == CHAIN[0][1]
    assert chain.answer(GET_RESPONSE_2) == CHAIN[1][1]
    assert chain.answer(GET_RESPONSE_2) is None  # used up


def test_another_command_drops_the_chain_and_another_get_response_is_refused() -> None:
    chain = PrefetchedChain()
    chain.load(CHAIN)
    assert chain.answer(SELECT) is None  # goes to the card: ISO 7816-4 discards the pending data
    assert chain.answer(GET_RESPONSE_1) is None
    chain.load(CHAIN)
    with pytest.raises(ChainBroken):
        chain.answer(bytes.fromhex("00C0000008"))  # the card's chain is already consumed


# -- through the vpcd link and the tunnel --------------------------------------------------------


async def _taught_link(
    nursery: trio.Nursery, certs: Certs, **kwargs: Any
) -> tuple[Tunnel, FakeServer, VpcdLink, MemoryNet]:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await server.send(wire.SpeculationPaths(token_id=0, paths=(PATH,)))
    while tunnel.speculation["codesign"].steps != 2:
        await tunnel.wait_changed()
    vnet = MemoryNet()
    link = VpcdLink(tunnel, "codesign", open_stream=vnet, **kwargs)
    await nursery.start(link.run)
    return tunnel, server, link, vnet


async def _transmit(vpcd: FakeVpcd, apdu: bytes) -> bytes | None:
    await vpcd.send_apdu(apdu)
    return await vpcd.response()


async def test_taught_apdus_cost_no_round_trip_and_ride_along_with_the_first_live_one(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    _, server, link, vnet = await _taught_link(nursery, certs)
    vpcd = FakeVpcd(await vnet.accept())
    assert await _transmit(vpcd, SELECT) == PATH[0][1]
    assert await _transmit(vpcd, GET_CHUID) == PATH[1][1]
    assert await server.nothing_for(0.1) == []  # answered on the build VM
    await vpcd.send_apdu(GET_CERT)
    exchange = await server.expect(wire.LeaseExchange)
    assert exchange.deferred == PATH
    command = ccid.decode_message(exchange.message)
    assert (command.msg_type, command.data) == (ccid.MessageType.PC_to_RDR_XfrBlock, GET_CERT)
    await server.send(wire.LeaseGranted(token_id=0, epoch=5, atr=ATR))
    await server.send(
        wire.CcidFrame(token_id=0, epoch=5, message=ccid.data_block(command.seq, b"\x6a\x82").encode())
    )
    assert await vpcd.response() == b"\x6a\x82"
    assert (link.status.apdus, link.status.local_answers) == (3, 2)


async def test_a_card_changed_replay_removes_the_card_and_never_answers_the_application(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _, vnet = await _taught_link(nursery, certs)
    vpcd = FakeVpcd(await vnet.accept())
    await _transmit(vpcd, SELECT)
    await _transmit(vpcd, GET_CHUID)
    with capture_logs() as logs:
        await vpcd.send_apdu(GET_CERT)
        await server.expect(wire.LeaseExchange)
        await server.send(wire.LeaseGranted(token_id=0, epoch=5, atr=ATR))
        await server.send(wire.LeaseEnded(token_id=0, epoch=5, reason="card_changed"))
        assert await vpcd.closed()  # no status word at all: pcscd sees the card removed
    assert [e["reason"] for e in logs if e["event"] == "lease.ended"] == ["card_changed"]
    assert len([e for e in logs if e["event"] == "reader.removed"]) == 1
    # The card comes back, and the next walk starts from power-on again.
    vpcd = FakeVpcd(await vnet.accept())
    assert tunnel.tokens["codesign"].epoch is None
    assert await _transmit(vpcd, SELECT) == PATH[0][1]


async def test_deferred_apdus_reach_the_card_when_the_application_pauses(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    _, server, _, vnet = await _taught_link(nursery, certs, flush_after_s=0.5)
    vpcd = FakeVpcd(await vnet.accept())
    await _transmit(vpcd, SELECT)
    start = trio.current_time()
    await trio.sleep(0.3)  # the application is idle; pcscd keeps polling the ATR
    assert await vpcd.get_atr() == ATR
    exchange = await server.expect(wire.LeaseExchange)
    assert trio.current_time() - start == 0.5  # from the last deferred APDU, polls or not
    assert exchange.deferred == PATH[:1]
    assert ccid.decode_message(exchange.message).msg_type == ccid.MessageType.PC_to_RDR_GetSlotStatus


async def test_a_power_event_sends_the_deferred_apdus_before_it(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    _, server, _, vnet = await _taught_link(nursery, certs)
    vpcd = FakeVpcd(await vnet.accept())
    await _transmit(vpcd, SELECT)
    await vpcd.control(VpcdControl.POWER_OFF)
    exchange = await server.expect(wire.LeaseExchange)
    assert exchange.deferred == PATH[:1]
    assert ccid.decode_message(exchange.message).msg_type == ccid.MessageType.PC_to_RDR_IccPowerOff


async def test_prefetched_get_responses_are_answered_locally_and_a_wrong_one_removes_the_card(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    vnet = MemoryNet()
    link = VpcdLink(tunnel, "codesign", open_stream=vnet)
    await nursery.start(link.run)
    vpcd = FakeVpcd(await vnet.accept())
    await vpcd.send_apdu(GET_CERT)
    command = ccid.decode_message((await server.expect(wire.LeaseExchange)).message)
    await server.send(wire.LeaseGranted(token_id=0, epoch=5, atr=ATR))
    await server.send(wire.Prefetched(token_id=0, epoch=5, steps=CHAIN))
    first = bytes(256) + b"\x61\x00"
    await server.send(
        wire.CcidFrame(token_id=0, epoch=5, message=ccid.data_block(command.seq, first).encode())
    )
    assert await vpcd.response() == first
    assert await _transmit(vpcd, GET_RESPONSE_1) == CHAIN[0][1]
    assert await server.nothing_for(0.1) == []
    await vpcd.send_apdu(bytes.fromhex("00C0000008"))  # not the GET RESPONSE the card answered
    assert await vpcd.closed()
    assert link.status.local_answers == 1


async def test_a_late_error_for_the_ended_lease_does_not_fail_the_next_lease_exchange(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by bench.roundtrips at 25 ms: pcscd's power-on crossed the linger's LeaseEnded, the
    server answered that frame with lease_required after the client had sent its LeaseExchange."""
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    vnet = MemoryNet()
    link = VpcdLink(tunnel, "codesign", open_stream=vnet)
    await nursery.start(link.run)
    vpcd = FakeVpcd(await vnet.accept())
    await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason="linger_expired"))
    while tunnel.tokens["codesign"].epoch is not None:
        await tunnel.wait_changed()
    await vpcd.send_apdu(SELECT)
    command = ccid.decode_message((await server.expect(wire.LeaseExchange)).message)
    stale = "no lease with epoch 41 on token 'codesign'"
    await server.send(wire.ErrorMessage(code="lease_required", message=stale, token_id=0))
    await server.send(wire.LeaseGranted(token_id=0, epoch=42, atr=ATR))
    await server.send(wire.CcidFrame(token_id=0, epoch=42, message=ccid.data_block(command.seq, OK).encode()))
    assert await vpcd.response() == OK
    assert link.status.apdus == 1
