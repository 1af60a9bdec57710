"""The local control socket: JSON lines over AF_UNIX, answered by the admin dispatcher.

Request  `{"action": "status", "args": {...}}`  (one JSON object per line)
Response `{"ok": true, "result": {...}, "error": ""}`

Trust comes from the file system: the socket is created mode 0660, so whoever can open it
(root and the service's group) is an admin; the actor logged is `local:<uid>` from
SO_PEERCRED. A stale socket left by a crashed run (nothing answers on it) is replaced, a live
one is refused; the socket is removed on exit.
A connection may send several requests (`status --watch` does); each line is at most
`MAX_LINE` bytes and the connection closes after `IDLE_TIMEOUT_S` without a request.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from bridge_server.net.admin import AdminDispatcher

log = structlog.get_logger(__name__)

MAX_LINE: Final = 65536
IDLE_TIMEOUT_S: Final = 300.0
SOCKET_MODE: Final = 0o660


def peer_uid(stream: trio.SocketStream) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED), None where unavailable."""
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return None
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", raw)[1])


def parse_request(line: bytes) -> tuple[str, dict[str, Any]] | str:
    """`(action, args)` from one request line, or the error to answer."""
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"request is not JSON ({exc}); send one object per line"
    if not isinstance(doc, dict) or not isinstance(doc.get("action"), str):
        return 'request must be an object with a string "action", e.g. {"action": "status"}'
    args = doc.get("args", {})
    if not isinstance(args, dict):
        return '"args" must be an object'
    return doc["action"], args


def encode_response(ok: bool, result: dict[str, Any], error: str) -> bytes:
    return json.dumps({"ok": ok, "result": result, "error": error}, default=str).encode() + b"\n"


async def _reply(stream: trio.SocketStream, data: bytes) -> None:
    """Every wait has a deadline (P5): a local client that stops reading is dropped."""
    with trio.fail_after(IDLE_TIMEOUT_S):
        await stream.send_all(data)


async def _handle(stream: trio.SocketStream, dispatcher: AdminDispatcher) -> None:
    actor = f"local:{peer_uid(stream)}"
    buf = b""
    try:
        while True:
            with trio.move_on_after(IDLE_TIMEOUT_S) as idle:
                chunk = await stream.receive_some(MAX_LINE)
            if idle.cancelled_caught or not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                parsed = parse_request(line)
                if isinstance(parsed, str):
                    await _reply(stream, encode_response(False, {}, parsed))
                    continue
                ok, result, error = await dispatcher.handle(parsed[0], parsed[1], actor=actor)
                await _reply(stream, encode_response(ok, result, error))
            if len(buf) > MAX_LINE:
                await _reply(stream, encode_response(False, {}, f"request line longer than {MAX_LINE} bytes"))
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def socket_answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path` (a live server)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:  # refused (nobody listens: stale), vanished, or not ours to open
        return False
    finally:
        probe.close()
    return True


def prepare_socket_path(path: Path) -> None:
    """Make the folder; replace a stale socket, never a live one; refuse to clobber a non-socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        if socket_answers(path):
            raise FileExistsError(
                f"control socket {path} answers: another tokenbridge-server is running there; "
                "stop it, or set control.socket to another path"
            )
        path.unlink()
    elif path.exists():
        raise FileExistsError(
            f"control socket path {path} exists and is not a socket; remove it or fix control.socket"
        )


async def serve_control(
    dispatcher: AdminDispatcher,
    path: Path,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at `path` until cancelled; the socket file is removed on exit."""
    prepare_socket_path(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o117)  # never world-accessible, not even between bind and chmod
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        log.info("control.listening", socket=str(path))

        async def handle(stream: trio.SocketStream) -> None:
            await _handle(stream, dispatcher)

        await trio.serve_listeners(handle, [listener], task_status=task_status)
    finally:
        sock.close()
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - one unlink at exit, cannot block
