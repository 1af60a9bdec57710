"""Token manager over a fake card: isolation by cold reset, epochs, deadlines, presence."""

from __future__ import annotations

import structlog
import trio
import trio.testing
from server_fakes import (
    ATR,
    LEASE,
    PIN,
    SIGN,
    SW_OK,
    SW_SECURITY_NOT_SATISFIED,
    VERIFY,
    Client,
    FakeDevice,
    make_manager,
)

from bridge_server.errors import CardError, DeviceGoneError
from bridge_server.net.hub import Hub
from bridge_server.tokens.leases import EndReason
from bridge_server.tokens.manager import POLL_INTERVAL_S, TokenManager
from protocol import ccid, wire
from protocol.ccid import CommandStatus, IccStatus, MessageType, SlotError


async def start(nursery: trio.Nursery, manager: TokenManager) -> None:
    await nursery.start(manager.run)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def lease(manager: TokenManager, client: Client) -> wire.LeaseGranted:
    await manager.request_lease(client.sub)
    await settle()
    granted = client.of_type(wire.LeaseGranted)
    assert len(granted) == 1, granted
    return granted[0]


async def exchange(
    manager: TokenManager, client: Client, epoch: int, msg: ccid.CcidMessage
) -> ccid.CcidMessage:
    await manager.submit_frame(client.sub, epoch, msg.encode())
    await settle()
    frames = client.of_type(wire.CcidFrame)
    assert len(frames) == 1, frames
    assert frames[0].epoch == epoch
    return ccid.decode_message(frames[0].message)


