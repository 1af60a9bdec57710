"""The whole PC/SC chain through the client's USB/IP reader, without a kernel module (issue 21).

pkcs11-tool / osslsigncode -> OpenSC -> pcscd 1.9.9 with Debian's libccid 1.5.2 -> libusb ->
usbdevfs (umockdev) -> usbip_handler.py, a USB/IP importer written from the kernel document ->
USB/IP on loopback -> tokenbridge-client `reader: usbip` -> TLS 1.3 -> tokenbridge-server -> the
simulated token. pcscd runs in a private mount namespace with its own socket (pcscd_ns.sh), so the
machine's shared pcscd is not touched. Needs root (a mount namespace).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from procstack import verify_signature
from usb_rig.usbip_rig import UsbipStack, imported_reader

from bridge_admin.local_stack import wait_for
from bridge_admin.signing_tools import OPENSC_PKCS11, minimal_pe, osslsigncode_sign_command
from bridge_server.simulator.profiles import PROFILES

NS_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "usb_rig" / "pcscd_ns.sh"
CLIENT = "build-vm-01"
SERIAL_SED = "s/.*serial num *: *//p;T;q"  # the token serial in `pkcs11-tool -L`, for the PKCS#11 URI


def chain_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private mount namespace (unshare --mount)"
    if shutil.which("pcscd") is None or not Path("/usr/lib/pcsc/drivers/ifd-ccid.bundle").exists():
        return "pcscd and libccid are not installed (apt-get install pcscd libccid)"
    return None


def client_status(stack: UsbipStack) -> dict:  # type: ignore[type-arg]
    sock = stack.workdir / f"client-{CLIENT}.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "bridge_client", "status", "--json", "--socket", str(sock)],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


@pytest.mark.parametrize("profile", ["safenet-5110", "yubikey5"])
def test_libccid_reads_and_osslsigncode_signs_through_the_usbip_reader(tmp_path: Path, profile: str) -> None:
    problem = chain_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the USB/IP chain cannot run: {problem}")
        pytest.skip(problem)
    stack = UsbipStack(tmp_path / "stack", profiles=[profile])
    stack.make_pki([CLIENT])
    stack.write_server_config([CLIENT])
    try:
        stack.start_server()
        client = stack.start_client(CLIENT, [0])

        def token_ready() -> bool:
            assert client.proc.poll() is None, client.log_text()
            readers = client_status(stack).get("readers") or [{}]
            return bool(readers[0].get("token_present"))

        wait_for(token_ready, timeout=30, what="the client to see the token")
        program, data = tmp_path / "app.exe", tmp_path / "data.bin"
        program.write_bytes(minimal_pe())
        data.write_bytes(b"signed through USB/IP and libccid " * 4)
        module = str(OPENSC_PKCS11)
        sign = osslsigncode_sign_command(
            "pkcs11:serial=$serial;id=%01;type=private;pin-value=123456",
            tmp_path / "cert.pem",
            program,
            tmp_path / "signed.exe",
        )
        script = "\n".join(
            [
                "set -e",
                "opensc-tool --atr",
                f"pkcs11-tool --module {module} --slot-index 0 --read-object --type cert --id 01 "
                f"--output-file {tmp_path}/cert.der",
                f"pkcs11-tool --module {module} --slot-index 0 --login --pin 123456 --sign --id 01 "
                f"-m SHA256-RSA-PKCS --input-file {data} --output-file {tmp_path}/sig.bin",
                f"openssl x509 -inform DER -in {tmp_path}/cert.der -out {tmp_path}/cert.pem",
                f"serial=$(pkcs11-tool --module {module} --slot-index 0 -L | sed -n '{SERIAL_SED}')",
                " ".join(f'"{a}"' if "$serial" in a else a for a in sign),
                f"osslsigncode verify -CAfile {tmp_path}/cert.pem -in {tmp_path}/signed.exe",
            ]
        )
        with imported_reader(tmp_path, stack.usbip_port) as reader:
            attached = client_status(stack)["readers"][0]
            cmd = ["unshare", "--mount", "--propagation", "unchanged", "bash", str(NS_SCRIPT)]
            cmd += [reader.umockdev_dir, str(tmp_path), "bash", "-c", script]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    finally:
        stack.stop()
    pcscd_log = (
        (tmp_path / "pcscd.log").read_text(errors="replace") if (tmp_path / "pcscd.log").exists() else ""
    )
    assert proc.returncode == 0, (
        f"{proc.stdout}\n{proc.stderr}\n--- pcscd.log (tail) ---\n{pcscd_log[-4000:]}\n"
        f"--- handler ---\n{reader.log_path.read_text()}\n--- client ---\n{client.log_text()[-3000:]}"
    )
    assert (reader.vid, reader.pid) == (0x0E0F, 0x0004)
    assert attached["backend"] == "usbip" and attached["usbip"]["busid"] == "1-1"
    assert attached["usbip"]["attached_by"] is not None
    # libccid drove our reader (its Info.plist name for 0E0F:0004) and read the token's ATR.
    assert "Found Vendor/Product: 0E0F/0004 (VMware Virtual USB CCID)" in pcscd_log
    atr = bytes.fromhex(re.sub(r"[^0-9a-fA-F]", "", proc.stdout.splitlines()[0]))
    assert atr == PROFILES[profile].atr
    assert "Signature verification: ok" in proc.stdout
    cert_pem = tmp_path / "cert.pem"
    der = (tmp_path / "cert.der").read_bytes()
    assert x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM) == cert_pem.read_bytes()
    verify_signature(cert_pem, data.read_bytes(), (tmp_path / "sig.bin").read_bytes())


# Inside the namespace: wait for a card state in `opensc-tool -l`, telling the test each step by a file.
STEPS_SCRIPT = """
set -e
card() {{
    for _ in $(seq 150); do opensc-tool -l | grep -qE "^0 +$1 " && return 0; sleep 0.2; done; return 1
}}
wait_file() {{ for _ in $(seq 300); do [ -e "$1" ] && return 0; sleep 0.1; done; return 1; }}
card Yes; echo inserted
touch {work}/seen-inserted; wait_file {work}/server-stopped
card No; echo removed
touch {work}/seen-removed; wait_file {work}/server-started
card Yes; echo inserted-again
opensc-tool --atr
"""


def test_libccid_sees_the_card_leave_and_return_with_the_token_server(tmp_path: Path) -> None:
    problem = chain_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the USB/IP chain cannot run: {problem}")
        pytest.skip(problem)
    stack = UsbipStack(tmp_path / "stack", profiles=["yubikey5"])
    stack.make_pki([CLIENT])
    stack.write_server_config([CLIENT])
    work = tmp_path

    def step(name: str) -> None:
        wait_for(lambda: (work / name).exists() or proc.poll() is not None, timeout=60, what=name)
        assert proc.poll() is None, f"{proc.communicate()}"

    try:
        stack.start_server()
        client = stack.start_client(CLIENT, [0])
        wait_for(
            lambda: bool((client_status(stack).get("readers") or [{}])[0].get("token_present")),
            timeout=30,
            what="the client to see the token",
        )
        with imported_reader(tmp_path, stack.usbip_port) as reader:
            cmd = ["unshare", "--mount", "--propagation", "unchanged", "bash", str(NS_SCRIPT)]
            cmd += [reader.umockdev_dir, str(work), "bash", "-c", STEPS_SCRIPT.format(work=work)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                step("seen-inserted")
                assert stack.server is not None
                stack.server.stop()
                (work / "server-stopped").touch()
                step("seen-removed")
                stack.start_server()
                (work / "server-started").touch()
                out, err = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    finally:
        stack.stop()
    assert proc.returncode == 0, f"{out}\n{err}\n--- client ---\n{client.log_text()[-3000:]}"
    assert out.splitlines()[:3] == ["inserted", "removed", "inserted-again"]
    assert bytes.fromhex(re.sub(r"[^0-9a-fA-F]", "", out.splitlines()[3])) == PROFILES["yubikey5"].atr
