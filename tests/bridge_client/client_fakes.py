"""Fakes for the client tests: a memory-stream network, a scripted server and a fake vpcd.

Everything runs in-process over `trio.testing.memory_stream_pair`, so `autojump_clock` gives
exact virtual times. The server end is real: TLS 1.3 through the same `protocol.runtime.tls`
contexts the daemons use (certificates from trustme), then `BridgeConnection(Role.SERVER)`.
"""

from __future__ import annotations

import errno
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing
import trustme
from role_certs import CertRole, issue_cert

from bridge_client.backoff import Backoff
from bridge_client.tunnel import Tunnel
from protocol import NEED_DATA, wire
from protocol.connection import BridgeConnection, Role
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context, server_context
from protocol.vpcd import Closed, Response, VpcdControl, VpcdReaderSide

M = TypeVar("M")

SERVER_NAME = "tokenhost.test"
CLIENT_NAME = "build-vm-01"
ATR = bytes.fromhex("3BFF1300008131FE4543433130")  # any 1..33 byte ATR will do
ATR2 = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")


@dataclass(frozen=True)
class Certs:
    """PEM files for one CA, a server, a client, and a second (foreign) CA's server and client."""

    folder: Path
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    foreign_ca: Path
    foreign_server: tuple[Path, Path]
    foreign_client: tuple[Path, Path]
    # Our CA's server certificates with no extended key usage, and with clientAuth and serverAuth.
    server_no_eku: tuple[Path, Path]
    server_both_ekus: tuple[Path, Path]

    @classmethod
    def create(cls, folder: Path) -> Certs:
        ours, theirs = trustme.CA(), trustme.CA()
        ours.cert_pem.write_to_path(str(folder / "ca.pem"))
        theirs.cert_pem.write_to_path(str(folder / "foreign-ca.pem"))

        def leaf(ca: trustme.CA, stem: str, name: str, role: CertRole = "server") -> tuple[Path, Path]:
            cert = issue_cert(ca, name, common_name=name, role="client" if "client" in stem else role)
            cert.cert_chain_pems[0].write_to_path(str(folder / f"{stem}.pem"))
            cert.private_key_pem.write_to_path(str(folder / f"{stem}.key"))
            return folder / f"{stem}.pem", folder / f"{stem}.key"

        return cls(
            folder=folder,
            ca=folder / "ca.pem",
            server=leaf(ours, "server", SERVER_NAME),
            client=leaf(ours, "client", CLIENT_NAME),
            foreign_ca=folder / "foreign-ca.pem",
            foreign_server=leaf(theirs, "foreign-server", SERVER_NAME),
            foreign_client=leaf(theirs, "foreign-client", CLIENT_NAME),
            server_no_eku=leaf(ours, "server-no-eku", SERVER_NAME, "none"),
            server_both_ekus=leaf(ours, "server-both-ekus", SERVER_NAME, "both"),
        )

    def client_ctx(self) -> ssl.SSLContext:
        return client_context(ca=self.ca, cert=self.client[0], key=self.client[1])

    def server_ctx(self, *, cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> ssl.SSLContext:
        cert = cert or self.server
        return server_context(ca=ca or self.ca, cert=cert[0], key=cert[1])


class MemoryNet:
    """An `open_stream(host, port)` replacement: each connect hands the far end to the test.

    `failure` makes connects raise (like trio: OSError from a group of per-address errors);
    `hang` makes them wait forever (a firewall that drops packets).
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](8)
        self.failure: OSError | None = None
        self.hang = False
        self.attempts: list[float] = []

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        if self.failure is not None:
            raise OSError(f"all attempts to connect to {host}:{port} failed") from ExceptionGroup(
                "all attempts failed", [self.failure]
            )
        near, far = trio.testing.memory_stream_pair()
        self._send.send_nowait(far)
        return near

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    def pending(self) -> bool:
        return self._receive.statistics().current_buffer_used > 0


def refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


class FakeServer:
    """The server end of one tunnel connection, driven step by step by the test."""

    def __init__(self, stream: trio.abc.Stream, ctx: ssl.SSLContext) -> None:
        self.tls = trio.SSLStream(stream, ctx, server_side=True)
        self.conn = FramedConnection(self.tls, BridgeConnection(Role.SERVER))

    @classmethod
    async def accept(cls, net: MemoryNet, ctx: ssl.SSLContext) -> FakeServer:
        server = cls(await net.accept(), ctx)
        await server.tls.do_handshake()
        return server

    async def welcome(self, *, heartbeat: float = 10.0, identity: str = CLIENT_NAME) -> wire.ClientHello:
        await self.send(
            wire.Welcome(
                version=wire.PROTOCOL_VERSION,
                server="fake-server/1",
                identity=identity,
                heartbeat_interval=heartbeat,
            )
        )
        return await self.expect(wire.ClientHello)

    async def send(self, msg: Any) -> None:
        await self.conn.send(msg)

    async def receive(self) -> object:
        return await self.conn.receive()

    async def expect(self, cls: type[M]) -> M:
        """The next message that is not a Ping (pings are the heartbeat, tested on their own)."""
        while True:
            msg = await self.conn.receive()
            if isinstance(msg, wire.Ping):
                continue
            assert isinstance(msg, cls), f"expected {cls.__name__}, got {msg!r}"
            return msg

    async def nothing_for(self, seconds: float) -> list[object]:
        """Everything but pings the client sent within `seconds` (virtual time)."""
        seen: list[object] = []
        with trio.move_on_after(seconds):
            while True:
                msg = await self.conn.receive()
                if not isinstance(msg, wire.Ping):
                    seen.append(msg)
        return seen

    async def token(
        self,
        name: str = "codesign",
        *,
        token_id: int = 0,
        present: bool = True,
        allowed: bool = True,
        atr: bytes = ATR,
        state: str = "idle",
    ) -> None:
        await self.send(
            wire.TokenStatus(
                token_id=token_id,
                name=name,
                present=present,
                allowed=allowed,
                atr=atr if present else b"",
                state=state,
            )
        )

    async def close(self) -> None:
        await trio.aclose_forcefully(self.tls)


def make_tunnel(certs: Certs, net: MemoryNet, **kwargs: Any) -> Tunnel:
    defaults: dict[str, Any] = {
        "host": SERVER_NAME,
        "port": 7447,
        "server_name": SERVER_NAME,
        "ssl_context": certs.client_ctx(),
        "token_names": ["codesign"],
        "backoff": Backoff(initial_s=1.0, max_s=8.0, jitter=0.0),
        "open_stream": net,
    }
    defaults.update(kwargs)
    return Tunnel(**defaults)


async def open_tunnel(
    nursery: trio.Nursery, certs: Certs, *, heartbeat: float = 10.0, **kwargs: Any
) -> tuple[Tunnel, FakeServer, MemoryNet]:
    """A tunnel connected to a fake server that offers token `codesign` (id 0, present, allowed)."""
    net = MemoryNet()
    tunnel = make_tunnel(certs, net, **kwargs)
    await nursery.start(tunnel.run)
    server = await FakeServer.accept(net, certs.server_ctx())
    await server.welcome(heartbeat=heartbeat)
    await server.token()
    await wait_until(tunnel, lambda: tunnel.tokens["codesign"].usable)
    return tunnel, server, net


async def hold_lease(tunnel: Tunnel, server: FakeServer, epoch: int = 41) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.acquire_lease, "codesign")
        await server.expect(wire.LeaseRequest)
        await server.send(wire.LeaseGranted(token_id=0, epoch=epoch, atr=ATR))


async def wait_until(tunnel: Tunnel, condition: Any) -> None:
    """Wait on the tunnel's change notifications (no polling, no sleeps)."""
    while not condition():
        await tunnel.wait_changed()


class FakeVpcd:
    """pcscd's vpcd driver as seen from the card side: the reader end of one slot connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = VpcdReaderSide()

    async def _next(self) -> Response | Closed:
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                self.reader.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            assert isinstance(event, Response | Closed)
            return event

    async def control(self, code: VpcdControl) -> None:
        await self.stream.send_all(self.reader.send_control(code))

    async def get_atr(self) -> bytes:
        await self.control(VpcdControl.GET_ATR)
        event = await self._next()
        assert isinstance(event, Response), "card removed while reading its ATR"
        return event.data

    async def send_apdu(self, apdu: bytes) -> None:
        await self.stream.send_all(self.reader.send_apdu(apdu))

    async def response(self) -> bytes | None:
        """The card's answer, or None when the card side closed the connection instead."""
        event = await self._next()
        return event.data if isinstance(event, Response) else None

    async def closed(self) -> bool:
        """True once the card side closed the connection without sending anything more."""
        return await self._next() == Closed()


class LockstepNet:
    """`MemoryNet` with flow control: each connect is a lockstep pair, so a write waits until
    the far end reads (a peer that stops reading really blocks the writer)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](8)

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        near, far = trio.testing.lockstep_stream_pair()
        self._send.send_nowait(far)
        return near

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()