async def test_every_grant_cold_resets_the_card_before_lease_granted(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    device.card.calls.clear()
    a, b = Client(hub, "vm1"), Client(hub, "vm2")
    first = await lease(manager, a)
    assert device.card.calls == ["power_off", "power_on"]
    assert (first.epoch, first.atr) == (1000, ATR)
    device.card.calls.clear()
    await manager.release_lease(a.sub, first.epoch)
    await settle()
    second = await lease(manager, b)
    # power_off at the end of a's lease, then the grant's own cold reset.
    assert device.card.calls == ["power_off", "power_off", "power_on"]
    assert second.epoch == 1001


async def test_second_holder_cannot_use_the_first_holders_verified_pin(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a, b = Client(hub, "vm1"), Client(hub, "vm2")
    ga = await lease(manager, a)
    assert (await exchange(manager, a, ga.epoch, ccid.xfr_block(1, VERIFY))).data == SW_OK
    assert (await exchange(manager, a, ga.epoch, ccid.xfr_block(2, SIGN))).data[-2:] == SW_OK
    await manager.release_lease(a.sub, ga.epoch)
    gb = await lease(manager, b)
    resp = await exchange(manager, b, gb.epoch, ccid.xfr_block(1, SIGN))
    assert resp.data == SW_SECURITY_NOT_SATISFIED


async def test_frames_with_a_stale_epoch_or_without_a_lease_are_refused(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a, b = Client(hub, "vm1"), Client(hub, "vm2")
    granted = await lease(manager, a)
    await manager.submit_frame(a.sub, granted.epoch - 1, ccid.xfr_block(1, SIGN).encode())
    await manager.submit_frame(b.sub, granted.epoch, ccid.xfr_block(1, SIGN).encode())
    await settle()
    assert [e.code for e in a.of_type(wire.ErrorMessage)] == ["stale_epoch"]
    assert [e.code for e in b.of_type(wire.ErrorMessage)] == ["lease_required"]
    assert not any(c[0] == "transmit" for c in device.card.calls if isinstance(c, tuple))


async def test_client_not_on_the_allow_list_cannot_request_a_lease(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device, allow=("vm1",))
    await start(nursery, manager)
    intruder = Client(hub, "vm9")
    await manager.request_lease(intruder.sub)
    await settle()
    assert [e.code for e in intruder.drain()] == ["not_allowed"]
    assert manager.book.holder is None


async def test_second_requester_is_queued_then_granted_on_release(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a, b = Client(hub, "vm1"), Client(hub, "vm2")
    ga = await lease(manager, a)
    await manager.request_lease(b.sub)
    await settle()
    assert b.drain() == [wire.LeaseQueued(token_id=0, position=1)]
    await manager.release_lease(a.sub, ga.epoch)
    await settle()
    assert a.drain() == [wire.LeaseEnded(token_id=0, epoch=ga.epoch, reason="released")]
    assert [type(m) for m in b.drain()] == [wire.LeaseGranted]


async def test_lease_ends_exactly_linger_s_after_the_holder_powers_off(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    await trio.sleep(5)
    resp = await exchange(manager, a, granted.epoch, ccid.icc_power_off(3))
    assert resp.msg_type is MessageType.RDR_to_PC_SlotStatus
    assert resp.icc_status is IccStatus.PRESENT_INACTIVE
    powered_off_at = trio.current_time()
    ended = await a.inbox.receive()
    assert ended == wire.LeaseEnded(token_id=0, epoch=granted.epoch, reason="linger_expired")
    assert trio.current_time() - powered_off_at == LEASE.linger_s


async def test_a_frame_during_the_linger_keeps_the_lease_and_power_on_cold_resets(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    await exchange(manager, a, granted.epoch, ccid.xfr_block(1, VERIFY))
    await exchange(manager, a, granted.epoch, ccid.icc_power_off(2))
    await trio.sleep(LEASE.linger_s / 2)
    device.card.calls.clear()
    resp = await exchange(manager, a, granted.epoch, ccid.icc_power_on(3))
    assert (resp.msg_type, resp.data) == (MessageType.RDR_to_PC_DataBlock, ATR)
    assert device.card.calls == ["power_off", "power_on"]
    await trio.sleep(LEASE.linger_s * 2)
    assert manager.book.holder is not None
    assert (
        await exchange(manager, a, granted.epoch, ccid.xfr_block(4, SIGN))
    ).data == SW_SECURITY_NOT_SATISFIED


async def test_idle_lease_ends_at_exactly_idle_timeout_after_the_last_frame(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    await trio.sleep(7)
    await exchange(manager, a, granted.epoch, ccid.get_slot_status(1))
    last_frame = trio.current_time()
    ended = await a.inbox.receive()
    assert ended.reason == "idle_timeout"
    assert trio.current_time() - last_frame == LEASE.idle_timeout_s


async def test_unplug_ends_the_lease_and_tells_everyone_within_one_poll(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a, b = Client(hub, "vm1"), Client(hub, "vm2")
    granted = await lease(manager, a)
    unplugged_at = trio.current_time()
    device.unplug()
    first = await a.inbox.receive()
    assert trio.current_time() - unplugged_at <= POLL_INTERVAL_S
    assert first == wire.LeaseEnded(token_id=0, epoch=granted.epoch, reason="token_gone")
    status_a = [m for m in a.drain() if isinstance(m, wire.TokenStatus)]
    status_b = [m for m in b.drain() if isinstance(m, wire.TokenStatus)]
    assert status_a[-1].present is False
    assert status_b[-1].present is False
    device.plugged = True
    await trio.sleep(POLL_INTERVAL_S * 1.5)  # not a whole interval: polls fall on whole ones
    assert manager.present
    assert b.of_type(wire.TokenStatus)[-1].present is True


async def test_a_different_serial_in_the_tokens_place_is_refused_and_logged(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    device.unplug()
    await trio.sleep(POLL_INTERVAL_S * 1.5)
    assert not manager.present
    device.serial, device.plugged = "OTHER", True
    with structlog.testing.capture_logs() as logs:
        await trio.sleep(3 * POLL_INTERVAL_S)
    assert not manager.present
    refused = [e for e in logs if e["event"] == "device.refused"]
    assert len(refused) == 1
    assert (refused[0]["device"], refused[0]["expected"]) == ("OTHER", "SER1")


async def test_device_error_mid_apdu_is_a_ccid_failure_and_ends_the_lease(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    device.card.fail_next = CardError("t=1 exchange failed", None)
    await manager.submit_frame(a.sub, granted.epoch, ccid.xfr_block(9, SIGN).encode())
    await settle()
    frame, ended = a.drain()
    resp = ccid.decode_message(frame.message)
    assert (resp.seq, resp.command_status, resp.error, resp.data) == (
        9,
        CommandStatus.FAILED,
        SlotError.HW_ERROR,
        b"",
    )
    assert ended == wire.LeaseEnded(token_id=0, epoch=granted.epoch, reason="device_error")


async def test_device_gone_mid_apdu_reports_icc_mute_and_token_gone(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    device.card.fail_next = DeviceGoneError("gone")
    await manager.submit_frame(a.sub, granted.epoch, ccid.xfr_block(9, SIGN).encode())
    await settle()
    msgs = a.drain()
    resp = ccid.decode_message(msgs[0].message)
    assert (resp.icc_status, resp.error) == (IccStatus.ABSENT, SlotError.ICC_MUTE)
    assert wire.LeaseEnded(token_id=0, epoch=granted.epoch, reason="token_gone") in msgs
    assert not manager.present


async def test_unsupported_ccid_commands_get_the_matching_failed_response(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    resp = await exchange(manager, a, granted.epoch, ccid.escape(4, b"\x6a"))
    assert (resp.msg_type, resp.command_status, resp.error) == (
        MessageType.RDR_to_PC_Escape,
        CommandStatus.FAILED,
        SlotError.CMD_NOT_SUPPORTED,
    )
    resp = await exchange(manager, a, granted.epoch, ccid.get_slot_status(5))
    assert (resp.msg_type, resp.icc_status, resp.seq) == (
        MessageType.RDR_to_PC_SlotStatus,
        IccStatus.PRESENT_ACTIVE,
        5,
    )
    await manager.submit_frame(a.sub, granted.epoch, b"\x6f\x00")
    await settle()
    assert [e.code for e in a.of_type(wire.ErrorMessage)] == ["bad_ccid"]


async def test_slow_client_is_disconnected_and_does_not_block_others(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    slow = Client(hub, "vm2", capacity=1)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    for _ in range(3):  # each request from the slow client gets an answer it never reads
        await manager.request_lease(slow.sub)
        await settle()
    assert slow.sub.closed
    assert slow.sub.close_reason == "slow_client"
    manager.detach(slow.sub.conn_id)
    resp = await exchange(manager, a, granted.epoch, ccid.xfr_block(1, VERIFY))
    assert resp.data == SW_OK
    assert manager.book.waiting == ()


async def test_disconnect_of_the_holder_frees_the_token_for_the_next(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a, b = Client(hub, "vm1"), Client(hub, "vm2")
    await lease(manager, a)
    await manager.request_lease(b.sub)
    await settle()
    a.sub.closed = True
    manager.detach(a.sub.conn_id, EndReason.HEARTBEAT_LOST)
    await settle()
    assert [type(m) for m in b.drain()] == [wire.LeaseQueued, wire.LeaseGranted]


async def test_shutdown_ends_the_lease_and_powers_the_card_off(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    device.card.calls.clear()
    await manager.shutdown()
    await settle()
    assert a.drain() == [wire.LeaseEnded(token_id=0, epoch=granted.epoch, reason="shutdown")]
    assert device.card.calls[-1] == "power_off"
    assert device.closes == 1


async def test_pin_never_reaches_a_log_line(nursery: trio.Nursery) -> None:
    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    await start(nursery, manager)
    a = Client(hub, "vm1")
    with structlog.testing.capture_logs() as logs:
        granted = await lease(manager, a)
        await exchange(manager, a, granted.epoch, ccid.xfr_block(1, VERIFY))
        device.card.fail_next = CardError("broken")
        await manager.submit_frame(a.sub, granted.epoch, ccid.xfr_block(2, VERIFY).encode())
        await settle()
    text = repr(logs)
    assert any(e["event"] == "apdu.failed" for e in logs)
    for rendering in (PIN.hex(), PIN.hex(" "), PIN.hex().upper(), PIN.hex(" ").upper(), "123456"):
        assert rendering not in text


async def test_simulated_token_records_the_lease_epoch(nursery: trio.Nursery) -> None:
    class Sim:
        current_epoch: int | None = None

    hub, device = Hub(), FakeDevice()
    manager = make_manager(hub, device)
    manager.simulated = Sim()
    await start(nursery, manager)
    a = Client(hub, "vm1")
    granted = await lease(manager, a)
    assert manager.simulated.current_epoch == granted.epoch
    await manager.release_lease(a.sub, granted.epoch)
    await settle()
    assert manager.simulated.current_epoch is None
