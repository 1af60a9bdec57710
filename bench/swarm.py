"""N idle bridge clients in one process: TLS 1.3 + Welcome/ClientHello, then only Pong.

    python -m bench.swarm --server 127.0.0.1:PORT --bundle DIR --name NAME --count 200

prints `ready N` once every client is greeted, and runs until stdin closes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context

BATCH = 16  # stay under the server's concurrent-handshake limit


async def _one(host: str, port: int, ctx: object, ready: trio.MemorySendChannel[int]) -> None:
    tcp = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")  # type: ignore[arg-type]
    conn = FramedConnection(stream, BridgeConnection(Role.CLIENT))
    assert isinstance(await conn.receive(), wire.Welcome)
    await conn.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="bench-swarm"))
    await ready.send(1)
    while True:
        msg = await conn.receive()
        if isinstance(msg, wire.Ping):
            await conn.send(wire.Pong(nonce=msg.nonce))
        elif isinstance(msg, wire.ConnectionClosed | wire.Goodbye):
            return


async def _main(args: argparse.Namespace) -> None:
    host, port = args.server.rsplit(":", 1)
    bundle = Path(args.bundle)
    ctx = client_context(
        ca=bundle / "ca.pem", cert=bundle / f"{args.name}.pem", key=bundle / f"{args.name}.key"
    )
    send, receive = trio.open_memory_channel[int](args.count)
    async with trio.open_nursery() as nursery:
        greeted = 0
        for start in range(0, args.count, BATCH):
            for _ in range(min(BATCH, args.count - start)):
                nursery.start_soon(_one, host, int(port), ctx, send)
            while greeted < min(start + BATCH, args.count):
                greeted += await receive.receive()
        print(f"ready {greeted}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--count", type=int, default=200)
    trio.run(_main, p.parse_args())


if __name__ == "__main__":
    main()
