"""Smoke test of the benchmark harness (`make bench`), so it cannot rot: the pure helpers, the
ctypes PC/SC binding, and a few timed APDUs against the direct simulator through real pcscd."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run
from bench.pcsc import Card, PcscError
from bench.stats import machine, percentile, summarize_ms, table

pytestmark = pytest.mark.e2e


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert summarize_ms([0.001] * 3) == {"n": 3, "p50_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0}


def test_table_aligns_columns_and_machine_names_the_cpu() -> None:
    text = table([("added latency p50", "0.4 ms", "<= 0.5 ms", "yes")])
    assert text.splitlines()[0].split() == ["metric", "measured", "budget", "ok"]
    assert "added latency p50  0.4 ms" in text
    info = machine()
    assert info["cores"] and info["kernel"] and info["python"]


def test_pcsc_binding_reports_an_unknown_reader_as_an_error(pcscd: None) -> None:
    with pytest.raises(PcscError, match="SCardConnect failed: 0x8010"):
        Card("no such reader 99")


@pytest.mark.parametrize("baseline", run.BASELINES)  # "usb": simulator --via-usb
def test_direct_simulator_answers_timed_apdus_through_pcscd(
    pcscd: None, tmp_path: Path, baseline: str
) -> None:
    with run.claim_vpcd_slot() as slot, run.direct_simulator(slot, tmp_path, baseline=baseline):
        samples, rate = run.apdu_samples(slot, 30, warmup=3)
    assert len(samples) == 30
    assert all(0 < s < 1.0 for s in samples)
    assert rate > 10
