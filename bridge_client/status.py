"""The client's local status socket: one JSON snapshot per connection.

`tokenbridge-client status` connects, reads until EOF and prints it. Access is controlled by
the socket file's permissions (0660, the service's group).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from bridge_client.config import ClientConfig
from bridge_client.tunnel import Tunnel
from bridge_client.usbip.reader import UsbipReader
from bridge_client.vpcd_link import VpcdLink
from protocol.display import format_atr

log = structlog.get_logger(__name__)


class StatusSource(Protocol):
    """What the status socket reads of the running client (`ClientApp`)."""

    @property
    def config(self) -> ClientConfig: ...

    @property
    def tunnel(self) -> Tunnel: ...

    @property
    def links(self) -> Sequence[VpcdLink]: ...

    @property
    def usbip_readers(self) -> Sequence[UsbipReader]: ...


def snapshot(app: StatusSource) -> dict[str, Any]:
    """What `tokenbridge-client status --json` prints (schema in docs/client.md)."""
    st = app.tunnel.status
    now = time.time()
    readers = []
    links: list[VpcdLink | UsbipReader] = [*app.links, *app.usbip_readers]
    for link in links:
        tok = app.tunnel.tokens[link.token]
        usbip = isinstance(link, UsbipReader)
        readers.append(
            {
                "token": link.token,
                "backend": "usbip" if usbip else "vpcd",
                "vpcd": None if usbip else str(link.address),
                "usbip": {"listen": str(link.address), "busid": link.busid, "attached_by": link.attached_by}
                if isinstance(link, UsbipReader)
                else None,
                "card": link.status.state,
                "reason": link.status.reason,
                "apdus": link.status.apdus,
                "token_present": tok.present,
                "allowed": tok.allowed,
                "atr": format_atr(tok.atr),
                "server_state": tok.server_state,
                "lease": None
                if tok.epoch is None
                else {"epoch": tok.epoch, "held_s": round(now - (tok.lease_since or now), 1)},
                "queue_position": tok.queue_position,
            }
        )
    return {
        "schema": 1,
        "tunnel": {
            "state": st.state,
            "reason": st.reason,
            "server": str(app.config.server_address),
            "server_software": st.server,
            "identity": st.identity,
            "connected_for_s": None if st.connected_since is None else round(now - st.connected_since, 1),
            "rtt_ms": st.rtt_ms,
            "attempts": st.attempts,
        },
        "readers": readers,
    }


async def serve_status(
    app: StatusSource,
    path: Path,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    _prepare_socket_path(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    log.info("status.listening", socket=str(path))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                await stream.send_all(json.dumps(snapshot(app)).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    try:
        await trio.serve_listeners(handle, [listener], task_status=task_status)
    finally:
        _remove_socket(path)


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():  # a stale socket from a crashed run
        path.unlink()


def _remove_socket(path: Path) -> None:
    path.unlink(missing_ok=True)


async def fetch_status(path: Path) -> dict[str, Any]:
    with trio.fail_after(5):
        stream = await trio.open_unix_socket(str(path))
        chunks = []
        async with stream:
            while data := await stream.receive_some(65536):
                chunks.append(data)
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result
