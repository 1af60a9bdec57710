"""The usbip reader backend driven by an independent USB/IP host (tests/support/usbip_host.py).

The exporter runs in-process over memory streams; its tunnel talks TLS to a scripted server
(client_fakes), so every lease request and CCID frame the USB side causes is checked on the wire.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from client_fakes import ATR, ATR2, Certs, FakeServer, hold_lease, open_tunnel
from usbip_host import UsbipHost

from bridge_client.tunnel import Tunnel
from bridge_client.usbip.reader import UsbipReader
from bridge_client.usbip.server import handle_connection
from protocol import ccid, wire
from protocol.runtime.address import Address

BULK_OUT, BULK_IN, INTR_IN = 1, 2, 3
SELECT = bytes.fromhex("00A4040009A00000030800001000")
LONG_ANSWER = bytes(range(256)) * 2 + b"\x90\x00"  # 514 bytes: 9 packets, the last one short


async def connect(nursery: trio.Nursery, readers: list[UsbipReader]) -> UsbipHost:
    near, far = trio.testing.memory_stream_pair()
    nursery.start_soon(handle_connection, readers, far, "test-host")
    return UsbipHost(near)


async def attached(nursery: trio.Nursery, tunnel: Tunnel) -> tuple[UsbipHost, UsbipReader]:
    reader = UsbipReader(tunnel, "codesign", 0, Address("127.0.0.1", 3240))
    host = await connect(nursery, [reader])
    assert await host.attach("1-1") is not None
    reply = await host.control(0x00, 9, 1, 0, 0)  # SET_CONFIGURATION 1
    assert reply.status == 0
    return host, reader


async def ccid_exchange(host: UsbipHost, message: ccid.CcidMessage) -> ccid.CcidMessage:
    raw = message.encode()
    # Split where no packet boundary is: the reader must join by dwLength, not by URB.
    for part in (raw[:7], raw[7:]):
        assert (await host.bulk_out(BULK_OUT, part)).status == 0
    while True:
        answer = ccid.decode_message(await host.read_message(BULK_IN))
        if answer.b7 & 0xC0 != 0x80:  # skip time extensions
            return answer


@pytest.fixture
async def tunnel_and_server(nursery: trio.Nursery, certs: Certs) -> AsyncIterator[tuple[Tunnel, FakeServer]]:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    yield tunnel, server


async def test_the_device_list_shows_each_token_as_a_full_speed_ccid_device(
    nursery: trio.Nursery, certs: Certs
) -> None:
    tunnel, _, _ = await open_tunnel(nursery, certs, token_names=["codesign", "spare"])
    readers = [
        UsbipReader(tunnel, name, i, Address("127.0.0.1", 3240))
        for i, name in enumerate(["codesign", "spare"])
    ]
    host = await connect(nursery, readers)
    devices = await host.devlist()
    assert [(d.busid, d.busnum, d.devnum, d.speed) for d in devices] == [("1-1", 1, 2, 2), ("1-2", 1, 3, 2)]
    # 0E0F:0004 is in libccid's Info.plist ("VMware Virtual USB CCID"); class 0B on the interface.
    assert {(d.vid, d.pid) for d in devices} == {(0x0E0F, 0x0004)}
    assert [d.interfaces for d in devices] == [[(0x0B, 0, 0)]] * 2


async def test_an_unknown_bus_id_and_a_second_import_are_refused(
    nursery: trio.Nursery, tunnel_and_server: tuple[Tunnel, FakeServer]
) -> None:
    tunnel, _ = tunnel_and_server
    reader = UsbipReader(tunnel, "codesign", 0, Address("127.0.0.1", 3240))
    assert await (await connect(nursery, [reader])).attach("1-9") is None
    first = await connect(nursery, [reader])
    assert await first.attach("1-1") is not None
    assert await (await connect(nursery, [reader])).attach("1-1") is None
    assert reader.attached_by == "test-host"


async def test_descriptors_carry_what_libccid_reads_from_the_class_descriptor(
    nursery: trio.Nursery, tunnel_and_server: tuple[Tunnel, FakeServer]
) -> None:
    host, _ = await attached(nursery, tunnel_and_server[0])
    device = (await host.control(0x80, 6, 0x0100, 0, 18)).data
    assert struct.unpack_from("<HH", device, 8) == (0x0E0F, 0x0004)
    short = await host.control(0x80, 6, 0x0200, 0, 9)
    total = struct.unpack_from("<H", short.data, 2)[0]
    config = (await host.control(0x80, 6, 0x0200, 0, total)).data
    assert len(config) == total == 9 + 9 + 54 + 3 * 7
    klass = config[18 : 18 + 54]
    assert klass[:2] == b"\x36\x21"
    # Offsets as libccid's ccid_usb.c reads them: dwFeatures at 40, dwMaxCCIDMessageLength at 44.
    features, max_message = struct.unpack_from("<II", klass, 40)
    assert features & 0x70000 == 0x40000  # extended APDU level
    assert features & 0xFE == 0xFE  # automatic ATR config, activation, voltage, clock, baud, PPS
    assert max_message == 10 + 4 + 3 + 65536 + 3  # libccid's CMD_BUF_SIZE + header: no chaining
    endpoints = [config[i + 2] for i in range(72, len(config), 7)]
    assert endpoints == [0x01, 0x82, 0x83]
    product = (await host.control(0x80, 6, 0x0302, 0x0409, 255)).data
    assert product[2:].decode("utf-16-le") == "tokenbridge codesign"
    assert (await host.control(0x80, 6, 0x0309, 0x0409, 255)).status == -errno.EPIPE


async def test_power_on_answers_the_atr_locally_and_an_apdu_takes_the_lease(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, reader = await attached(nursery, tunnel)
    note = await host.submit(INTR_IN, 1, 8)
    reply = await host.ret()
    assert (reply.seqnum, reply.data) == (note, b"\x50\x03")  # present, changed
    answer = await ccid_exchange(host, ccid.icc_power_on(0))
    assert (answer.msg_type, answer.data, answer.error) == (ccid.MessageType.RDR_to_PC_DataBlock, ATR, 0)
    assert await server.nothing_for(1.0) == []

    async def card_side() -> None:
        await server.expect(wire.LeaseRequest)
        await server.send(wire.LeaseGranted(token_id=0, epoch=41, atr=ATR))
        frame = await server.expect(wire.CcidFrame)
        command = ccid.decode_message(frame.message)
        assert (command.msg_type, command.data, frame.epoch) == (
            ccid.MessageType.PC_to_RDR_XfrBlock,
            SELECT,
            41,
        )
        reply = ccid.data_block(command.seq, LONG_ANSWER).encode()
        await server.send(wire.CcidFrame(token_id=0, epoch=41, message=reply))

    nursery.start_soon(card_side)
    answer = await ccid_exchange(host, ccid.xfr_block(1, SELECT))
    assert (answer.seq, answer.data, answer.command_status) == (1, LONG_ANSWER, ccid.CommandStatus.OK)
    assert reader.status.apdus == 1


async def test_a_lease_queue_wait_sends_time_extensions_so_the_host_keeps_reading(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, _ = await attached(nursery, tunnel)
    await ccid_exchange(host, ccid.icc_power_on(0))
    raw = ccid.xfr_block(1, SELECT).encode()
    await host.bulk_out(BULK_OUT, raw)
    await server.expect(wire.LeaseRequest)
    await server.send(wire.LeaseQueued(token_id=0, position=1))
    start = trio.current_time()
    waits = [ccid.decode_message(await host.read_message(BULK_IN)) for _ in range(3)]
    assert [(w.seq, w.b7, w.error) for w in waits] == [(1, 0x80, 1)] * 3  # bStatus time extension
    assert trio.current_time() - start == pytest.approx(1.5)


async def test_unlinked_pending_bulk_and_interrupt_urbs_get_no_reply_and_bulk_data_goes_to_the_next(
    nursery: trio.Nursery, tunnel_and_server: tuple[Tunnel, FakeServer]
) -> None:
    host, _ = await attached(nursery, tunnel_and_server[0])
    pending = await host.submit(BULK_IN, 1, 64)
    unlink = await host.unlink(pending)
    reply = await host.ret()
    assert (reply.command, reply.seqnum, reply.status) == (4, unlink, -errno.ECONNRESET)
    await host.bulk_out(BULK_OUT, ccid.get_slot_status(7).encode())
    answer = ccid.decode_message(await host.read_message(BULK_IN))
    assert (answer.msg_type, answer.seq) == (ccid.MessageType.RDR_to_PC_SlotStatus, 7)
    late = await host.unlink(pending)  # already gone: nothing to cancel
    assert (await host.ret()).seqnum == late
    first = await host.submit(INTR_IN, 1, 8)
    assert (await host.ret()).data == b"\x50\x03"  # the insertion, then nothing new to report
    waiting = await host.submit(INTR_IN, 1, 8)
    unlink = await host.unlink(waiting)
    reply = await host.ret()
    assert (reply.command, reply.seqnum, reply.status, first) == (4, unlink, -errno.ECONNRESET, first)


async def test_a_dropped_tunnel_removes_the_card_through_the_interrupt_endpoint(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, reader = await attached(nursery, tunnel)
    await host.submit(INTR_IN, 1, 8)
    assert (await host.ret()).data == b"\x50\x03"
    await host.submit(INTR_IN, 1, 8)
    await server.close()
    assert (await host.ret()).data == b"\x50\x02"  # absent, changed
    answer = await ccid_exchange(host, ccid.icc_power_on(2))
    assert (answer.icc_status, answer.error) == (ccid.IccStatus.ABSENT, ccid.SlotError.ICC_MUTE)
    assert reader.status.state == "attached"
    assert reader.status.reason.startswith("tunnel down")


async def test_a_usb_reset_of_a_powered_leased_card_powers_it_off_at_the_server(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, _ = await attached(nursery, tunnel)
    await hold_lease(tunnel, server)

    async def power_on_at_server() -> None:
        frame = await server.expect(wire.CcidFrame)
        command = ccid.decode_message(frame.message)
        assert command.msg_type == ccid.MessageType.PC_to_RDR_IccPowerOn
        await server.send(
            wire.CcidFrame(token_id=0, epoch=41, message=ccid.data_block(command.seq, ATR2).encode())
        )

    nursery.start_soon(power_on_at_server)
    assert (await ccid_exchange(host, ccid.icc_power_on(0))).data == ATR2  # the server's cold reset
    assert (await host.control(0x23, 3, 4, 1, 0)).status == 0  # SET_FEATURE(PORT_RESET)
    frame = await server.expect(wire.CcidFrame)
    assert ccid.decode_message(frame.message).msg_type == ccid.MessageType.PC_to_RDR_IccPowerOff


async def test_halt_and_clear_halt_and_unknown_requests_follow_usb_chapter_9(
    nursery: trio.Nursery, tunnel_and_server: tuple[Tunnel, FakeServer]
) -> None:
    host, _ = await attached(nursery, tunnel_and_server[0])
    assert (await host.control(0x02, 3, 0, 0x82, 0)).status == 0  # SET_FEATURE(ENDPOINT_HALT)
    assert (await host.control(0x82, 0, 0, 0x82, 2)).data == b"\x01\x00"
    seq = await host.submit(BULK_IN, 1, 64)
    assert (await host.ret()).status == -errno.EPIPE and seq
    assert (await host.control(0x02, 1, 0, 0x82, 0)).status == 0  # CLEAR_FEATURE(ENDPOINT_HALT)
    assert (await host.control(0x82, 0, 0, 0x82, 2)).data == b"\x00\x00"
    assert (await host.control(0x40, 0x55, 0, 0, 0)).status == -errno.EPIPE  # vendor request: stall
    assert (await host.control(0x80, 8, 0, 0, 1)).data == b"\x01"  # GET_CONFIGURATION


async def test_a_lease_lost_under_the_application_removes_the_card_for_a_second(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, _ = await attached(nursery, tunnel)
    await host.submit(INTR_IN, 1, 8)
    assert (await host.ret()).data == b"\x50\x03"
    await hold_lease(tunnel, server)
    await host.submit(INTR_IN, 1, 8)
    await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason="revoked"))
    assert (await host.ret()).data == b"\x50\x02"  # removed
    removed_at = trio.current_time()
    await host.submit(INTR_IN, 1, 8)
    assert (await host.ret()).data == b"\x50\x03"  # back, as a new card
    assert trio.current_time() - removed_at == pytest.approx(1.0)


async def test_a_failed_exchange_answers_a_hardware_error_and_removes_the_card(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, reader = await attached(nursery, tunnel)
    await ccid_exchange(host, ccid.icc_power_on(0))
    await hold_lease(tunnel, server)
    await host.submit(INTR_IN, 1, 8)
    assert (await host.ret()).data == b"\x50\x03"

    async def answer_without_status_word() -> None:
        frame = await server.expect(wire.CcidFrame)
        command = ccid.decode_message(frame.message)
        await server.send(
            wire.CcidFrame(token_id=0, epoch=41, message=ccid.data_block(command.seq, b"").encode())
        )

    nursery.start_soon(answer_without_status_word)
    answer = await ccid_exchange(host, ccid.xfr_block(1, SELECT))
    assert (answer.command_status, answer.error, answer.data) == (ccid.CommandStatus.FAILED, 0xFB, b"")
    failed_at = trio.current_time()
    await host.submit(INTR_IN, 1, 8)
    assert (await host.ret()).data == b"\x50\x02"
    assert trio.current_time() == failed_at  # at once, not at the next heartbeat loss
    assert tunnel.connected
    assert reader.status.apdus == 0


async def test_detaching_gives_a_held_lease_back(
    nursery: trio.Nursery,
    tunnel_and_server: tuple[Tunnel, FakeServer],
    autojump_clock: trio.testing.MockClock,
) -> None:
    tunnel, server = tunnel_and_server
    host, reader = await attached(nursery, tunnel)
    await hold_lease(tunnel, server)
    await host.stream.aclose()
    assert await server.expect(wire.LeaseRelease) == wire.LeaseRelease(token_id=0, epoch=41)
    assert reader.status.state == "exported"
    assert reader.attached_by is None


async def test_a_protocol_error_ends_the_attachment_not_the_client(
    nursery: trio.Nursery, tunnel_and_server: tuple[Tunnel, FakeServer]
) -> None:
    tunnel, _ = tunnel_and_server
    host, reader = await attached(nursery, tunnel)
    await host.submit(BULK_IN, 1, 64)  # a pending URB: its task is running when the error comes
    await host.stream.send_all(struct.pack(">I", 9) + bytes(44))  # no such USB/IP command
    with trio.fail_after(10), pytest.raises(EOFError):
        await host.ret()  # we close the connection
    assert reader.status.reason.startswith("detached: protocol error: USB/IP: unknown command 0x00000009")
    again = await connect(nursery, [reader])  # the exporter still serves, and the device is free again
    assert await again.attach("1-1") is not None
