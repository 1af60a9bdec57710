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
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[2]
OPENSC_PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
PKCS11_ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
VPCD_BASE_PORT = 35963
VPCD_SLOTS = (0, 1)
PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
LOCK_DIR = Path(os.environ.get("TOKENBRIDGE_E2E_LOCK_DIR", "/tmp"))

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or condition!r}")
        time.sleep(interval)  # polling interval, not synchronisation: the deadline bounds the wait


def run(cmd: list[str], *, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def reader_name(slot: int) -> str:
    return f"Virtual PCD 00 {slot:02d}"


def card_states() -> dict[str, bool]:
    """Reader name -> card present, as pcscd sees it (`opensc-tool -l`)."""
    out = run(["opensc-tool", "-l"], check=False, timeout=20).stdout
    states: dict[str, bool] = {}
    for line in out.splitlines():
        m = re.match(r"^\s*\d+\s+(Yes|No)\s+.*?(Virtual PCD \d\d \d\d)\s*$", line)
        if m:
            states[m.group(2)] = m.group(1) == "Yes"
    return states


def card_present(slot: int) -> bool:
    return card_states().get(reader_name(slot), False)


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
