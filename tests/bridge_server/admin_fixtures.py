"""A real server (simulated token, real TLS, control socket) for the admin-plane tests."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trustme
from inproc import open_wire_client
from role_certs import issue_cert

from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from protocol import wire
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context


class Certs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(folder / "ca.pem")
        for name in ("localhost", "build-vm-01", "build-vm-02", "ops"):
            leaf = issue_cert(
                self.ca, name, common_name=name, role="server" if name == "localhost" else "client"
            )
            leaf.cert_chain_pems[0].write_to_path(folder / f"{name}.pem")
            leaf.private_key_pem.write_to_path(folder / f"{name}.key")

    def client(self, name: str) -> ssl.SSLContext:
        f = self.folder
        return client_context(ca=f / "ca.pem", cert=f / f"{name}.pem", key=f / f"{name}.key")


def config(folder: Path, **extra: Any) -> Any:
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {"ca": "ca.pem", "cert": "localhost.pem", "key": "localhost.key"},
        "admins": ["ops"],
        "control": {"socket": "control.sock"},
        "tokens": [
            {
                "name": "codesign",
                "match": {"simulate": "safenet-5110"},
                "allow": ["build-vm-01", "build-vm-02"],
            }
        ],
        "lease": {"linger_s": 0.5},
        **extra,
    }
    return parse_server_config(doc, folder / "server.yaml")


@asynccontextmanager
async def running(folder: Path, **kw: Any) -> AsyncIterator[tuple[BridgeServer, int]]:
    server = BridgeServer(config(folder, **kw.pop("extra", {})), **kw)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.run)
        try:
            yield server, listeners[0].socket.getsockname()[1]
        finally:
            server.request_shutdown()


@asynccontextmanager
async def connect(certs: Certs, port: int, name: str) -> AsyncIterator[FramedConnection]:
    async with open_wire_client(certs.client(name), port) as framed:
        assert isinstance(await framed.receive(), wire.Welcome)
        await framed.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="admin-test"))
        yield framed


async def expect(client: FramedConnection, cls: type) -> Any:
    while True:
        msg = await client.receive()
        if isinstance(msg, cls):
            return msg
        assert isinstance(msg, wire.TokenStatus | wire.Ping | wire.LeaseQueued | wire.SpeculationPaths), msg
