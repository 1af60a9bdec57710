"""`protocol.runtime.connect`: the one connect-TLS-greet path, against a scripted server."""

from __future__ import annotations

import contextlib
import errno

import pytest
import trio
import trio.testing
from client_fakes import CLIENT_NAME, SERVER_NAME, Certs, FakeServer, MemoryNet

from protocol import wire
from protocol.errors import CloseCode
from protocol.runtime.address import Address
from protocol.runtime.connect import ConnectFailed, ConnectRefused, Greeted, connect

ADDRESS = Address(SERVER_NAME, 7447)


async def _connect(certs: Certs, net: MemoryNet, address: Address = ADDRESS, **kwargs: object) -> Greeted:
    return await connect(
        address,
        certs.client_ctx(),
        server_name=str(kwargs.pop("server_name", SERVER_NAME)),
        software="connect-test/1",
        open_stream=net,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_welcome_returns_the_connection_and_answers_client_hello(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNet()
    result: list[Greeted] = []

    async def client() -> None:
        result.append(await _connect(certs, net))

    nursery.start_soon(client)
    with trio.fail_after(30):
        server = await FakeServer.accept(net, certs.server_ctx())
        hello = await server.welcome(heartbeat=7.0)
    assert hello.software == "connect-test/1"
    assert hello.version == wire.PROTOCOL_VERSION
    await trio.testing.wait_all_tasks_blocked()
    (greeted,) = result
    assert (greeted.welcome.identity, greeted.welcome.heartbeat_interval) == (CLIENT_NAME, 7.0)
    await greeted.conn.send(wire.Ping(nonce=5))
    assert await server.receive() == wire.Ping(nonce=5)
    await greeted.aclose()


async def _failure(certs: Certs, net: MemoryNet, first: object | None, **kwargs: object) -> ConnectFailed:
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # the client may fail the handshake
                server = await FakeServer.accept(net, certs.server_ctx())
                if first is not None:
                    await server.send(first)
                await server.close()

        nursery.start_soon(serve)
        with trio.fail_after(30), pytest.raises(ConnectFailed) as info:
            await _connect(certs, net, **kwargs)
    return info.value


async def test_a_refusal_is_typed_and_carries_code_message_and_address(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    refusal = wire.Refused(
        version=wire.PROTOCOL_VERSION, code=CloseCode.NOT_AUTHORIZED, reason="not_allowed", message="ask ops"
    )
    exc = await _failure(certs, MemoryNet(), refusal)
    assert isinstance(exc, ConnectRefused)
    assert (exc.code, exc.message, exc.stage) == ("not_allowed", "ask ops", "refused")
    assert str(exc) == f"server {ADDRESS} refused this client: not_allowed: ask ops"


async def test_a_close_right_after_the_handshake_reads_as_a_refused_certificate(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    exc = await _failure(certs, MemoryNet(), None)
    assert exc.stage == "closed"
    assert str(exc).startswith(f"server {ADDRESS} refused this client: it closed the connection right after")


async def test_a_name_mismatch_names_what_to_fix(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    exc = await _failure(certs, MemoryNet(), None, server_name="signing.test", name_fix="fix --server-name")
    assert exc.stage == "tls"
    assert str(exc) == (
        f"TLS handshake with {ADDRESS} failed: hostname mismatch (the server certificate does not name "
        "'signing.test'; fix --server-name)"
    )


async def test_an_ipv6_server_is_named_with_brackets(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNet()
    net.failure = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(ConnectFailed) as info:
        await _connect(certs, net, Address("::1", 7447))
    assert info.value.stage == "network"
    assert str(info.value) == (
        "connection refused by [::1]:7447 (is tokenbridge-server running and listening there?)"
    )
