"""Lease policy at its edges: ties between deadlines, held time, epoch bounds (DESIGN §4)."""

from __future__ import annotations

import pytest

from bridge_server.tokens.leases import (
    EPOCH_MAX,
    Dequeued,
    Ended,
    EndReason,
    Granted,
    LeaseBook,
    Queued,
    initial_epoch,
)

QUEUE = 900.0


def book(
    *, linger: float = 2.0, idle: float = 60.0, max_hold: float = 1800.0, first_epoch: int = 100
) -> LeaseBook:
    return LeaseBook(linger_s=linger, idle_timeout_s=idle, max_hold_s=max_hold, first_epoch=first_epoch)


def test_the_held_time_counts_from_the_grant_not_from_zero() -> None:
    b = book()
    b.request(1, "a", 10.0, queue_timeout=QUEUE)
    b.request(2, "b", 12.0, queue_timeout=QUEUE)
    (ended, granted) = b.release(1, 100, 25.0)
    assert ended == Ended(1, "a", 100, EndReason.RELEASED, 15.0, 0)
    assert granted == Granted(2, "b", 101)
    assert b.end(31.0, EndReason.REVOKED)[0] == Ended(2, "b", 101, EndReason.REVOKED, 6.0, 0)


def test_when_linger_and_idle_end_at_the_same_time_the_linger_is_the_reason() -> None:
    b = book(linger=60.0, idle=60.0)
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.note_frame(5.0)
    b.note_power_off(5.0)
    assert b.tick(65.0) == [Ended(1, "a", 100, EndReason.LINGER_EXPIRED, 65.0, 0)]


def test_when_idle_and_max_hold_end_at_the_same_time_idle_is_the_reason() -> None:
    b = book(idle=100.0, max_hold=100.0)
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    assert b.next_deadline() == 100.0
    assert b.tick(100.0) == [Ended(1, "a", 100, EndReason.IDLE_TIMEOUT, 100.0, 0)]


def test_max_hold_ends_a_lease_that_lingers_past_it() -> None:
    b = book(linger=50.0, max_hold=30.0)
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.note_frame(20.0)
    b.note_power_off(20.0)
    assert b.next_deadline() == 30.0
    assert b.tick(30.0) == [Ended(1, "a", 100, EndReason.MAX_HOLD, 30.0, 0)]


def test_the_next_deadline_is_the_earliest_of_the_holders_and_the_waiters() -> None:
    b = book(idle=60.0)
    assert b.next_deadline() is None
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=30.0)
    assert b.next_deadline() == 30.0  # the waiter gives up before the holder idles out
    b.request(3, "c", 0.0, queue_timeout=90.0)
    b.drop(2, 1.0, EndReason.DISCONNECTED)
    assert b.next_deadline() == 60.0  # now the holder's idle timeout comes first


def test_apdus_are_counted_per_lease() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.note_frame(1.0, apdu=True)
    b.note_frame(2.0)  # a frame that is not an APDU (power, status)
    b.note_frame(3.0, apdu=True)
    assert b.release(1, 100, 4.0)[0] == Ended(1, "a", 100, EndReason.RELEASED, 4.0, 2)


def test_a_waiter_leaving_from_the_middle_moves_only_those_behind_it() -> None:
    b = book()
    for conn in range(1, 5):
        b.request(conn, "x", 0.0, queue_timeout=QUEUE)
    assert b.waiting == (2, 3, 4)
    assert b.drop(3, 1.0, EndReason.DISCONNECTED) == [Queued(4, 2)]
    assert b.waiting == (2, 4)


@pytest.mark.parametrize("first", [1, EPOCH_MAX])
def test_the_first_epoch_may_be_anything_a_u32_holds_but_zero(first: int) -> None:
    b = book(first_epoch=first)
    assert b.request(1, "a", 0.0, queue_timeout=QUEUE) == [Granted(1, "a", first)]


@pytest.mark.parametrize("first", [0, EPOCH_MAX + 1, -1])
def test_a_first_epoch_outside_a_u32_is_refused_with_the_range(first: int) -> None:
    with pytest.raises(ValueError, match=rf"^first_epoch must be 1\.\.4294967295, not {first}$"):
        book(first_epoch=first)


def test_the_initial_epoch_is_whole_seconds_of_wall_time_within_a_u32_and_never_zero() -> None:
    assert initial_epoch(2**32 + 5.9) == 5
    assert initial_epoch(float(2**32)) == 1
    assert initial_epoch(1.5) == 1
    assert initial_epoch(2.5) == 2
    assert initial_epoch(float(EPOCH_MAX)) == EPOCH_MAX


def test_a_tick_that_ends_the_lease_also_reports_the_waiters_that_gave_up() -> None:
    b = book(idle=60.0)
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=60.0)
    b.request(3, "c", 0.0, queue_timeout=QUEUE)
    assert b.tick(60.0) == [
        Dequeued(2, EndReason.QUEUE_TIMEOUT),
        Ended(1, "a", 100, EndReason.IDLE_TIMEOUT, 60.0, 0),
        Granted(3, "c", 101),
    ]
