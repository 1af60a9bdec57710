"""`tokenbridge selftest` against a token on the real libusb stack (the umockdev rig).

What a user runs on the token host (`tokenbridge selftest --config server.yaml --json
--pin-from ...`), as a separate process, finding the token as the server does through the
config's `match: {vid, pid, serial}`, pyusb's libusb1 backend and libusb 1.0 talking usbdevfs to
the emulated device (tests/support/usb_rig). The report must describe the token the rig
emulates (identity from its profile, the ATR bytes), the login and signature must succeed with
the signature verified against the card's certificate, the PIN must appear in no output, and
the emulated device itself must have seen the bulk traffic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from usb_rig.rig import emulated_token

from bridge_server.simulator.profiles import PROFILES

pytestmark = pytest.mark.e2e

PIN = "123456"  # the emulated card's PIN (bridge_server/simulator/piv.py default)


def _server_yaml(folder: Path, match: dict[str, object]) -> Path:
    path = folder / "server.yaml"
    path.write_text(
        "tls: {ca: ca.pem, cert: server.pem, key: server.key}\n"
        "tokens:\n"
        f"  - name: codesign\n"
        f"    match: {{vid: {match['vid']}, pid: {match['pid']}, serial: '{match['serial']}'}}\n"
        "    allow: [build-vm-01]\n"
    )
    return path


@pytest.mark.parametrize("profile", ["yubikey5", "safenet-5110"])
def test_selftest_finds_the_emulated_token_over_libusb_and_signs(tmp_path: Path, profile: str) -> None:
    with emulated_token(tmp_path / "usb", profile) as token:
        config = _server_yaml(tmp_path, token.match())
        cmd = [sys.executable, "-m", "bridge_admin.cli", "selftest", "--config", str(config)]
        cmd += ["--json", "--no-replug", "--pin-from", "env:TB_SELFTEST_PIN"]
        done = subprocess.run(
            token.wrap(cmd),
            env={**token.env, "TB_SELFTEST_PIN": PIN},
            capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        events = token.events()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    p = PROFILES[profile]
    assert report["target"] == f"config {config} token codesign"
    usb = report["usb"]
    assert (usb["idVendor"], usb["idProduct"]) == (f"0x{p.vid:04X}", f"0x{p.pid:04X}")
    assert usb["iSerialNumber"] == p.serial
    assert bytes.fromhex(report["atr"]["raw"]) == p.atr
    steps = {s["step"]: s["status"] for s in report["steps"]}
    assert steps["login"] == "ok" and steps["signature"] == "ok", report["steps"]
    assert steps["replug"] == "skipped"
    assert report["signature"]["verified"] is True
    assert PIN not in done.stdout + done.stderr
    assert PIN.encode().hex() not in (done.stdout + done.stderr).lower()
    # The emulated device really was driven over usbdevfs: power-on and XfrBlocks reached it.
    kinds = {e["type"] for e in events}
    assert {0x62, 0x6F} <= kinds, kinds  # PC_to_RDR_IccPowerOn, PC_to_RDR_XfrBlock
    assert os.environ.get("UMOCKDEV_DIR") is None  # the test process itself was never wrapped
