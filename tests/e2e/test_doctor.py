"""`tokenbridge doctor` reports each failure it claims to detect when that failure is staged."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_stack import admin_stack

from bridge_admin.client import Target, call_sync
from bridge_admin.doctor import run_checks
from bridge_admin.local_stack import BridgeStack, wait_for
from bridge_admin.pki import Pki


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeStack]:
    with admin_stack(
        tmp_path_factory.mktemp("doctor"), ["build-vm-01", "intruder"], ["build-vm-01", "old-vm"]
    ) as s:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        s.pki.issue_client("old-vm", days=1, not_before=past)
        yield s


def _status(stack: BridgeStack, name: str, *, ca: Path | None = None) -> dict[str, tuple[str, str]]:
    config = stack.write_client_config(name, [0])
    if ca is not None:
        bundle = stack.pki.folder / "clients" / name
        config.write_text(config.read_text().replace(f"ca: {bundle}/ca.pem", f"ca: {ca}"))
    return {c.name: (c.status, c.detail + " " + c.fix) for c in run_checks(config)}


def test_a_ready_vm_passes_and_the_exit_code_says_so(stack: BridgeStack) -> None:
    config = stack.write_client_config("build-vm-01", [0])
    proc = subprocess.run(
        [sys.executable, "-m", "bridge_admin.cli", "doctor", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    doc = json.loads(proc.stdout)
    by_name = {c["name"]: c["status"] for c in doc["checks"]}
    assert (proc.returncode, doc["ok"]) == (0, True), proc.stdout
    assert by_name["server"] == by_name["token codesign"] == by_name["certificates"] == "ok"


def test_pcscd_absent_is_reported_with_the_fix(stack: BridgeStack, tmp_path: Path) -> None:
    config = stack.write_client_config("build-vm-01", [0])
    checks = {c.name: c for c in run_checks(config, pcscd_socket=tmp_path / "no-pcscd.comm")}
    assert checks["pcscd"].status == "fail"
    assert "systemctl" in checks["pcscd"].fix


def test_wrong_ca_is_reported(stack: BridgeStack, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    other.init(name="another CA")
    status = _status(stack, "build-vm-01", ca=other.ca_cert_path)
    assert status["certificates"][0] == "fail" and "not signed by the CA" in status["certificates"][1]
    assert status["server"][0] == "fail"


def test_expired_certificate_is_reported(stack: BridgeStack) -> None:
    status = _status(stack, "old-vm")
    assert status["certificates"][0] == "fail" and "expired" in status["certificates"][1]
    assert status["server"][0] == "fail" and "expired" in status["server"][1]


def test_identity_not_allowed_is_reported(stack: BridgeStack) -> None:
    status = _status(stack, "intruder")
    assert status["server"][0] == "fail" and "not_allowed" in status["server"][1]


def test_token_absent_is_reported(stack: BridgeStack) -> None:
    sock = Target(socket=stack.workdir / "control.sock")
    assert call_sync(sock, "simulator.unplug", {"token": "codesign"})["ok"]
    try:
        # The server notices the unplug at its next presence poll: wait on time, not on a count
        # of doctor runs (fast runs outpaced the poll on a loaded machine).
        def absent() -> dict[str, tuple[str, str]] | None:
            status = _status(stack, "build-vm-01")
            return status if status["token codesign"][0] == "fail" else None

        status = wait_for(absent, timeout=20, what="doctor to see the token unplugged")
        assert "not plugged in" in status["token codesign"][1]
    finally:
        call_sync(sock, "simulator.replug", {"token": "codesign"})
