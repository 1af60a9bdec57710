"""N idle bridge clients in one process: TLS 1.3 + Welcome/ClientHello, then only Pong.

    python -m bench.swarm --server 127.0.0.1:PORT --bundle DIR --name NAME --count 200

prints `ready N` once every client is greeted, and runs until stdin closes.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

import trio

from protocol import wire
from protocol.runtime.address import Address, parse_address
from protocol.runtime.connect import connect
from protocol.runtime.tls import client_context

BATCH = 16  # stay under the server's concurrent-handshake limit


async def _one(address: Address, ctx: ssl.SSLContext, ready: trio.MemorySendChannel[int]) -> None:
    greeted = await connect(address, ctx, server_name="localhost", software="bench-swarm")
    conn = greeted.conn
    await ready.send(1)
    while True:
        msg = await conn.receive()
        if isinstance(msg, wire.Ping):
            await conn.send(wire.Pong(nonce=msg.nonce))
        elif isinstance(msg, wire.ConnectionClosed | wire.Goodbye):
            return


async def _main(args: argparse.Namespace) -> None:
    address = parse_address(args.server, wire.DEFAULT_PORT)
    bundle = Path(args.bundle)
    ctx = client_context(
        ca=bundle / "ca.pem", cert=bundle / f"{args.name}.pem", key=bundle / f"{args.name}.key"
    )
    send, receive = trio.open_memory_channel[int](args.count)
    async with trio.open_nursery() as nursery:
        greeted = 0
        for start in range(0, args.count, BATCH):
            for _ in range(min(BATCH, args.count - start)):
                nursery.start_soon(_one, address, ctx, send)
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
