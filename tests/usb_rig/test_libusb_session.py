"""The unmodified server on the real libusb stack (umockdev rig), configured as for hardware.

Each profile's token is an emulated USB device (tests/support/usb_rig); tokenbridge-server runs
under umockdev-wrapper with `match: {vid, pid, serial}` and pyusb's libusb1 backend, and a
CCID-level client over mTLS leases it, powers it on, selects PIV, verifies the PIN and signs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from inproc import SELECT_PIV, SIGN_9D, VERIFY_123456, apdu, greet, power_on, request_lease
from procstack import client_ssl
from usb_rig.rig import EmulatedToken, LibusbStack, emulated_token

from bridge_server.simulator.profiles import PROFILES
from protocol.ccid import MessageType

PROFILE_NAMES = ["safenet-5110", "yubikey5", "etoken-fusion", "epass2003"]
T1_S_IFS_REQUEST = 0xC1  # ISO 7816-3 §11.6.2.3: PCB of S(IFS request)


async def signing_session(stack: LibusbStack) -> tuple[bytes, list[bytes]]:
    greeted = await greet(client_ssl(stack), stack.server_port)
    client = greeted.conn
    try:
        with trio.fail_after(60):
            granted = await request_lease(client)
            atr = await power_on(client, granted.epoch)
            answers = [
                await apdu(client, granted.epoch, seq, command)
                for seq, command in enumerate((SELECT_PIV, VERIFY_123456, SIGN_9D), start=1)
            ]
    finally:
        await greeted.aclose()
    return atr, answers


def run_session(tmp_path: Path, token: EmulatedToken) -> tuple[LibusbStack, bytes, list[bytes]]:
    stack = LibusbStack(tmp_path / "stack", profiles=[token.profile], tokens=[token])
    stack.make_pki(["build-vm-01"])
    stack.write_server_config(allow=["build-vm-01"])
    try:
        stack.start_server()
        atr, answers = trio.run(signing_session, stack)
    finally:
        stack.stop()
    return stack, atr, answers


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_server_signs_through_real_libusb(tmp_path: Path, profile: str) -> None:
    with emulated_token(tmp_path / "usb", profile) as token:
        stack, atr, (select, verify, signature) = run_session(tmp_path, token)
    assert atr == PROFILES[profile].atr
    assert select[-2:] == b"\x90\x00"
    assert verify == b"\x90\x00"
    assert signature[0] == 0x7C and signature[-2:] == b"\x90\x00", signature.hex()
    assert stack.server is not None
    log = stack.server.log_text()
    assert '"device.opened"' in log and token.serial in log
    events = token.events()
    assert events[0]["type"] in (MessageType.PC_to_RDR_IccPowerOn, MessageType.PC_to_RDR_GetSlotStatus)
    ifs_requests = [
        e for e in events if e["type"] == MessageType.PC_to_RDR_XfrBlock and e["head"][2:] == "c1"
    ]
    if PROFILES[profile].descriptor.exchange_level.value == "tpdu":
        assert ifs_requests, events  # TPDU T=1: the host negotiates IFSD with S(IFS request)
    else:
        assert not ifs_requests
