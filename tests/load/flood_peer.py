"""An attacker for tests/load/test_handshake_flood.py, run as its own process.

`python flood_peer.py PORT COUNT FIRST_BYTES_HEX` holds COUNT TCP connections to 127.0.0.1:PORT,
sends FIRST_BYTES on each (nothing when empty), re-opens every connection the server drops,
prints `ready` once COUNT are open, and closes them all and exits when stdin closes.
"""

from __future__ import annotations

import resource
import sys

import trio


def raise_fd_limit(needed: int) -> bool:
    """Raise this process's soft fd limit to `needed`; False when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return True
    if hard != resource.RLIM_INFINITY and hard < needed:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return True


class Attacker:
    """`count` sockets held open; each one the server drops is re-opened."""

    def __init__(self, port: int, first_bytes: bytes, count: int) -> None:
        self.port = port
        self.first_bytes = first_bytes
        self.count = count
        self.open = 0
        self.all_open = trio.Event()

    async def hold_one(self) -> None:
        while True:  # until the nursery is cancelled
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                await trio.sleep(0.01)
                continue
            self.open += 1
            if self.open >= self.count:
                self.all_open.set()
            try:
                if self.first_bytes:
                    await stream.send_all(self.first_bytes)
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass
            finally:
                self.open -= 1
                await trio.aclose_forcefully(stream)


async def main(port: int, count: int, first_bytes: bytes) -> None:
    attacker = Attacker(port, first_bytes, count)
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(attacker.hold_one)
        await attacker.all_open.wait()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await trio.wrap_file(sys.stdin).read()  # until the test closes our stdin
        nursery.cancel_scope.cancel()  # every socket is closed on the way out


if __name__ == "__main__":
    COUNT = int(sys.argv[2])
    if not raise_fd_limit(COUNT + 64):
        sys.exit(f"needs {COUNT + 64} file descriptors, more than the hard limit")
    trio.run(main, int(sys.argv[1]), COUNT, bytes.fromhex(sys.argv[3]))
