"""The client's USB/IP server: one exported device per configured token, on loopback only.

Protocol: Linux kernel documentation "USB/IP protocol". A connection asks for the device list
(answered, then closed) or imports one bus id; an imported device is served by its
`UsbipReader` until the importer closes the connection. A device is imported by at most one
connection at a time (a second import is refused with ST_NA, as the kernel's usbip-host does).
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
import trio

from bridge_client.usbip import wire
from bridge_client.usbip.reader import UsbipReader
from protocol import NEED_DATA
from protocol.errors import BridgeError, RemoteProtocolError
from protocol.runtime.address import Address

log = structlog.get_logger(__name__)


class UsbipListenError(BridgeError):
    """The USB/IP port cannot be opened."""


OP_TIMEOUT_S = 10.0  # an importer has this long to send its one operation request


async def open_usbip_listeners(listen: Address) -> list[trio.SocketListener]:
    """The listening sockets, or UsbipListenError naming the config key (called before serving)."""
    try:
        return await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as exc:
        raise UsbipListenError(
            f"cannot listen for USB/IP on {listen} (config key usbip.listen): {exc.strerror or exc}; "
            "is another USB/IP server (usbipd) or a second tokenbridge-client using the port?"
        ) from exc


async def serve_usbip(
    readers: Sequence[UsbipReader],
    listen: Address,
    *,
    listeners: list[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    if listeners is None:
        listeners = await open_usbip_listeners(listen)
    port = listeners[0].socket.getsockname()[1]
    for reader in readers:
        reader.listen = Address(listen.host, port)
    log.info("usbip.listening", address=str(Address(listen.host, port)), busids=[r.busid for r in readers])

    async def handle(stream: trio.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        await handle_connection(readers, stream, peer)

    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def handle_connection(readers: Sequence[UsbipReader], stream: trio.abc.Stream, peer: str) -> None:
    """Serve one connection until it ends, then close it; its errors end it, never the server."""
    try:
        await _operation(readers, stream, peer)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        log.info("usbip.connection_closed", peer=peer, reason=str(exc) or type(exc).__name__)
    except RemoteProtocolError as exc:
        log.warning("usbip.protocol_error", peer=peer, reason=str(exc))
    finally:
        await trio.aclose_forcefully(stream)


async def _operation(readers: Sequence[UsbipReader], stream: trio.abc.Stream, peer: str) -> None:
    side = wire.UsbipServerSide()
    with trio.fail_after(OP_TIMEOUT_S):
        event = side.next_event()
        while event is NEED_DATA:
            side.receive_data(bytes(await stream.receive_some(4096)))
            event = side.next_event()
    if isinstance(event, wire.ReqDevlist):
        with trio.fail_after(OP_TIMEOUT_S):
            await stream.send_all(wire.rep_devlist([r.exported() for r in readers]))
        return
    if not isinstance(event, wire.ReqImport):
        return
    reader = next((r for r in readers if r.busid == event.busid), None)
    if reader is None or reader.attached_by is not None:
        why = "no such bus id" if reader is None else f"already attached by {reader.attached_by}"
        log.warning("usbip.import_refused", peer=peer, busid=event.busid, reason=why)
        with trio.fail_after(OP_TIMEOUT_S):
            await stream.send_all(wire.rep_import(None))
        return
    reader.attached_by = peer  # before the first await: a second import is refused from now on
    try:
        with trio.fail_after(OP_TIMEOUT_S):
            await stream.send_all(wire.rep_import(reader.exported()))
        side.imported()
        await reader.serve_attached(stream, side, peer)
    finally:
        reader.attached_by = None
