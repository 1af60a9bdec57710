"""A TCP connect scan of every port of one address: `python netns_scan.py ADDRESS [ADDRESS...]`.

Run inside a network namespace by tests/faults/test_network_exposure.py. Prints one JSON
object: for each address, the open ports, and how many ports neither accepted nor refused
(filtered) within the timeout. Non-blocking connects in batches, so a full 1-65535 scan of a
veth peer (closed ports answer RST at once) takes seconds.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import sys
import time

BATCH = 400
TIMEOUT_S = 2.0


def scan(address: str) -> dict[str, object]:
    family, _, _, _, sockaddr = socket.getaddrinfo(address, 1, proto=socket.IPPROTO_TCP)[0]
    open_ports: list[int] = []
    filtered = 0
    for first in range(1, 65536, BATCH):
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, int] = {}
        for port in range(first, min(first + BATCH, 65536)):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((sockaddr[0], port, *sockaddr[2:]))
            if code == 0:
                open_ports.append(port)
                sock.close()
            elif code in (errno.EINPROGRESS, errno.EAGAIN):
                pending[sock] = port
                sel.register(sock, selectors.EVENT_WRITE)
            else:
                sock.close()
        deadline = time.monotonic() + TIMEOUT_S
        while pending and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    open_ports.append(pending[sock])
                sel.unregister(sock)
                sock.close()
                del pending[sock]
        filtered += len(pending)
        for sock in pending:
            sock.close()
        sel.close()
    return {"open": sorted(open_ports), "filtered": filtered}


if __name__ == "__main__":
    print(json.dumps({address: scan(address) for address in sys.argv[1:]}))
