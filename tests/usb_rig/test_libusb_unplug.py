"""Unplugging the token, as the real libusb stack reports it (issue 15: unplug as ENODEV).

After the unplug every usbdevfs ioctl of the emulated device fails with ENODEV and it leaves
sysfs, as after a real disconnect. libusb turns that into LIBUSB_ERROR_NO_DEVICE, pyusb into
errno ENODEV, the server's transport into DeviceGoneError: the token is reported gone (logged,
status `present: false`), not left "present" behind failing APDUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from test_libusb_session import signing_session
from usb_rig.rig import LibusbStack, emulated_token

from bridge_admin.client import Target, call
from bridge_admin.local_stack import wait_for


async def token_status(stack: LibusbStack) -> dict[str, Any]:
    with trio.fail_after(20):
        answer = await call(Target(socket=stack.workdir / "control.sock"), "status")
    (token,) = answer["result"]["tokens"]
    return dict(token)


def test_an_unplugged_token_is_reported_gone(tmp_path: Path) -> None:
    with emulated_token(tmp_path / "usb", "yubikey5") as token:
        stack = LibusbStack(tmp_path / "stack", profiles=["yubikey5"], tokens=[token])
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        try:
            server = stack.start_server()
            _atr, (_select, _verify, signature) = trio.run(signing_session, stack)
            assert signature[-2:] == b"\x90\x00"
            assert trio.run(token_status, stack)["present"] is True
            token.unplug()
            wait_for(lambda: '"device.gone"' in server.log_text(), timeout=30, what="device.gone")
            status = trio.run(token_status, stack)
        finally:
            stack.stop()
    assert status["present"] is False and status["state"] == "absent"
    gone = [line for line in server.log_text().splitlines() if '"device.gone"' in line]
    assert "device is gone (unplugged or reset)" in gone[0]  # ENODEV, translated by the transport
