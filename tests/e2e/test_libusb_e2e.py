"""The whole chain with the server on the real libusb stack (umockdev rig, tests/support/usb_rig).

osslsigncode / pkcs11-tool -> OpenSC -> pcscd -> vpcd -> tokenbridge-client -> TLS 1.3 ->
tokenbridge-server under umockdev-wrapper (`match: {vid, pid, serial}`, pyusb's libusb1
backend, libusb 1.0.26) -> usbdevfs ioctls -> the simulated token as an emulated USB device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_stack import VpcdSlot
from procstack import verify_signature
from usb_rig.rig import LibusbStack, emulated_token

from bridge_admin.signing_tools import (
    minimal_pe,
    osslsigncode_sign,
    osslsigncode_verify,
    pkcs11_sign,
    read_certificate_pem,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("profile", ["safenet-5110", "yubikey5", "etoken-fusion", "epass2003"])
def test_pkcs11_and_osslsigncode_sign_through_the_server_on_real_libusb(
    vpcd_slot: VpcdSlot, tmp_path: Path, profile: str
) -> None:
    with emulated_token(tmp_path / "usb", profile) as token:
        stack = LibusbStack(tmp_path / "stack", profiles=[profile], tokens=[token])
        try:
            stack.make_pki(["build-vm-01"])
            stack.write_server_config(allow=["build-vm-01"])
            stack.start_server()
            client = stack.start_client("build-vm-01", [vpcd_slot.index])
            stack.wait_card(vpcd_slot.index, client)
            cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert01.pem")
            data, sig = tmp_path / "data.bin", tmp_path / "sig.bin"
            data.write_bytes(b"release artefact " * 20)
            pkcs11_sign(vpcd_slot.index, data, sig)
            verify_signature(cert, data.read_bytes(), sig.read_bytes())
            program, signed = tmp_path / "hello.exe", tmp_path / "hello-signed.exe"
            program.write_bytes(minimal_pe(b"\xc3 signed over real libusb"))
            osslsigncode_sign(vpcd_slot.index, cert, program, signed)
            assert "Signature verification: ok" in osslsigncode_verify(cert, signed).stdout
        finally:
            stack.stop()
    assert stack.server is not None
    assert '"device.opened"' in stack.server.log_text()
