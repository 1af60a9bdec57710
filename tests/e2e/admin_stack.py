"""A real tokenbridge-server process with a control socket and an admin, for the admin e2e tests."""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio
from inproc import open_wire_client

from bridge_admin.local_stack import BridgeStack
from protocol import wire
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context

CLI = [sys.executable, "-m", "bridge_admin.cli"]


@contextmanager
def admin_stack(workdir: Path, clients: list[str], allow: list[str]) -> Iterator[BridgeStack]:
    stack = BridgeStack(workdir, lease={"linger_s": 0.5, "idle_timeout_s": 60.0})
    stack.make_pki(clients)
    stack.pki.issue_client("ops", admin=True)
    path = stack.write_server_config(allow)
    path.write_text(path.read_text() + "admins: [ops]\n")
    stack.start_server()
    try:
        yield stack
    finally:
        stack.stop()


def client_ssl(stack: BridgeStack, name: str) -> ssl.SSLContext:
    b = stack.pki.folder / "clients" / name
    return client_context(ca=b / "ca.pem", cert=b / f"{name}.pem", key=b / f"{name}.key")


@asynccontextmanager
async def wire_client(stack: BridgeStack, name: str) -> AsyncIterator[FramedConnection]:
    async with open_wire_client(client_ssl(stack, name), stack.server_port) as framed:
        first = await framed.receive()
        if not isinstance(first, wire.Welcome):
            raise trio.BrokenResourceError(f"not welcomed: {first}")
        await framed.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="e2e-admin"))
        yield framed


async def expect(client: FramedConnection, cls: type) -> Any:
    while True:
        msg = await client.receive()
        if isinstance(msg, cls):
            return msg
        if isinstance(msg, wire.Ping):
            await client.send(wire.Pong(nonce=msg.nonce))


async def cli(*args: str) -> tuple[int, str]:
    proc = await trio.run_process([*CLI, *args], capture_stdout=True, capture_stderr=True, check=False)
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()
