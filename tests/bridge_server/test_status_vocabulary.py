"""The same token, at the same moment, in the same words on every surface: the server's status
document and table, its systemd STATUS= line, and the client's status (protocol/display.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import trio
from inproc import Pki, make_tunnel, running_server

from bridge_client.config import load_client_config
from bridge_client.status import snapshot
from bridge_client.vpcd_link import VpcdLink
from bridge_server.observe.status import build_status, render_table
from bridge_server.service import server_status


async def test_server_status_systemd_status_and_client_status_use_the_same_words(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path) as (server, port):
        tunnel = make_tunnel(pki, port)
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.run)
            with trio.fail_after(20):
                while not tunnel.tokens["codesign"].usable:
                    await tunnel.wait_changed()
            config = tmp_path / "client.yaml"
            config.write_text(
                json.dumps(
                    {
                        "server": f"127.0.0.1:{port}",
                        "tls": {"ca": "ca.pem", "cert": "build-vm-01.pem", "key": "build-vm-01.key"},
                        "readers": [{"token": "codesign"}],
                    }
                )
            )
            app = SimpleNamespace(
                config=load_client_config(config),
                tunnel=tunnel,
                links=[VpcdLink(tunnel, "codesign")],
                usbip_readers=[],
            )
            client_doc = snapshot(app)
            server_doc = build_status(server)
            systemd = server_status(server)
            nursery.cancel_scope.cancel()
    token = server_doc["tokens"][0]
    reader = client_doc["readers"][0]
    assert token["state"] == reader["server_state"] == "idle"
    assert systemd == "codesign idle; 1 connection(s)"
    assert token["atr"] == reader["atr"] != ""
    assert token["atr"] == token["atr"].upper() and " " not in token["atr"]
    assert token["atr"] in render_table(server_doc)


async def test_a_locked_pin_reads_locked_in_status_and_in_the_systemd_status_line(tmp_path: Path) -> None:
    Pki(tmp_path)
    async with running_server(tmp_path) as (server, _port):
        # The card answers a VERIFY with 6983 (authentication method blocked): the guard locks.
        server.pin_guard.observe("codesign", 0x20, 0x80, True, 0x6983, holder="build-vm-01", now=0.0)
        doc = build_status(server)
        systemd = server_status(server)
    assert doc["tokens"][0]["state"] == "locked"
    assert systemd == "codesign locked; 0 connection(s)"
