"""L1 as a criterion in `make test`: 30 s of the soak in bench/soak.py (lease churn on both the
vpcd and the CCID path, network faults through the proxy, both daemons as real processes), with
the RSS and open-fd drift of both daemons asserted, not only printed. The hours-long run stays
`python -m bench.soak --minutes 60` with the same checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.soak import drift, drift_violations, soak

# A 30 s run: warm-up is the first 40 % (the daemons' first leases, TLS sessions and caches grow
# RSS at start); after it RSS may move by allocator noise but not grow by more than 10 %, and
# every connection the faults broke must have given its fds back (a few in flight at a sample).
MAX_RSS_DRIFT_PCT = 10.0
MAX_FD_DRIFT = 4


async def test_short_soak_has_no_rss_or_fd_drift(tmp_path: Path) -> None:
    args = argparse.Namespace(minutes=0.5, sample_s=2.0, fault_every_s=4.0, pause_s=0.2, warmup_fraction=0.4)
    result = await soak(args, tmp_path)

    assert result["invariant_violations"] == []
    assert result["vpcd_signatures"] > 0 and result["ccid_signatures"] > 0
    assert sum(result["faults"].values()) >= 2, result["faults"]
    assert len(result["samples"]) >= 8
    problems = drift_violations(result["drift"], max_rss_pct=MAX_RSS_DRIFT_PCT, max_fds=MAX_FD_DRIFT)
    assert problems == [], result["drift"]


def _samples(server_rss: list[int], server_fds: list[int]) -> list[dict[str, object]]:
    return [
        {"t_s": i, "server": {"rss_kb": r, "fds": f}, "client": {"rss_kb": 40000, "fds": 12}}
        for i, (r, f) in enumerate(zip(server_rss, server_fds, strict=True))
    ]


def test_drift_check_catches_a_leak() -> None:
    steady = drift(_samples([50000] * 10, [20] * 10), 0.4)
    assert drift_violations(steady, max_rss_pct=10, max_fds=4) == []
    leaking_memory = drift(_samples([50000 + 2000 * i for i in range(10)], [20] * 10), 0.4)
    assert drift_violations(leaking_memory, max_rss_pct=10, max_fds=4) == [
        "server RSS grew 58000 -> 68000 kB (17.24 %, limit 10 %)"
    ]
    leaking_fds = drift(_samples([50000] * 10, [20 + i for i in range(10)]), 0.4)
    expected = ["server open fds grew 24 -> 29 (limit +4)"]
    assert drift_violations(leaking_fds, max_rss_pct=10, max_fds=4) == expected
    too_short = drift_violations(drift(_samples([1], [1]), 0.4), max_rss_pct=10, max_fds=4)
    assert "server: fewer than two samples, no drift measured" in too_short
