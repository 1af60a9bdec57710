"""Pure lease policy: FIFO, deadlines, linger, epochs (DESIGN §4)."""

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
    Refusal,
    initial_epoch,
)

LINGER, IDLE, MAX_HOLD, QUEUE = 2.0, 60.0, 1800.0, 900.0


def book(first_epoch: int = 100, **kw: float) -> LeaseBook:
    params = {"linger_s": LINGER, "idle_timeout_s": IDLE, "max_hold_s": MAX_HOLD, **kw}
    return LeaseBook(first_epoch=first_epoch, **params)


def test_first_request_is_granted_at_once_with_the_first_epoch() -> None:
    b = book()
    assert b.request(1, "vm1", 0.0, queue_timeout=QUEUE) == [Granted(1, "vm1", 100)]
    assert b.holder is not None
    assert b.holder.conn_id == 1


def test_waiters_are_granted_in_fifo_order_with_increasing_epochs() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    assert b.request(2, "b", 1.0, queue_timeout=QUEUE) == [Queued(2, 1)]
    assert b.request(3, "c", 2.0, queue_timeout=QUEUE) == [Queued(3, 2)]
    assert b.release(1, 100, 5.0) == [
        Ended(1, "a", 100, EndReason.RELEASED, 5.0, 0),
        Granted(2, "b", 101),
        Queued(3, 1),
    ]
    assert b.release(2, 101, 6.0)[1] == Granted(3, "c", 102)


def test_duplicate_request_is_refused_without_changing_the_queue() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=QUEUE)
    assert b.request(1, "a", 1.0, queue_timeout=QUEUE) == [Refusal(1, "already_leased")]
    assert b.request(2, "b", 1.0, queue_timeout=QUEUE) == [Refusal(2, "already_leased")]
    assert b.waiting == (2,)


def test_waiter_leaves_the_queue_at_exactly_its_deadline_and_others_move_up() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 10.0, queue_timeout=30.0)
    b.request(3, "c", 20.0, queue_timeout=QUEUE)
    assert b.next_deadline() == 40.0
    assert b.tick(39.999) == []
    assert b.tick(40.0) == [Dequeued(2, EndReason.QUEUE_TIMEOUT), Queued(3, 1)]


def test_linger_ends_the_lease_exactly_linger_s_after_power_off() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.note_frame(3.0, apdu=True)
    b.note_power_off(3.0)
    assert b.next_deadline() == 3.0 + LINGER
    assert b.tick(4.9) == []
    assert b.tick(5.0) == [Ended(1, "a", 100, EndReason.LINGER_EXPIRED, 5.0, 1)]


def test_a_frame_after_power_off_cancels_the_linger() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.note_frame(3.0)
    b.note_power_off(3.0)
    b.note_frame(4.0)
    assert b.tick(5.0) == []
    assert b.next_deadline() == 4.0 + IDLE


def test_idle_timeout_counts_from_the_last_frame() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.note_frame(10.0, apdu=True)
    assert b.tick(69.0) == []
    events = b.tick(70.0)
    assert events == [Ended(1, "a", 100, EndReason.IDLE_TIMEOUT, 70.0, 1)]


def test_max_hold_ends_a_busy_lease_and_grants_the_next() -> None:
    b = book(max_hold_s=100.0)
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=QUEUE)
    for t in range(10, 100, 10):
        b.note_frame(float(t), apdu=True)
    assert b.tick(100.0) == [Ended(1, "a", 100, EndReason.MAX_HOLD, 100.0, 9), Granted(2, "b", 101)]


def test_disconnect_of_the_holder_releases_and_of_a_waiter_dequeues() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=QUEUE)
    b.request(3, "c", 0.0, queue_timeout=QUEUE)
    assert b.drop(2, 1.0, EndReason.DISCONNECTED) == [Queued(3, 1)]
    assert b.drop(1, 2.0, EndReason.HEARTBEAT_LOST) == [
        Ended(1, "a", 100, EndReason.HEARTBEAT_LOST, 2.0, 0),
        Granted(3, "c", 101),
    ]
    assert b.drop(99, 3.0, EndReason.DISCONNECTED) == []


def test_frames_are_checked_against_holder_and_epoch() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    assert b.check_frame(1, 100) is None
    assert b.check_frame(1, 99) == "stale_epoch"
    assert b.check_frame(2, 100) == "lease_required"
    assert b.release(1, 99, 1.0) == [Refusal(1, "stale_epoch")]


def test_epoch_strictly_increases_across_many_leases_and_wraps_to_one() -> None:
    b = book(first_epoch=EPOCH_MAX - 1)
    epochs = []
    for conn in range(4):
        (granted,) = b.request(conn, "x", 0.0, queue_timeout=QUEUE)
        assert isinstance(granted, Granted)
        epochs.append(granted.epoch)
        b.release(conn, granted.epoch, 0.0)
    assert epochs == [EPOCH_MAX - 1, EPOCH_MAX, 1, 2]


def test_initial_epoch_follows_wall_time_so_restarts_do_not_repeat_epochs() -> None:
    assert initial_epoch(1_700_000_000.7) == 1_700_000_000
    assert initial_epoch(1_700_000_100.0) > initial_epoch(1_700_000_000.0)
    assert initial_epoch(0.0) == 1


def test_unplug_ends_the_lease_and_waiters_are_granted_on_replug() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=QUEUE)
    assert b.set_present(False, 5.0) == [Ended(1, "a", 100, EndReason.TOKEN_GONE, 5.0, 0)]
    assert b.request(3, "c", 6.0, queue_timeout=QUEUE) == [Queued(3, 2)]
    assert b.set_present(True, 7.0) == [Granted(2, "b", 101), Queued(3, 1)]


def test_absent_token_queues_the_first_request() -> None:
    b = LeaseBook(linger_s=1, idle_timeout_s=1, max_hold_s=1, first_epoch=5, present=False)
    assert b.request(1, "a", 0.0, queue_timeout=QUEUE) == [Queued(1, 1)]


def test_shutdown_ends_the_holder_dequeues_waiters_and_grants_nothing() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    b.request(2, "b", 0.0, queue_timeout=QUEUE)
    assert b.shutdown(3.0) == [
        Ended(1, "a", 100, EndReason.SHUTDOWN, 3.0, 0),
        Dequeued(2, EndReason.SHUTDOWN),
    ]
    assert b.request(3, "c", 4.0, queue_timeout=QUEUE) == [Refusal(3, "shutting_down")]
    assert b.next_deadline() is None


def test_revoke_ends_the_lease_with_the_given_reason() -> None:
    b = book()
    b.request(1, "a", 0.0, queue_timeout=QUEUE)
    assert b.end(1.0, EndReason.REVOKED) == [Ended(1, "a", 100, EndReason.REVOKED, 1.0, 0)]
    assert b.end(2.0, EndReason.REVOKED) == []


def test_first_epoch_out_of_range_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="first_epoch"):
        LeaseBook(linger_s=1, idle_timeout_s=1, max_hold_s=1, first_epoch=0)
