"""The simulated IN pipe: packets of wMaxPacketSize, ZLPs, partial URBs on cancel, time extensions."""

from __future__ import annotations

from bridge_server.simulator.usb_link import ENOENT, EOVERFLOW, PacketPipe, Urb


def test_message_ends_with_a_short_packet_and_completes_the_urb() -> None:
    pipe = PacketPipe(64)
    pipe.queue(bytes(100), now=0.0)
    urb = Urb(65546)
    pipe.fill(urb, now=0.0)
    assert urb.done and urb.status == 0 and len(urb.data) == 100


def test_message_filling_its_last_packet_is_ended_by_a_zero_length_packet() -> None:
    pipe = PacketPipe(64)
    pipe.queue(bytes(128), now=0.0)
    assert [len(p.data) for p in pipe.packets_of(bytes(128), 0.0)] == [64, 64, 0]
    urb = Urb(65546)
    pipe.fill(urb, now=0.0)
    assert urb.done and len(urb.data) == 128


def test_cancel_mid_message_completes_the_urb_with_the_partial_count() -> None:
    pipe = PacketPipe(64, packet_interval_s=0.1)
    pipe.queue(bytes(range(200)), now=0.0)
    urb = Urb(65546)
    pipe.fill(urb, now=0.15)  # packets at 0.0 and 0.1 have arrived, 0.2 and 0.3 not yet
    assert not urb.done
    PacketPipe.cancel(urb)
    assert urb.status == -ENOENT and bytes(urb.data) == bytes(range(128))
    rest = Urb(65546)
    pipe.fill(rest, now=1.0)  # the remainder arrives in the next transfer
    assert rest.done and bytes(rest.data) == bytes(range(128, 200))


def test_messages_in_a_row_go_to_separate_urbs() -> None:
    pipe = PacketPipe(64)
    pipe.queue(b"a" * 10, now=0.0)
    pipe.queue(b"b" * 10, now=0.0)
    first, second = Urb(100), Urb(100)
    pipe.fill(first, now=0.0)
    pipe.fill(second, now=0.0)
    assert bytes(first.data) == b"a" * 10 and bytes(second.data) == b"b" * 10


def test_held_message_is_announced_by_time_extensions_until_ready() -> None:
    pipe = PacketPipe(64, time_extension_interval_s=0.05)
    pipe.queue(b"final", now=0.0, delay_s=0.12, time_extension=b"wtx")
    seen = []
    for now in (0.0, 0.06, 0.12):
        urb = Urb(100)
        pipe.fill(urb, now=now)
        seen.append(bytes(urb.data))
    assert seen == [b"wtx", b"wtx", b"final"]


def test_packet_larger_than_the_room_left_overflows() -> None:
    pipe = PacketPipe(64)
    pipe.queue(bytes(100), now=0.0)
    urb = Urb(32)
    pipe.fill(urb, now=0.0)
    assert urb.done and urb.status == -EOVERFLOW


def test_pipe_is_busy_while_an_answer_is_held_and_a_busy_answer_jumps_ahead() -> None:
    pipe = PacketPipe(64)
    pipe.queue(b"slow answer", now=0.0, delay_s=1.0, time_extension=b"wtx")
    assert pipe.busy(0.5)
    pipe.queue(b"busy", now=0.5, ahead=True)  # a reader's CMD_SLOT_BUSY to the next command
    seen = []
    for now in (0.5, 0.5, 1.0):
        urb = Urb(100)
        pipe.fill(urb, now=now)
        seen.append(bytes(urb.data))
    assert seen == [b"wtx", b"busy", b"slow answer"]  # the time extension was already on its way
    assert not pipe.busy(1.0)
