"""S2/P7: a reconnecting client that offers the session of its last connection is not resumed.

A resumed TLS 1.3 handshake skips certificate verification, so a client revoked since its
first connection would come back without the CRL being consulted (reliability-anchors §3).
The server context disables every ticket (stateless and, with `num_tickets = 0`, the stateful
ones OpenSSL would otherwise still issue under OP_NO_TICKET). The probe is a stdlib client
offering the previous connection's `SSLSession`; the control shows that the same probe sees a
resumption when the server context does allow tickets, so the assertion can fail.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import trio
from inproc import Pki, running_server

from protocol.runtime.tls import server_context


def _connect_offering(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None, bytes]:
    """One connection to 127.0.0.1:port offering `session`; reads the server's first bytes so the
    session tickets sent with the end of the handshake are processed."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        first = tls.recv(4096)
        return tls.session_reused, tls.session, first


def _ticketing_server(ctx: ssl.SSLContext, listener: socket.socket, connections: int) -> None:
    """The control: greet `connections` clients with the given context, then stop."""
    for _ in range(connections):
        conn, _addr = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"welcome")
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.recv(1)


def _tickets_allowed(folder: Path) -> ssl.SSLContext:
    ctx = server_context(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = 2
    return ctx


def test_the_probe_sees_a_resumption_when_the_server_allows_tickets(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = threading.Thread(target=_ticketing_server, args=(_tickets_allowed(tmp_path), listener, 2))
    server.start()
    try:
        client = pki.client()
        reused, session, first = _connect_offering(client, port, None)
        assert first == b"welcome" and reused is False
        assert session is not None and session.has_ticket
        reused, _, _ = _connect_offering(client, port, session)
        assert reused is True
    finally:
        server.join(timeout=10)
        listener.close()


async def test_a_reconnect_offering_the_previous_session_is_fully_handshaken_again(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path) as (_server, port):
        client = pki.client()
        reused, session, first = await trio.to_thread.run_sync(_connect_offering, client, port, None)
        assert first, "the server sent nothing after the handshake"
        assert reused is False
        assert session is None or not session.has_ticket
        for _ in range(3):
            reused, session2, again = await trio.to_thread.run_sync(_connect_offering, client, port, session)
            assert again, "the reconnect was not served"
            assert reused is False
            assert session2 is None or not session2.has_ticket
