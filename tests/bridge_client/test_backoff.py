"""The reconnect schedule: exponential, capped, jittered within bounds, reset on success."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from bridge_client.backoff import Backoff


def test_delays_double_from_the_initial_delay_until_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, jitter=0.0)
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.failures == 9


def test_reset_after_a_success_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(initial_s=1.0, max_s=8.0, jitter=0.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert [backoff.next_delay(), backoff.next_delay()] == [1.0, 2.0]


def test_a_daemon_that_fails_for_days_stays_at_the_cap_without_overflow() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, jitter=0.0)
    delays = [backoff.next_delay() for _ in range(10_000)]
    assert delays[-1] == 30.0
    assert max(delays) == 30.0


def test_jitter_spreads_delays_within_plus_minus_the_fraction_of_the_nominal_delay() -> None:
    backoff = Backoff(initial_s=1.0, max_s=4.0, jitter=0.2, rng=random.Random(7))
    nominal = [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    delays = [backoff.next_delay() for _ in nominal]
    for got, nom in zip(delays, nominal, strict=True):
        assert nom * 0.8 <= got <= nom * 1.2
    # A fleet restarted together must not retry in lock step: the capped delays differ.
    assert len(set(delays[3:])) == len(delays[3:])


def test_the_same_seed_gives_the_same_schedule() -> None:
    def schedule(seed: int) -> list[float]:
        backoff = Backoff(initial_s=0.5, max_s=30.0, jitter=0.2, rng=random.Random(seed))
        return [backoff.next_delay() for _ in range(8)]

    assert schedule(1) == schedule(1)
    assert schedule(1) != schedule(2)


@given(
    initial=st.floats(min_value=0.01, max_value=10.0),
    factor=st.floats(min_value=1.0, max_value=100.0),
    jitter=st.floats(min_value=0.0, max_value=0.9),
    seed=st.integers(min_value=0, max_value=2**32),
    attempts=st.integers(min_value=1, max_value=80),
)
def test_every_delay_is_within_the_jittered_bounds_of_the_capped_nominal(
    initial: float, factor: float, jitter: float, seed: int, attempts: int
) -> None:
    cap = initial * factor
    backoff = Backoff(initial_s=initial, max_s=cap, jitter=jitter, rng=random.Random(seed))
    for n in range(attempts):
        nominal = min(cap, initial * 2**n)
        delay = backoff.next_delay()
        assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal * (1 + jitter) + 1e-9
        assert delay >= 0.0
