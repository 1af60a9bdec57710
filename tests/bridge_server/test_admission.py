"""HandshakeBook: who keeps a place before the TLS handshake (bridge_server/net/admission.py)."""

from __future__ import annotations

import pytest

from bridge_server.net.admission import MAX_FIRST_RECORD, HandshakeBook, first_record_size


def book(**overrides: int | float) -> HandshakeBook:
    limits: dict[str, int | float] = {
        "max_waiting": 4,
        "max_waiting_per_source": 3,
        "max_handshakes": 2,
        "evict_after_s": 1.0,
    }
    limits.update(overrides)
    return HandshakeBook(**limits)  # type: ignore[arg-type]


def test_an_arrival_over_the_per_source_bound_evicts_that_sources_oldest_silent_connection() -> None:
    b = book()
    assert [b.arrive(k, "10.0.0.9", now=k) for k in range(3)] == [(), (), ()]
    assert b.arrive(3, "10.0.0.9", now=3) == (0,)
    assert 0 not in b and 3 in b


def test_a_flood_from_one_source_evicts_its_own_connections_not_another_sources() -> None:
    b = book(max_waiting=4, max_waiting_per_source=10)
    b.arrive(100, "10.0.0.1", now=0)  # an allowed client, still sending its hello
    evicted = [k for i in range(10) for k in b.arrive(i, "10.0.0.9", now=1 + i)]
    assert 100 in b
    assert evicted == list(range(7))


def test_a_connection_whose_client_hello_arrived_is_evicted_after_the_silent_ones() -> None:
    b = book(max_waiting_per_source=2)
    b.arrive(0, "h", now=0)
    b.hello_received(0)
    b.arrive(1, "h", now=1)
    assert b.arrive(2, "h", now=2) == (1,)  # the silent one goes, the oldest (with a hello) stays


def test_a_slot_is_taken_over_from_the_oldest_holder_only_after_evict_after_s() -> None:
    b = book(max_handshakes=1, evict_after_s=1.0)
    for key in (0, 1):
        b.arrive(key, "h", now=0)
        b.hello_received(key)
    assert b.want_slot(0, now=0).granted
    answer = b.want_slot(1, now=0.5)
    assert not answer.granted and answer.retry_at == 1.0
    answer = b.want_slot(1, now=1.0)
    assert answer.granted and answer.evicted == (0,)
    assert b.leave(0) is False  # already evicted: frees nothing more
    assert b.leave(1) is True


def test_silent_connections_never_take_a_handshake_slot() -> None:
    b = book(max_waiting=1000, max_waiting_per_source=1000)
    for key in range(500):
        b.arrive(key, "h", now=0)
    assert b.handshaking == 0 and b.waiting == 500


@pytest.mark.parametrize(
    ("head", "size"),
    [
        (b"", None),
        (b"\x16\x03\x01", None),
        (b"\x16\x03\x01\x00\xee", 5 + 0xEE),
        (b"GET / HTTP/1.1", 14),  # not TLS: hand it over now, the TLS library says why
        (b"\x16\x03\x01\xff\xff", 5),  # longer than a record can be
    ],
)
def test_first_record_size(head: bytes, size: int | None) -> None:
    assert first_record_size(head) == size
    assert MAX_FIRST_RECORD < 0xFFFF
