"""A token whose USB device has no serial number, through real libusb (issue 15 item 3).

A YubiKey shows its serial over USB only with SerialNumberUsbVisible set. The server then
reads the identity from the card (YubiKey GET SERIAL, else the PIV CHUID's GUID), logs that it
did, shows where the identity came from in `status`, and serves the token as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from test_libusb_session import signing_session
from usb_rig.rig import LibusbStack, emulated_token

from bridge_admin.client import Target, call
from bridge_server.simulator.profiles import PROFILES


async def sign_and_status(stack: LibusbStack) -> tuple[list[bytes], dict[str, Any]]:
    _atr, answers = await signing_session(stack)
    with trio.fail_after(20):
        answer = await call(Target(socket=stack.workdir / "control.sock"), "status")
    (token,) = answer["result"]["tokens"]
    return answers, token


def _run(
    tmp_path: Path, profile: str, match_keys: tuple[str, ...]
) -> tuple[LibusbStack, list[bytes], dict[str, Any]]:
    with emulated_token(tmp_path / "usb", profile, usb_serial=False) as token:
        stack = LibusbStack(tmp_path / "stack", profiles=[profile], tokens=[token], match_keys=match_keys)
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        try:
            stack.start_server()
            answers, status = trio.run(sign_and_status, stack)
        finally:
            stack.stop()
    return stack, answers, status


def test_a_yubikey_without_usb_serial_is_found_by_the_serial_its_card_reports(tmp_path: Path) -> None:
    # The config names the serial printed on the key; the device does not show it over USB.
    stack, (select, verify, signature), status = _run(tmp_path, "yubikey5", ("vid", "pid", "serial"))
    assert select[-2:] == b"\x90\x00" and verify == b"\x90\x00"
    assert signature[0] == 0x7C and signature[-2:] == b"\x90\x00"
    assert status["serial"] == PROFILES["yubikey5"].serial
    assert status["identity_source"] == "card-serial"
    assert stack.server is not None
    assert '"device.identity_fallback"' in stack.server.log_text()


def test_a_piv_token_without_usb_serial_is_known_by_its_chuid_guid(tmp_path: Path) -> None:
    stack, (select, verify, signature), status = _run(tmp_path, "epass2003", ("vid", "pid"))
    assert select[-2:] == b"\x90\x00" and verify == b"\x90\x00"
    assert signature[0] == 0x7C and signature[-2:] == b"\x90\x00"
    assert status["identity_source"] == "card-guid"
    assert len(status["serial"]) == 32 and int(status["serial"], 16) != 0
    assert stack.server is not None
    assert status["serial"] in stack.server.log_text()  # the fallback identity is logged
