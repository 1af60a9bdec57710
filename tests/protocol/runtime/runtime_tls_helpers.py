"""Test PKI files and a TLS handshake driver over trio memory streams."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.testing
import trustme
from role_certs import CertRole, issue_cert


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    ca_file: Path
    server: CertFiles
    client: CertFiles
    root: Path

    def issue(
        self,
        name: str,
        *identities: str,
        ca: trustme.CA | None = None,
        role: CertRole = "client",
        **kwargs: object,
    ) -> CertFiles:
        """A leaf signed by `ca` (ours by default) with the extended key usage of `role`."""
        leaf = issue_cert(ca or self.ca, *identities, role=role, **kwargs)  # type: ignore[arg-type]
        cert = self.root / f"{name}.pem"
        key = self.root / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return CertFiles(cert, key)


@dataclass
class Side:
    stream: trio.SSLStream[trio.abc.Stream] | None = None
    error: BaseException | None = None
    received: bytes = b""
    session_reused: bool | None = None
    extra: dict[str, object] = field(default_factory=dict)


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, *, hostname: str = "bridge.example"
) -> tuple[Side, Side]:
    """Server handshakes then greets; client handshakes then reads the greeting.

    TLS 1.3 rejections of the client certificate only show on the client's first read
    (reliability-anchors §3.2), hence the greeting.
    """
    server_raw, client_raw = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=hostname)
    srv, cli = Side(stream=server), Side(stream=client)

    async def run_server() -> None:
        try:
            await server.do_handshake()
            await server.send_all(b"welcome")
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            srv.error = exc
        finally:
            await trio.aclose_forcefully(server)

    async def run_client() -> None:
        try:
            await client.do_handshake()
            cli.received = await client.receive_some()
            cli.session_reused = client.session_reused
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            cli.error = exc
        finally:
            await trio.aclose_forcefully(client)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            nursery.start_soon(run_client)
    return srv, cli
