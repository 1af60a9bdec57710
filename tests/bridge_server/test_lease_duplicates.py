"""Which lease requests are duplicates: the token task asks `LeaseBook.knows` before it audits one.

A connection that holds the lease or waits for it and asks again is a duplicate (it costs no
audit line, issue 13 item 3); any other connection's request is a new one and must be audited
and queued. Getting this wrong either floods the audit log or hides a real request from it.
"""

from __future__ import annotations

from bridge_server.tokens.leases import EndReason, LeaseBook

QUEUE = 900.0


def _book() -> LeaseBook:
    return LeaseBook(linger_s=2.0, idle_timeout_s=60.0, max_hold_s=1800.0, first_epoch=1)


def test_an_empty_book_knows_no_connection() -> None:
    assert not _book().knows(1)


def test_the_holder_and_each_waiter_are_known_and_nobody_else() -> None:
    book = _book()
    book.request(1, "vm1", 0.0, queue_timeout=QUEUE)  # holds
    book.request(2, "vm2", 0.0, queue_timeout=QUEUE)  # waits first
    book.request(3, "vm3", 0.0, queue_timeout=QUEUE)  # waits second
    assert [book.knows(conn_id) for conn_id in (1, 2, 3, 4)] == [True, True, True, False]


def test_a_holder_without_waiters_is_known_and_another_connection_is_not() -> None:
    book = _book()
    book.request(7, "vm7", 0.0, queue_timeout=QUEUE)
    assert book.knows(7)
    assert not book.knows(8)


def test_a_connection_that_left_the_queue_or_released_is_not_known_any_more() -> None:
    book = _book()
    book.request(1, "vm1", 0.0, queue_timeout=QUEUE)
    book.request(2, "vm2", 0.0, queue_timeout=QUEUE)
    book.request(3, "vm3", 0.0, queue_timeout=QUEUE)
    book.drop(2, 1.0, EndReason.DISCONNECTED)  # a waiter goes
    assert [book.knows(conn_id) for conn_id in (1, 2, 3)] == [True, False, True]
    book.release(1, 1, 2.0)  # the holder goes, 3 takes over
    assert [book.knows(conn_id) for conn_id in (1, 2, 3)] == [False, False, True]
