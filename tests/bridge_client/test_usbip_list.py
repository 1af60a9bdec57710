"""Debian's own USB/IP tool lists the client's exported readers (no kernel module needed)."""

from __future__ import annotations

import os
import re
import shutil
import ssl

import pytest
import trio

from bridge_client.tunnel import Tunnel
from bridge_client.usbip.reader import UsbipReader
from bridge_client.usbip.server import serve_usbip
from protocol.runtime.address import Address

# One device block of `usbip list -r` (usbip-utils 2.0): "BUSID: VENDOR : PRODUCT (VID:PID)",
# then ": PATH", then the device class line, then one line per interface "N - ... (cc/ss/pp)".
DEVICE = re.compile(
    r"^\s+(?P<busid>\S+): .* \((?P<vid>[0-9a-f]{4}):(?P<pid>[0-9a-f]{4})\)\n"
    r"\s+: (?P<path>\S+)\n"
    r"\s+: .*\n"
    r"\s+:\s+0 - .* \((?P<interface>[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{2})\)$",
    re.MULTILINE,
)


def usbip_tool() -> str:
    path = shutil.which("usbip") or ("/usr/sbin/usbip" if os.path.exists("/usr/sbin/usbip") else None)
    if path is None:
        message = "the usbip tool is not installed (apt-get install usbip)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


async def test_usbip_list_shows_one_ccid_reader_per_configured_token(nursery: trio.Nursery) -> None:
    tool = usbip_tool()
    names = ["codesign", "spare"]
    # A tunnel that never connects: the readers are exported whether or not the server is reachable.
    tunnel = Tunnel(
        host="tokenhost.invalid",
        port=7447,
        server_name="tokenhost.invalid",
        ssl_context=ssl.create_default_context(),
        token_names=names,
    )
    readers = [UsbipReader(tunnel, name, i, Address("127.0.0.1", 0)) for i, name in enumerate(names)]
    listeners = await nursery.start(serve_usbip, readers, Address("127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    assert {r.listen for r in readers} == {Address("127.0.0.1", port)}
    proc = await trio.run_process(
        [tool, "--tcp-port", str(port), "list", "-r", "127.0.0.1"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, f"{out}\n{proc.stderr.decode()}"
    found = [m.groupdict() for m in DEVICE.finditer(out)]
    assert found == [
        {
            "busid": f"1-{i + 1}",
            "vid": "0e0f",
            "pid": "0004",
            "path": f"/sys/devices/platform/tokenbridge/usb1/1-{i + 1}",
            "interface": "0b/00/00",
        }
        for i in range(2)
    ], out
