"""Shared fixtures for tests that drive the real PC/SC stack (pcscd + vpcd + OpenSC).

pcscd is one per machine (socket under /run/pcscd) and other test sessions may be using it, so:
we start pcscd only when it is not running (and then stop only the one we started), we claim a
vpcd slot with an advisory file lock *and* check that its reader shows no card, and we never
kill processes we did not start. Helpers (wait_for, run, simulator_direct) live in e2e_stack.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import (
    VPCD_BASE_PORT,
    SimulatorProcess,
    VpcdSlot,
    _pcscd_running,
    card_states,
    reader_name,
    simulator_direct,
    wait_for,
)

from bridge_admin.local_stack import claim_vpcd_slot


@pytest.fixture(scope="session")
def pcscd() -> Iterator[None]:
    """Make sure pcscd runs with the vpcd readers; start (and later stop) it only if it was not running."""
    for tool in ("pcscd", "opensc-tool", "pkcs11-tool"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; .ci/run installs pcscd, vsmartcard-vpcd and opensc")
    started: subprocess.Popen[bytes] | None = None
    if not _pcscd_running():
        started = subprocess.Popen(
            ["pcscd", "--foreground"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    try:
        wait_for(lambda: reader_name(0) in card_states(), timeout=20, what="pcscd to list the vpcd readers")
        yield
    finally:
        if started is not None:
            started.terminate()
            try:
                started.wait(timeout=10)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait()


@pytest.fixture
def vpcd_slot(pcscd: None) -> Iterator[VpcdSlot]:
    """A vpcd slot nobody else uses: locked against our other sessions and showing no card."""
    with claim_vpcd_slot(timeout=120) as index:
        yield VpcdSlot(index, VPCD_BASE_PORT + index, reader_name(index))


@pytest.fixture
def direct_card(vpcd_slot: VpcdSlot, tmp_path: Path) -> Iterator[SimulatorProcess]:
    """The default simulated token (safenet-5110) inserted straight into a free vpcd slot."""
    with simulator_direct(vpcd_slot, tmp_path) as sim:
        yield sim
