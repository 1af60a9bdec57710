"""Live TLS reload: a revoked client is dropped and kept out; a bad file keeps the old context."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import trio
from pki_server import bundle_context, make_pki, make_server, until_goodbye

from bridge_admin.pki import Pki
from protocol import wire
from protocol.runtime.address import Address
from protocol.runtime.connect import ConnectFailed, Greeted, connect
from protocol.runtime.framed import FramedConnection


async def _open(pki: Pki, port: int, name: str) -> Greeted:
    return await connect(
        Address("127.0.0.1", port), bundle_context(pki, name), server_name="localhost", software="reload-test"
    )


async def _alive(framed: FramedConnection) -> bool:
    await framed.send(wire.Ping(nonce=42))
    while True:
        msg = await framed.receive()
        if isinstance(msg, wire.Pong):
            return True
        if isinstance(msg, wire.Goodbye | wire.ConnectionClosed):
            return False


async def test_revoked_client_is_dropped_within_seconds_and_cannot_return(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = make_server(tmp_path)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(20):
            one, two = await _open(pki, port, "build-vm-01"), await _open(pki, port, "build-vm-02")
            start = trio.current_time()
            pki.revoke("build-vm-01")
            with trio.fail_after(5):
                await until_goodbye(one.conn)
            dropped_after = trio.current_time() - start
            assert await _alive(two.conn)
            with pytest.raises(ConnectFailed, match="refused this client") as refused:
                await _open(pki, port, "build-vm-01")  # TLS 1.3: the refusal shows on the first read
            assert refused.value.stage == "closed"
            for greeted in (one, two):
                await greeted.aclose()
        server.request_shutdown()
    assert dropped_after < 5
    assert server.reloader.reloads == 1


async def test_a_bad_crl_keeps_the_old_context_and_says_so(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = make_server(tmp_path)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        before = server.reloader.current()
        pki.crl_path.write_text("-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        with structlog.testing.capture_logs() as logs:
            assert server.reload_tls() is False
        assert server.reloader.current() is before
        with trio.fail_after(10):
            greeted = await _open(pki, port, "build-vm-02")
            assert await _alive(greeted.conn)
            await greeted.aclose()
        server.request_shutdown()
    failed = [e for e in logs if e["event"] == "tls.reload_failed"]
    assert failed and failed[0]["log_level"] == "error" and "crl" in failed[0]["error"]
