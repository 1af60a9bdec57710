"""Helpers for tests that drive the real PC/SC stack (pcscd + vpcd + OpenSC); fixtures are in conftest.py.

pcscd is one per machine (socket under /run/pcscd) and other test sessions may be using it, so:
we start pcscd only when it is not running (and then stop only the one we started), we claim a
vpcd slot with an advisory file lock *and* check that its reader shows no card, and we never
kill processes we did not start. Waiting is polling with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# One implementation of these for the demo and the tests (bridge_admin/local_stack.py).
from bridge_admin.local_stack import (
    LOCK_DIR,
    VPCD_BASE_PORT,
    VPCD_SLOTS,
    card_present,
    card_states,
    reader_name,
    run,
    wait_for,
)
from bridge_admin.signing_tools import OPENSC_PKCS11

__all__ = [
    "LOCK_DIR",
    "OPENSC_PKCS11",
    "VPCD_BASE_PORT",
    "VPCD_SLOTS",
    "card_present",
    "card_states",
    "reader_name",
    "run",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[2]
PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")

T = TypeVar("T")


def _pcscd_running() -> bool:
    pid_file = Path("/run/pcscd/pcscd.pid")
    if not PCSCD_SOCKET.exists() or not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class VpcdSlot:
    index: int
    port: int
    reader: str


@dataclass
class SimulatorProcess:
    proc: subprocess.Popen[bytes]
    slot: VpcdSlot
    stats_path: Path
    log_path: Path

    def stats(self) -> dict[str, int]:
        if not self.stats_path.exists():
            return {"apdus": 0, "signatures": 0, "pin_attempts": 0, "resets": 0}
        return dict(json.loads(self.stats_path.read_text()))


@contextlib.contextmanager
def simulator_direct(
    slot: VpcdSlot, workdir: Path, *, profile: str = "safenet-5110", state: Path | None = None
) -> Iterator[SimulatorProcess]:
    """Run `python -m bridge_server.simulator` in `slot` until the card shows up; stop it by pid."""
    stats = workdir / f"sim-{slot.index}-stats.json"
    log_path = workdir / f"sim-{slot.index}.log"
    cmd = [sys.executable, "-m", "bridge_server.simulator", "--vpcd", f"127.0.0.1:{slot.port}"]
    cmd += ["--profile", profile, "--stats", str(stats)]
    if state is not None:
        cmd += ["--state", str(state)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    sim = SimulatorProcess(proc, slot, stats, log_path)
    try:
        wait_for(
            lambda: proc.poll() is not None or card_present(slot.index),
            timeout=20,
            what=f"the simulated card in {slot.reader}",
        )
        if proc.poll() is not None:
            raise AssertionError(f"simulator exited with {proc.returncode}:\n{log_path.read_text()}")
        yield sim
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        wait_for(lambda: not card_present(slot.index), timeout=20, what=f"{slot.reader} to be empty")
