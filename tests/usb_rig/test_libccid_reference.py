"""The simulator checked against the reference host stack: pcscd + Debian's libccid (issue 15).

The same emulated token the server uses (tests/support/usb_rig) is driven by pcscd 1.9.9 with
libccid 1.5.2 in a private mount namespace (its own /run/pcscd; the machine's shared pcscd is
not touched), and OpenSC reads the certificate and signs through it. If libccid accepts the
simulated device, its descriptors, its CCID answers and its T=1 are what a real reader
driver expects, not only what our own driver expects. Needs root (a mount namespace).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from procstack import verify_signature
from usb_rig.rig import ALL_PROFILES, emulated_token

from bridge_admin.signing_tools import OPENSC_PKCS11
from protocol.atr import Atr
from protocol.ccid import MessageType

NS_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "usb_rig" / "pcscd_ns.sh"
# The four default profiles, the rig-only 5110+ FIPS reader where libccid sends a PPS, and a
# T=0 card on the 5110 reader.
PROFILE_NAMES = [
    "safenet-5110",
    "yubikey5",
    "etoken-fusion",
    "epass2003",
    "safenet-5110-fips",
    "safenet-5110-t0",
]


def reference_host_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private mount namespace (unshare --mount)"
    if shutil.which("pcscd") is None or not Path("/usr/lib/pcsc/drivers/ifd-ccid.bundle").exists():
        return "pcscd and libccid are not installed (apt-get install pcscd libccid)"
    return None


def run_in_namespace(umockdev_dir: str, work: Path, script: str) -> subprocess.CompletedProcess[str]:
    cmd = ["unshare", "--mount", "--propagation", "unchanged"]
    cmd += ["bash", str(NS_SCRIPT), umockdev_dir, str(work)]
    return subprocess.run(
        [*cmd, "bash", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_pcscd_with_libccid_reads_and_signs_on_the_emulated_token(tmp_path: Path, profile: str) -> None:
    problem = reference_host_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the libccid reference check cannot run: {problem}")
        pytest.skip(problem)
    data = tmp_path / "data.bin"
    data.write_bytes(b"checked against libccid " * 8)
    module = str(OPENSC_PKCS11)
    script = (
        f"set -e; opensc-tool --atr; "
        f"pkcs11-tool --module {module} --slot-index 0 --read-object --type cert --id 01 "
        f"--output-file {tmp_path}/cert.der; "
        f"pkcs11-tool --module {module} --slot-index 0 --login --pin 123456 --sign --id 01 "
        f"-m SHA256-RSA-PKCS --input-file {data} --output-file {tmp_path}/sig.bin"
    )
    with emulated_token(tmp_path / "usb", profile) as token:
        proc = run_in_namespace(token.umockdev_dir, tmp_path, script)
    log = (tmp_path / "pcscd.log").read_text(errors="replace") if (tmp_path / "pcscd.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- pcscd.log (tail) ---\n{log[-4000:]}"
    atr = bytes.fromhex(re.sub(r"[^0-9a-fA-F]", "", proc.stdout.splitlines()[0]))
    assert atr == ALL_PROFILES[profile].atr
    assert f"Found Vendor/Product: {ALL_PROFILES[profile].vid:04X}/{ALL_PROFILES[profile].pid:04X}" in log
    # What libccid did at power-up, to compare with our driver (tests/usb_rig/test_libusb_session):
    # SetParameters and an S(IFS request) for IFSD min(dwMaxIFSD, 254) only on the TPDU reader.
    sent = [(e["type"], e["head"]) for e in token.events()]
    tpdu = ALL_PROFILES[profile].descriptor.exchange_level.value == "tpdu"
    assert (MessageType.PC_to_RDR_SetParameters in [t for t, _ in sent]) is tpdu
    t1 = tpdu and 1 in Atr.parse(ALL_PROFILES[profile].atr).protocols  # no S(IFS) with T=0
    assert ((MessageType.PC_to_RDR_XfrBlock, "00c1") in sent) is t1
    if t1:
        ifsd = min(ALL_PROFILES[profile].descriptor.max_ifsd, 254)
        assert f"T=1: IFSC=254, IFSD={ifsd}" in log
    # PPS (issue 15 item 5): libccid negotiates TA1 only on the reader without automatic PPS
    # whose card is faster than the default rate; test_libusb_pps checks our driver does the same.
    pps = [head for kind, head in sent if kind == MessageType.PC_to_RDR_XfrBlock and head.startswith("ff")]
    fidi = [head[:2] for kind, head in sent if kind == MessageType.PC_to_RDR_SetParameters]
    assert pps == (["ff11"] if profile == "safenet-5110-fips" else [])
    assert set(fidi) <= ({"96"} if profile == "safenet-5110-fips" else {"11"})
    pem = tmp_path / "cert.pem"
    der = (tmp_path / "cert.der").read_bytes()
    pem.write_bytes(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM))
    verify_signature(pem, data.read_bytes(), (tmp_path / "sig.bin").read_bytes())
