"""The vpcd link between a fake vpcd (pcscd's driver) and a real tunnel to a scripted server."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from client_fakes import (
    ATR,
    ATR2,
    Certs,
    FakeServer,
    FakeVpcd,
    MemoryNet,
    hold_lease,
    make_tunnel,
    open_tunnel,
    refused,
)
from structlog.testing import capture_logs

from bridge_client.backoff import Backoff
from bridge_client.tunnel import Tunnel
from bridge_client.vpcd_link import VpcdLink
from protocol import ccid, wire
from protocol.vpcd import VpcdControl

SELECT = bytes.fromhex("00A4040009A00000030800001000")
VERIFY_PIN = bytes.fromhex("0020008008313233343536FFFF")  # PIN 123456


async def start_link(nursery: trio.Nursery, tunnel: Tunnel, **kwargs: Any) -> tuple[VpcdLink, MemoryNet]:
    net = MemoryNet()
    defaults: dict[str, Any] = {"backoff": Backoff(initial_s=0.25, max_s=2.0, jitter=0.0), "open_stream": net}
    link = VpcdLink(tunnel, "codesign", **(defaults | kwargs))
    await nursery.start(link.run)
    return link, net


async def inserted(net: MemoryNet) -> FakeVpcd:
    return FakeVpcd(await net.accept())


async def answer_next(server: FakeServer, rapdu: bytes = b"\x90\x00") -> ccid.CcidMessage:
    """The server side of one CCID exchange: returns the command it answered."""
    frame = await server.expect(wire.CcidFrame)
    command = ccid.decode_message(frame.message)
    if command.msg_type == ccid.MessageType.PC_to_RDR_IccPowerOff:
        reply = ccid.slot_status(command.seq, icc=ccid.IccStatus.PRESENT_INACTIVE)
    elif command.msg_type == ccid.MessageType.PC_to_RDR_IccPowerOn:
        reply = ccid.data_block(command.seq, ATR2)
    else:
        reply = ccid.data_block(command.seq, rapdu)
    await server.send(wire.CcidFrame(token_id=frame.token_id, epoch=frame.epoch, message=reply.encode()))
    return command


def removals(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "reader.removed"]


async def test_the_card_appears_only_while_tunnel_up_token_present_and_allowed(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tnet = MemoryNet()
    tunnel = make_tunnel(certs, tnet)
    link, vnet = await start_link(nursery, tunnel)

    async def card_state() -> tuple[int, str, str]:
        await trio.testing.wait_all_tasks_blocked()
        return len(vnet.attempts), link.status.state, link.status.reason

    assert await card_state() == (0, "waiting", "tunnel down: connecting")
    await nursery.start(tunnel.run)
    server = await FakeServer.accept(tnet, certs.server_ctx())
    await server.welcome()
    count, state, reason = await card_state()
    assert (count, state) == (0, "waiting")
    assert reason.startswith("the server offers no token named 'codesign' to this client")
    await server.token(allowed=False)
    assert await card_state() == (0, "waiting", "this client is not allowed to use the token")
    await server.token(present=False)
    assert await card_state() == (0, "waiting", "token absent on the server")

    with capture_logs() as logs:
        await server.token()
        vpcd = await inserted(vnet)
        assert await vpcd.get_atr() == ATR
        assert link.status.state == "inserted"
        await server.token(present=False, state="absent")
        assert await vpcd.closed()
        assert await card_state() == (1, "waiting", "token absent on the server")
    assert removals(logs) == ["token absent on the server"]


async def test_get_atr_power_on_and_power_off_without_a_lease_stay_local(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    for code in (VpcdControl.POWER_ON, VpcdControl.RESET, VpcdControl.POWER_OFF):
        await vpcd.control(code)  # no reply expected: the next reply must be the ATR
        assert await vpcd.get_atr() == ATR
    assert await server.nothing_for(5.0) == []
    assert tunnel.tokens["codesign"].epoch is None


async def test_an_apdu_without_a_lease_asks_for_it_in_the_same_message_then_travels_under_its_epoch(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    link, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    await vpcd.send_apdu(SELECT)
    # One message, one round trip: the lease request and the first XfrBlock (issue 17).
    exchange = await server.expect(wire.LeaseExchange)
    command = ccid.decode_message(exchange.message)
    assert (exchange.token_id, exchange.deferred) == (0, ())
    assert (command.msg_type, command.data) == (ccid.MessageType.PC_to_RDR_XfrBlock, SELECT)
    await server.send(wire.LeaseGranted(token_id=0, epoch=41, atr=ATR))
    rapdu = bytes.fromhex("61109000")
    await server.send(
        wire.CcidFrame(token_id=0, epoch=41, message=ccid.data_block(command.seq, rapdu).encode())
    )
    assert await vpcd.response() == rapdu
    # Under the lease: straight to the card, no new request.
    await vpcd.send_apdu(bytes.fromhex("00C0000010"))
    second = await answer_next(server, b"\x01" * 16 + b"\x90\x00")
    assert second.data == bytes.fromhex("00C0000010")
    assert await vpcd.response() == b"\x01" * 16 + b"\x90\x00"
    assert link.status.apdus == 2


async def test_power_events_under_a_lease_become_ccid_power_commands(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    expected = {
        VpcdControl.POWER_OFF: ccid.MessageType.PC_to_RDR_IccPowerOff,
        VpcdControl.POWER_ON: ccid.MessageType.PC_to_RDR_IccPowerOn,
        VpcdControl.RESET: ccid.MessageType.PC_to_RDR_IccPowerOn,  # the server cold-resets
    }
    for code, msg_type in expected.items():
        await vpcd.control(code)
        assert (await answer_next(server)).msg_type == msg_type
    # No reply to power events; the fresh ATR from the power-on is what get-ATR now says.
    assert await vpcd.get_atr() == ATR2


async def test_a_tunnel_dropped_mid_apdu_is_a_reader_error_never_an_invented_status_word(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    link, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    with capture_logs() as logs:
        await vpcd.send_apdu(SELECT)
        await server.expect(wire.LeaseExchange)
        await server.send(wire.LeaseGranted(token_id=0, epoch=41, atr=ATR))
        await server.close()
        assert await vpcd.closed()  # nothing at all was sent back: pcscd sees a reader error
    [reason] = removals(logs)
    assert reason.startswith(("exchange failed: tunnel to the server is down", "tunnel down: "))
    assert link.status.apdus == 0


async def test_a_response_without_a_status_word_closes_the_reader_instead_of_being_forwarded(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    with capture_logs() as logs:
        await vpcd.send_apdu(SELECT)
        await answer_next(server, b"\x90")
        assert await vpcd.closed()
    assert removals(logs) == ["exchange failed: server answered an APDU with 1 bytes (no status word)"]


async def test_a_lease_lost_abnormally_removes_the_card_which_then_comes_back(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    with capture_logs() as logs:
        await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason="idle_timeout"))
        assert await vpcd.closed()
        again = await inserted(vnet)  # a new card: applications must log in again
        assert await again.get_atr() == ATR
    assert removals(logs) == ["lease lost"]


async def test_a_lease_that_lingered_out_after_power_off_keeps_the_card(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    await vpcd.control(VpcdControl.POWER_OFF)
    await answer_next(server)
    await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason="linger_expired"))
    await trio.testing.wait_all_tasks_blocked()
    assert tunnel.tokens["codesign"].epoch is None
    assert await vpcd.get_atr() == ATR  # the same connection still answers
    assert not vnet.pending()


async def test_a_power_on_racing_the_linger_expiry_keeps_the_card(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    """The lease lingers out while pcscd's power-on is on its way: a normal end, no removal."""
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    with capture_logs() as logs:
        await vpcd.control(VpcdControl.POWER_ON)
        await server.expect(wire.CcidFrame)  # the server ended the lease before it got this
        await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason="linger_expired"))
        await server.send(wire.ErrorMessage(code="stale_epoch", message="epoch 41 ended", token_id=0))
        await trio.testing.wait_all_tasks_blocked()
        assert await vpcd.get_atr() == ATR  # the same connection still answers: card kept
    assert removals(logs) == []
    assert tunnel.tokens["codesign"].epoch is None


