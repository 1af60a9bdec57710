"""Debian's own USB/IP tool lists the client's exported readers (no kernel module needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
from pathlib import Path

import pytest
import trio
from client_fakes import Certs

from bridge_client.cli import main
from bridge_client.tunnel import Tunnel
from bridge_client.usbip.reader import UsbipReader
from bridge_client.usbip.server import UsbipListenError, open_usbip_listeners, serve_usbip
from protocol.errors import BridgeError
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


async def test_a_busy_usbip_port_is_a_startup_error_naming_the_config_key() -> None:
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(UsbipListenError) as info:
            await open_usbip_listeners(Address("127.0.0.1", port))
    assert f"cannot listen for USB/IP on 127.0.0.1:{port} (config key usbip.listen)" in str(info.value)
    assert isinstance(info.value, BridgeError)  # the CLI prints it and exits 2


def test_the_client_exits_2_with_the_reason_when_its_usbip_port_is_busy(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = tmp_path / "client.yaml"
        doc = {
            "server": "127.0.0.1:1",
            "tls": {"ca": str(certs.ca), "cert": str(certs.client[0]), "key": str(certs.client[1])},
            "reader": "usbip",
            "usbip": {"listen": f"127.0.0.1:{port}"},
            "readers": [{"token": "codesign"}],
        }
        path.write_text(json.dumps(doc))
        rc = main(["--config", str(path), "--log-level", "error"])
    assert rc == 2
    assert f"cannot listen for USB/IP on 127.0.0.1:{port}" in capsys.readouterr().err
