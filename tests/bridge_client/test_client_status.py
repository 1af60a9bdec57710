"""The status snapshot (schema 1) and `tokenbridge-client status` over a real unix socket."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from cli_lines import read_lines
from client_fakes import ATR, CLIENT_NAME, Certs

from bridge_client import status as status_module
from bridge_client.app import ClientApp
from bridge_client.cli import main, render_status
from bridge_client.config import load_client_config
from bridge_client.service import app_status
from bridge_client.status import serve_status, snapshot

NOW = 1_800_000_000.0


def make_app(certs: Certs, tmp_path: Path) -> ClientApp:
    path = tmp_path / "client.yaml"
    doc = {
        "server": "tokenhost.test:7447",
        "tls": {"ca": str(certs.ca), "cert": str(certs.client[0]), "key": str(certs.client[1])},
        "readers": [{"token": "codesign"}, {"token": "spare", "vpcd": {"connect": "127.0.0.1:35964"}}],
        "status": {"socket": "client.sock"},
    }
    path.write_text(json.dumps(doc))  # JSON is YAML
    return ClientApp(load_client_config(path))


def connected_app(certs: Certs, tmp_path: Path) -> ClientApp:
    """An app whose state is set by hand: connected, `codesign` leased, `spare` not offered."""
    app = make_app(certs, tmp_path)
    st = app.tunnel.status
    st.state, st.server, st.identity = "connected", "tokenbridge-server/0.1.0", CLIENT_NAME
    st.connected_since, st.rtt_ms, st.attempts = NOW - 12.34, 1.5, 3
    tok = app.tunnel.tokens["codesign"]
    tok.token_id, tok.present, tok.allowed, tok.atr, tok.server_state = 0, True, True, ATR, "leased"
    tok.epoch, tok.lease_since = 41, NOW - 2.0
    app.links[0].status.state, app.links[0].status.reason, app.links[0].status.apdus = "inserted", "", 35
    app.links[1].status.reason = "not offered to this client"
    return app


EXPECTED: dict[str, Any] = {
    "schema": 1,
    "tunnel": {
        "state": "connected",
        "reason": "",
        "server": "tokenhost.test:7447",
        "server_software": "tokenbridge-server/0.1.0",
        "identity": CLIENT_NAME,
        "connected_for_s": 12.3,
        "rtt_ms": 1.5,
        "attempts": 3,
    },
    "readers": [
        {
            "token": "codesign",
            "backend": "vpcd",
            "vpcd": "127.0.0.1:35963",
            "usbip": None,
            "card": "inserted",
            "reason": "",
            "apdus": 35,
            "token_present": True,
            "allowed": True,
            "atr": ATR.hex().upper(),
            "server_state": "leased",
            "lease": {"epoch": 41, "held_s": 2.0},
            "queue_position": None,
        },
        {
            "token": "spare",
            "backend": "vpcd",
            "vpcd": "127.0.0.1:35964",
            "usbip": None,
            "card": "waiting",
            "reason": "not offered to this client",
            "apdus": 0,
            "token_present": False,
            "allowed": False,
            "atr": "",
            "server_state": "",
            "lease": None,
            "queue_position": None,
        },
    ],
}

TABLE = """\
tunnel   connected to tokenhost.test:7447 as build-vm-01
         rtt 1.5ms, connected for 12s