async def test_giving_up_in_the_lease_queue_after_queue_timeout_removes_the_card(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    _, vnet = await start_link(nursery, tunnel, queue_timeout_s=20.0)
    vpcd = await inserted(vnet)
    with capture_logs() as logs:
        await vpcd.send_apdu(SELECT)
        await server.expect(wire.LeaseExchange)
        start = trio.current_time()
        await server.send(wire.LeaseQueued(token_id=0, position=1))
        assert await vpcd.closed()
        assert trio.current_time() - start == 20.0
    assert removals(logs) == ["gave up waiting in the lease queue"]


async def test_an_unreachable_vpcd_is_retried_with_backoff_and_reported_in_status(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, _, _ = await open_tunnel(nursery, certs)
    net = MemoryNet()
    net.failure = refused()
    link = VpcdLink(
        tunnel,
        "codesign",
        port=35964,
        backoff=Backoff(initial_s=0.25, max_s=1.0, jitter=0.0),
        open_stream=net,
    )
    with capture_logs() as logs:
        await nursery.start(link.run)
        start = trio.current_time()
        await trio.sleep(2.0)  # advances virtual time only
        assert [t - start for t in net.attempts] == [0.0, 0.25, 0.75, 1.75]
        assert link.status.state == "vpcd_unreachable"
        assert link.status.reason == (
            "cannot connect to vpcd at 127.0.0.1:35964: Connection refused (is pcscd running with "
            "vsmartcard-vpcd, and is this the slot's port?)"
        )
        net.failure = None
        vpcd = await inserted(net)
        assert trio.current_time() - start == 2.75
        assert await vpcd.get_atr() == ATR
    assert link.status.state == "inserted"
    # four failures within a minute: the first is logged, the recovery line counts the rest
    assert [e["retry_in_s"] for e in logs if e["event"] == "vpcd.unreachable"] == [0.25]
    assert [e["repeated"] for e in logs if e["event"] == "vpcd.reachable"] == [3]
    assert link.backoff.failures == 0


async def test_when_vpcd_closes_the_connection_the_link_connects_again(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, _, _ = await open_tunnel(nursery, certs)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    await vpcd.stream.aclose()  # pcscd restarted
    again = await inserted(vnet)
    assert await again.get_atr() == ATR


async def test_a_pin_never_reaches_a_log_line(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server)
    _, vnet = await start_link(nursery, tunnel)
    vpcd = await inserted(vnet)
    with capture_logs() as logs:
        await vpcd.send_apdu(VERIFY_PIN)
        await answer_next(server, b"\x90\x00")
        assert await vpcd.response() == b"\x90\x00"
    sent = [e for e in logs if e["event"] == "apdu.sent"]
    assert len(sent) == 1  # the per-APDU debug line exists, and is redacted
    text = repr(logs).lower()
    for needle in ("313233343536", "31 32 33 34 35 36", "123456", "0020008008313233"):
        assert needle not in text


async def test_the_real_tcp_path_to_a_loopback_vpcd_works(nursery: trio.Nursery, certs: Certs) -> None:
    """Default open_stream (trio.open_tcp_stream) and the TCP_QUICKACK setting, on loopback."""
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    link = VpcdLink(tunnel, "codesign", port=port)
    with trio.fail_after(10):
        await nursery.start(link.run)
        vpcd = FakeVpcd(await listeners[0].accept())
        assert await vpcd.get_atr() == ATR
        await vpcd.send_apdu(SELECT)
        await answer_next(server, b"\x6a\x82")
        assert await vpcd.response() == b"\x6a\x82"  # a card's status word is data, forwarded as is
    await vpcd.stream.aclose()
    await listeners[0].aclose()


async def test_a_vpcd_that_stays_down_is_logged_once_per_interval_with_the_count(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, _, _ = await open_tunnel(nursery, certs)
    net = MemoryNet()
    net.failure = refused()
    link = VpcdLink(
        tunnel,
        "codesign",
        port=35964,
        backoff=Backoff(initial_s=0.25, max_s=0.25, jitter=0.0),
        open_stream=net,
        unreachable_log_interval_s=1.0,
    )
    with capture_logs() as logs:
        await nursery.start(link.run)
        await trio.sleep(5.9)  # virtual time: 24 failed attempts, at 0, 0.25, ... 5.75 s
        net.failure = None
        await inserted(net)
    assert len(net.attempts) == 25
    unreachable = [e["repeated"] for e in logs if e["event"] == "vpcd.unreachable"]
    assert unreachable == [0, 3, 3, 3, 3, 3]  # 6 lines for 24 failures, each counting the ones left out
    assert [e["repeated"] for e in logs if e["event"] == "vpcd.reachable"] == [3]
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "vpcd.unreachable")
