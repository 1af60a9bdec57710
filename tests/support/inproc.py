"""An in-process bridge for fault and load tests: the real server over real TLS on loopback.

`running_server(folder, heartbeat_s=...)` starts `BridgeServer` (simulated yubikey5 behind the
pyusb backend), `raw_client(...)` is a bare FramedConnection for wire-level tests, and
`make_tunnel(...)` the real client's Tunnel. Time is real (real sockets), so tests use short
heartbeats and assert bounds numerically.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trustme
from role_certs import CertRole, issue_cert

from bridge_client.backoff import Backoff
from bridge_client.tunnel import Tunnel
from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from protocol import ccid, wire
from protocol.connection import BridgeConnection, Role
from protocol.runtime.address import Address
from protocol.runtime.connect import Greeted, connect
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context

SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")
VERIFY_123456 = bytes.fromhex("0020008008313233343536FFFF")
DIGEST = bytes(range(32))
# SP 800-73-4 GENERAL AUTHENTICATE, P-256 key 9D: 7C { 82 00, 81 20 <digest> }
SIGN_9D = bytes.fromhex("0087119D267C2482008120") + DIGEST + b"\x00"
SW_OK = b"\x90\x00"
SW_SECURITY_NOT_SATISFIED = b"\x69\x82"


class Pki:
    def __init__(self, folder: Path, clients: tuple[str, ...] = ("build-vm-01",)) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(folder / "ca.pem")
        self._issue("server", "localhost", "server")
        for name in clients:
            self._issue(name, name, "client")

    def _issue(self, stem: str, name: str, role: CertRole) -> None:
        leaf = issue_cert(self.ca, name, common_name=name, role=role)
        leaf.cert_chain_pems[0].write_to_path(self.folder / f"{stem}.pem")
        leaf.private_key_pem.write_to_path(self.folder / f"{stem}.key")

    def client(self, stem: str = "build-vm-01") -> ssl.SSLContext:
        f = self.folder
        return client_context(ca=f / "ca.pem", cert=f / f"{stem}.pem", key=f / f"{stem}.key")


def server_config(
    folder: Path,
    *,
    heartbeat_s: float,
    allow: tuple[str, ...],
    token: dict[str, Any] | None = None,
    **extra: Any,
) -> Any:
    """`token`: more keys of the one token (e.g. `{"speculation": False}`)."""
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": "ca.pem", "cert": "server.pem", "key": "server.key"},
        "tokens": [
            {"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": list(allow), **(token or {})}
        ],
        "heartbeat_s": heartbeat_s,
        **extra,
    }
    return parse_server_config(doc, folder / "server.yaml")


@asynccontextmanager
async def running_server(
    folder: Path, *, heartbeat_s: float = 0.3, allow: tuple[str, ...] = ("build-vm-01",), **extra: Any
) -> AsyncIterator[tuple[BridgeServer, int]]:
    server = BridgeServer(server_config(folder, heartbeat_s=heartbeat_s, allow=allow, **extra))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.run)
        try:
            yield server, listeners[0].socket.getsockname()[1]
        finally:
            server.request_shutdown()


async def greet(ctx: ssl.SSLContext, port: int, software: str = "fault-test") -> Greeted:
    """The product's one connect path to 127.0.0.1:port: TLS, Welcome, our ClientHello sent."""
    return await connect(Address("127.0.0.1", port), ctx, server_name="localhost", software=software)


@asynccontextmanager
async def open_greeted_client(ctx: ssl.SSLContext, port: int) -> AsyncIterator[FramedConnection]:
    """`greet`, closed on exit."""
    greeted = await greet(ctx, port)
    try:
        yield greeted.conn
    finally:
        await greeted.aclose()


@asynccontextmanager
async def open_wire_client(ctx: ssl.SSLContext, port: int) -> AsyncIterator[FramedConnection]:
    """A bare mutual-TLS bridge connection to 127.0.0.1:port, handshake done, nothing read yet
    (for tests of the greeting itself; everything else uses `greet`)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        await tls.do_handshake()
        yield FramedConnection(tls, BridgeConnection(Role.CLIENT))
    finally:
        await trio.aclose_forcefully(tls)


@asynccontextmanager
async def raw_client(pki: Pki, port: int, stem: str = "build-vm-01") -> AsyncIterator[FramedConnection]:
    async with open_wire_client(pki.client(stem), port) as client:
        yield client


async def expect(client: FramedConnection, cls: type) -> Any:
    """The next message of type `cls`, answering Pings on the way."""
    while True:
        msg = await client.receive()
        if isinstance(msg, cls):
            return msg
        if isinstance(msg, wire.Ping):
            await client.send(wire.Pong(nonce=msg.nonce))
            continue
        # SpeculationPaths: the server teaches what it learnt after a lease (issue 17), unasked
        assert isinstance(msg, wire.TokenStatus | wire.Pong | wire.LeaseQueued | wire.SpeculationPaths), msg


async def hello(client: FramedConnection) -> None:
    assert isinstance(await client.receive(), wire.Welcome)
    await client.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="fault-test"))


async def open_lease(client: FramedConnection) -> wire.LeaseGranted:
    await hello(client)
    return await request_lease(client)


async def request_lease(client: FramedConnection) -> wire.LeaseGranted:
    """A lease on token 0 over a greeted connection."""
    await client.send(wire.LeaseRequest(token_id=0))
    return await expect(client, wire.LeaseGranted)


async def apdu(client: FramedConnection, epoch: int, seq: int, command: bytes) -> bytes:
    await client.send(wire.CcidFrame(token_id=0, epoch=epoch, message=ccid.xfr_block(seq, command).encode()))
    resp = ccid.decode_message((await expect(client, wire.CcidFrame)).message)
    assert resp.command_status is ccid.CommandStatus.OK, resp
    return resp.data


async def power_on(client: FramedConnection, epoch: int, seq: int = 0) -> bytes:
    await client.send(wire.CcidFrame(token_id=0, epoch=epoch, message=ccid.icc_power_on(seq).encode()))
    return ccid.decode_message((await expect(client, wire.CcidFrame)).message).data


def make_tunnel(pki: Pki, port: int, stem: str = "build-vm-01") -> Tunnel:
    return Tunnel(
        host="127.0.0.1",
        port=port,
        server_name="localhost",
        ssl_context=pki.client(stem),
        token_names=["codesign"],
        backoff=Backoff(initial_s=0.05, max_s=0.2),
        connect_timeout_s=5.0,
    )


async def wait_until(predicate: Any, *, what: str, within: float, poll: float = 0.01) -> float:
    """Poll `predicate` (real time) until true; return the seconds it took; fail after `within`."""
    start = time.monotonic()
    with trio.move_on_after(within):
        while not predicate():  # noqa: ASYNC110 -- polling real sockets, with a deadline
            await trio.sleep(poll)
        return time.monotonic() - start
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
