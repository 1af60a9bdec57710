"""F12: a 20 s signature through the whole stack, with no spurious timeout anywhere.

reliability-anchors §7.1 F12 ("slow token: time-extension responses; 20 s RSA sign" — no
spurious timeout). The emulated token on the real-libusb rig (tests/support/usb_rig) takes 20 s
for every private-key operation and keeps the reader informed with CCID time-extension frames
(CCID 1.1 §6.2.7); between it and `pkcs11-tool --sign` are the server's driver on libusb, TLS,
tokenbridge-client, vpcd and pcscd with libccid's vpcd reader. The profile is the YubiKey 5,
whose ATR gives a 1.5 s frame timeout: without the time extensions the server's driver would
cut the signature (checked: with the rig's time extensions off, pkcs11-tool fails with
CKR_DEVICE_REMOVED). The signature must verify
against the card's certificate, the whole operation must really have waited for the card, and
no layer may have logged a timeout or a failed exchange. Real time: one 20 s run in the e2e
suite (reliability-anchors allows it; CI runs it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_stack import VpcdSlot
from procstack import verify_signature
from usb_rig.rig import LibusbStack, emulated_token

from bridge_admin.signing_tools import pkcs11_sign, read_certificate_pem

pytestmark = pytest.mark.e2e

SLOW_SIGN_S = 20.0


def test_a_20_s_signature_with_time_extensions_completes_through_the_whole_stack(
    vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    with emulated_token(tmp_path / "usb", "yubikey5", slow_sign_ms=SLOW_SIGN_S * 1000) as token:
        stack = LibusbStack(tmp_path / "stack", profiles=["yubikey5"], tokens=[token])
        try:
            stack.make_pki(["build-vm-01"])
            stack.write_server_config(allow=["build-vm-01"])
            stack.start_server()
            client = stack.start_client("build-vm-01", [vpcd_slot.index])
            stack.wait_card(vpcd_slot.index, client)
            cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert01.pem")
            data, sig = tmp_path / "data.bin", tmp_path / "sig.bin"
            data.write_bytes(b"a release signed by a slow card " * 8)
            started = time.monotonic()
            pkcs11_sign(vpcd_slot.index, data, sig, timeout=180)
            took = time.monotonic() - started
        finally:
            stack.stop()
    verify_signature(cert, data.read_bytes(), sig.read_bytes())
    assert took >= SLOW_SIGN_S  # the card really was slow, and everyone waited for it
    assert stack.server is not None
    server_log = stack.server.log_text()
    client_log = client.log_text()
    for text, where in ((server_log, "server"), (client_log, "client")):
        for event in ('"apdu.failed"', '"device.failed"', '"tunnel.disconnected"', '"reader.removed"'):
            assert event not in text, f"{where} log has {event}"
