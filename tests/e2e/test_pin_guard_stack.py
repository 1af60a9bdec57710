"""The PIN guard through the real stack (issue 6 "Show"): a wrong PIN in CI cannot lock the token.

pkcs11-tool -> OpenSC -> pcscd -> vpcd -> tokenbridge-client -> TLS -> tokenbridge-server ->
simulated safenet-5110 whose PIV card allows 3 PIN tries; the server guards at 2 retries left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import VpcdSlot

from bridge_admin.local_stack import PIN, BridgeStack
from bridge_admin.signing_tools import pkcs11, pkcs11_sign
from bridge_server.guard.audit import verify_file

pytestmark = pytest.mark.e2e

WRONG_PIN = "000000"


@pytest.fixture
def stack() -> Iterator[BridgeStack]:
    # A short folder: the control socket lives in it and unix socket paths are limited to 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="tb-guard-"))
    s = BridgeStack(folder / "stack")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(folder, ignore_errors=True)


def card_pin_retries(stack: BridgeStack) -> int:
    """The simulated card's own counter, from its persisted state (the card, not the guard)."""
    (state,) = (stack.workdir / "state").glob("*.json")
    return int(json.loads(state.read_text())["pin_left"])


def login(slot: int, pin: str) -> subprocess.CompletedProcess[str]:
    return pkcs11("--login", "--pin", pin, "--list-objects", "--type", "privkey", slot=slot, check=False)


def tokenbridge(stack: BridgeStack, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "bridge_admin.cli",
        *args,
        "--config",
        str(stack.workdir / "server.yaml"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_wrong_pins_stop_at_the_floor_survive_a_restart_and_wait_for_the_operator(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01"])
    stack.write_server_config(allow=["build-vm-01"])  # pin_guard defaults: min_retries_left 2, max_failures 1
    stack.start_server()
    client = stack.start_client("build-vm-01", [slot])
    stack.wait_card(slot, client)
    assert card_pin_retries(stack) == 3

    outputs = [login(slot, WRONG_PIN) for _ in range(5)]
    assert all(p.returncode != 0 for p in outputs)
    assert "CKR_PIN_INCORRECT" in outputs[0].stderr  # the one attempt that reached the card
    assert all("CKR_PIN_LOCKED" in p.stderr for p in outputs[1:]), [p.stderr for p in outputs]
    assert card_pin_retries(stack) == 2  # never below the configured floor

    assert stack.server is not None
    assert stack.server.stop() == 0
    stack.wait_card(slot, client, present=False, timeout=15)
    stack.start_server()
    stack.wait_card(slot, client, timeout=30)

    refused = login(slot, PIN)
    assert refused.returncode != 0
    assert "CKR_PIN_LOCKED" in refused.stderr
    assert card_pin_retries(stack) == 2
    status = tokenbridge(stack, "status", "--json")
    assert status.returncode == 0, status.stderr  # the control plane's status (docs/status.md)
    doc = json.loads(status.stdout)
    (token,) = doc["tokens"]
    assert (token["state"], token["pin_guard"]["engaged"]) == ("guarded", True)
    assert doc["server"]["audit"]["available"] is True

    reset = tokenbridge(stack, "pin-guard", "reset", "codesign", "--json")
    assert reset.returncode == 0, reset.stderr
    answer = json.loads(reset.stdout)["result"]
    assert answer["was_engaged"] is True
    assert any("CI secret" in item for item in answer["check_first"])

    data = tmp_path / "data.bin"
    data.write_bytes(b"after the operator cleared the guard")
    signed = pkcs11_sign(slot, data, tmp_path / "sig.bin", check=False)
    assert signed.returncode == 0, signed.stderr
    assert card_pin_retries(stack) == 3  # a correct PIN restores the card's counter

    stack.stop()  # ends the lease, so its summary line is in the audit log
    audit = stack.workdir / "audit.jsonl"
    assert verify_file(audit).ok
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("pin_guard.engaged") == 1
    assert kinds.count("pin_guard.cleared") == 1
    released = [e for e in events if e["event"] == "lease.released"]
    assert released[-1]["private_key_ops"] == 1
