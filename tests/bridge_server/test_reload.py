"""Live TLS reload: a revoked client is dropped and kept out; a bad file keeps the old context."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import structlog
import trio

from bridge_admin.pki import Pki
from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from protocol import wire
from protocol.runtime.address import Address
from protocol.runtime.connect import ConnectFailed, Greeted, connect
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context


def _pki(folder: Path) -> Pki:
    pki = Pki(folder / "pki")
    pki.init()
    pki.issue_server(["localhost"])
    for name in ("build-vm-01", "build-vm-02"):
        pki.issue_client(name)
    return pki


def _server(folder: Path) -> BridgeServer:
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {
            "ca": "pki/ca.pem",
            "cert": "pki/localhost.pem",
            "key": "pki/localhost.key",
            "crl": "pki/crl.pem",
        },
        "tokens": [
            {"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": ["build-vm-01", "build-vm-02"]}
        ],
    }
    return BridgeServer(parse_server_config(doc, folder / "server.yaml"))


def _ctx(pki: Pki, name: str) -> ssl.SSLContext:
    b = pki.folder / "clients" / name
    return client_context(ca=b / "ca.pem", cert=b / f"{name}.pem", key=b / f"{name}.key")


async def _open(pki: Pki, port: int, name: str) -> Greeted:
    return await connect(
        Address("127.0.0.1", port), _ctx(pki, name), server_name="localhost", software="reload-test"
    )


async def _alive(framed: FramedConnection) -> bool:
    await framed.send(wire.Ping(nonce=42))
    while True:
        msg = await framed.receive()
        if isinstance(msg, wire.Pong):
            return True
        if isinstance(msg, wire.Goodbye | wire.ConnectionClosed):
            return False


async def _closed(framed: FramedConnection) -> wire.Goodbye | None:
    try:
        while True:
            msg = await framed.receive()
            if isinstance(msg, wire.Goodbye):
                return msg
            if isinstance(msg, wire.ConnectionClosed):
                return None
    except trio.BrokenResourceError:
        return None


async def test_revoked_client_is_dropped_within_seconds_and_cannot_return(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    server = _server(tmp_path)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(20):
            one, two = await _open(pki, port, "build-vm-01"), await _open(pki, port, "build-vm-02")
            start = trio.current_time()
            pki.revoke("build-vm-01")
            with trio.fail_after(5):
                await _closed(one.conn)
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
    pki = _pki(tmp_path)
    server = _server(tmp_path)
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
