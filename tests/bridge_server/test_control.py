"""The control socket: JSON lines, file mode, stale socket, removal on exit."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import trio
from admin_fixtures import Certs, running

from bridge_admin.client import Target, call
from bridge_server.net.control import parse_request


async def _raw(path: Path, payload: bytes) -> list[dict[str, object]]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(payload)
        buf = b""
        while buf.count(b"\n") < payload.count(b"\n"):
            buf += await stream.receive_some(65536)
    return [json.loads(line) for line in buf.splitlines()]


async def test_status_over_the_control_socket_shows_the_idle_token(tmp_path: Path) -> None:
    Certs(tmp_path)
    with trio.fail_after(20):
        async with running(tmp_path):
            answer = await call(Target(socket=tmp_path / "control.sock"), "status")
    assert answer["ok"] is True
    (token,) = answer["result"]["tokens"]
    assert (token["name"], token["present"], token["state"]) == ("codesign", True, "idle")
    assert token["vid_pid"] == "0529:0620"


async def test_socket_is_group_only_and_removed_on_exit(tmp_path: Path) -> None:
    Certs(tmp_path)
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a crashed run's leftover
    stale.close()
    with trio.fail_after(20):
        async with running(tmp_path):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            answer = await call(Target(socket=path), "status")
    assert mode == 0o660
    assert answer["ok"]
    assert not path.exists()


async def test_bad_lines_get_an_error_and_the_connection_stays_usable(tmp_path: Path) -> None:
    Certs(tmp_path)
    with trio.fail_after(20):
        async with running(tmp_path):
            answers = await _raw(
                tmp_path / "control.sock", b'not json\n{"action": "nope"}\n{"action": "status"}\n'
            )
    assert [a["ok"] for a in answers] == [False, False, True]
    assert "not JSON" in str(answers[0]["error"])
    assert "known actions" in str(answers[1]["error"])


def test_parse_request_rejects_non_object_args() -> None:
    assert parse_request(b'{"action": "status", "args": []}') == '"args" must be an object'
    assert parse_request(b'{"action": "status"}') == ("status", {})


def test_a_stale_socket_is_replaced_but_a_live_one_is_refused(tmp_path: Path) -> None:
    """Issue 19 #1: only a socket nobody answers on is unlinked."""
    import pytest

    from bridge_server.net.control import prepare_socket_path

    path = tmp_path / "control.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(FileExistsError, match="another tokenbridge-server"):
            prepare_socket_path(path)
        assert path.is_socket()
    finally:
        live.close()
    prepare_socket_path(path)  # nothing listens any more: stale
    assert not path.exists()
