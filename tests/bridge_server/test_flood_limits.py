"""Flood limits (bridge_server/guard/flood_limits.py): token buckets and the refusal digest."""

from __future__ import annotations

from bridge_server.guard.flood_limits import (
    REFUSALS_AUDITED_PER_LEASE,
    SUMMARY_INTERVAL_S,
    PenaltyBox,
    RateMeter,
    RefusalDigest,
)


def test_a_burst_is_allowed_then_the_sender_is_over_the_limit_until_the_bucket_refills() -> None:
    meter = RateMeter(rate_per_s=2.0, burst=3)
    assert [meter.take("vm1", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert meter.take("vm2", now=0.0)  # per identity
    assert not meter.take("vm1", now=0.25)
    assert meter.take("vm1", now=0.5)


def test_sustained_rate_below_the_limit_is_never_over() -> None:
    meter = RateMeter(rate_per_s=20.0, burst=200)
    assert all(meter.take("vm1", now=i / 19) for i in range(10_000))


def test_the_first_refusals_are_audited_and_the_rest_summed_up() -> None:
    digest = RefusalDigest()
    audited = [digest.note("policy", 0xDB, now=float(i)) for i in range(REFUSALS_AUDITED_PER_LEASE + 5)]
    assert audited == [True] * REFUSALS_AUDITED_PER_LEASE + [False] * 5
    assert digest.take_summary(now=30.0) == {"count": 5, "reasons": {"policy": 5}, "ins": {"DB": 5}}
    assert digest.take_summary(now=31.0) is None


def test_a_summary_is_due_an_interval_after_the_first_counted_refusal() -> None:
    digest = RefusalDigest(audited=REFUSALS_AUDITED_PER_LEASE)
    digest.note("pin_guard", 0x20, now=100.0)
    assert not digest.summary_due(100.0 + SUMMARY_INTERVAL_S - 1)
    assert digest.summary_due(100.0 + SUMMARY_INTERVAL_S)


def test_a_ban_lasts_penalty_s_and_only_its_first_refusal_is_reported() -> None:
    box = PenaltyBox(penalty_s=30.0)
    assert box.remaining("vm1", now=0.0) is None
    box.ban("vm1", now=10.0)
    assert box.remaining("vm1", now=25.0) == 15.0
    assert [box.first_refusal("vm1") for _ in range(3)] == [True, False, False]
    assert box.remaining("vm1", now=40.0) is None
    box.ban("vm1", now=50.0)
    assert box.first_refusal("vm1")  # a new ban is reported again