TOKEN            READER                   CARD               LEASE          DETAIL
codesign         vpcd 127.0.0.1:35963     inserted           epoch 41
spare            vpcd 127.0.0.1:35964     waiting            -              not offered to this client"""


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_module.time, "time", lambda: NOW)


def test_the_snapshot_follows_schema_1(certs: Certs, tmp_path: Path, frozen_time: None) -> None:
    assert snapshot(connected_app(certs, tmp_path)) == EXPECTED


def test_a_fresh_client_reports_starting_with_no_lease(certs: Certs, tmp_path: Path) -> None:
    data = snapshot(make_app(certs, tmp_path))
    assert data["tunnel"] | {"attempts": 0} == {
        "state": "starting",
        "reason": "",
        "server": "tokenhost.test:7447",
        "server_software": "",
        "identity": "",
        "connected_for_s": None,
        "rtt_ms": None,
        "attempts": 0,
    }
    assert [(r["card"], r["lease"], r["token_present"]) for r in data["readers"]] == [
        ("waiting", None, False)
    ] * 2
    json.dumps(data)  # JSON-serialisable as is


def test_the_table_shows_tunnel_readers_and_leases() -> None:
    assert render_status(EXPECTED) == TABLE


def test_a_queued_reader_shows_its_queue_position_and_a_refused_tunnel_its_reason() -> None:
    data = json.loads(json.dumps(EXPECTED))
    data["tunnel"] |= {"state": "refused", "reason": "server refused this client: not_allowed: ask ops"}
    data["tunnel"] |= {"rtt_ms": None, "identity": ""}
    data["readers"][0] |= {"lease": None, "queue_position": 2}
    lines = render_status(data).splitlines()
    assert lines[:2] == [
        "tunnel   refused to tokenhost.test:7447",
        "         server refused this client: not_allowed: ask ops",
    ]
    assert lines[4].split()[:5] == ["codesign", "vpcd", "127.0.0.1:35963", "inserted", "queued"]
    assert "#2" in lines[4]


async def test_status_command_reads_the_unix_socket_as_table_and_json(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = connected_app(certs, tmp_path)
    path = tmp_path / "client.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, path)
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        capsys.readouterr()  # drop the daemon's own log lines
        rc_json = await trio.to_thread.run_sync(main, ["status", "--socket", str(path), "--json"])
        out_json = capsys.readouterr().out
        rc_table = await trio.to_thread.run_sync(main, ["--config", str(app.config.path), "status"])
        out_table = capsys.readouterr().out
        nursery.cancel_scope.cancel()
    assert rc_json == 0
    data = json.loads(out_json)
    assert data["tunnel"]["state"] == "connected"
    assert data["readers"][0]["lease"]["epoch"] == 41
    assert set(data) == set(EXPECTED)
    assert [set(r) for r in data["readers"]] == [set(r) for r in EXPECTED["readers"]]
    assert rc_table == 0  # found through the config's status.socket
    assert out_table.splitlines()[0] == "tunnel   connected to tokenhost.test:7447 as build-vm-01"
    assert not path.exists()  # removed when the client stops


async def test_status_exits_1_while_the_tunnel_is_down(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app(certs, tmp_path)
    app.tunnel.status.state, app.tunnel.status.reason = (
        "retrying",
        "connection refused by tokenhost.test:7447",
    )
    path = tmp_path / "client.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, path)
        capsys.readouterr()
        rc = await trio.to_thread.run_sync(main, ["status", "--socket", str(path)])
        nursery.cancel_scope.cancel()
    assert rc == 1
    assert "connection refused by tokenhost.test:7447" in capsys.readouterr().out


async def test_a_stale_socket_from_a_crashed_run_is_replaced(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "client.sock"
    stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await stale.bind(str(path))
    stale.close()  # the file stays behind, nobody listens
    app = make_app(certs, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, path)
        data = await status_module.fetch_status(path)
        nursery.cancel_scope.cancel()
    assert data["schema"] == 1


def test_status_without_a_running_client_says_what_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nobody.sock"
    assert main(["status", "--socket", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read status from {path}" in err
    assert "Is the client running, and does its config set status.socket?" in err


async def test_status_json_exits_1_when_the_tunnel_is_down_like_the_table(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = make_app(certs, tmp_path)  # never connected
    path = tmp_path / "client.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, path)
        capsys.readouterr()  # drop the daemon's own log lines
        rc_json = await trio.to_thread.run_sync(main, ["status", "--socket", str(path), "--json"])
        out_json = capsys.readouterr().out
        rc_table = await trio.to_thread.run_sync(main, ["status", "--socket", str(path)])
        nursery.cancel_scope.cancel()
    assert json.loads(out_json)["tunnel"]["state"] != "connected"
    assert (rc_json, rc_table) == (1, 1)


async def test_status_watch_json_prints_one_snapshot_per_line(certs: Certs, tmp_path: Path) -> None:
    app = connected_app(certs, tmp_path)
    path = tmp_path / "client.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, path)
        argv = [
            sys.executable,
            "-m",
            "bridge_client",
            "status",
            "--socket",
            str(path),
            "--watch",
            "0.2",
            "--json",
        ]
        lines = await read_lines(argv, 2)
        nursery.cancel_scope.cancel()
    assert [json.loads(line)["tunnel"]["state"] for line in lines] == ["connected", "connected"]


def test_a_usbip_reader_shows_its_backend_bus_id_and_importer(certs: Certs, tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    doc = {
        "server": "tokenhost.test:7447",
        "tls": {"ca": str(certs.ca), "cert": str(certs.client[0]), "key": str(certs.client[1])},
        "readers": [{"token": "codesign"}, {"token": "spare"}],
        "reader": "usbip",
        "usbip": {"listen": "127.0.0.1:3241"},
    }
    path.write_text(json.dumps(doc))
    app = ClientApp(load_client_config(path))
    assert app.links == []
    app.usbip_readers[1].attached_by = "127.0.0.1:50312"
    readers = snapshot(app)["readers"]
    assert [(r["token"], r["backend"], r["vpcd"], r["usbip"]) for r in readers] == [
        ("codesign", "usbip", None, {"listen": "127.0.0.1:3241", "busid": "1-1", "attached_by": None}),
        (
            "spare",
            "usbip",
            None,
            {"listen": "127.0.0.1:3241", "busid": "1-2", "attached_by": "127.0.0.1:50312"},
        ),
    ]
    table = render_status(snapshot(app)).splitlines()
    assert table[-2].split()[:3] == ["codesign", "usbip", "1-1@127.0.0.1:3241"]
    assert table[-1].split()[:4] == ["spare", "usbip", "1-2@127.0.0.1:3241", "exported"]
    assert app_status(app).endswith("codesign: exported (usbip 1-1), spare: exported (usbip 1-2)")
