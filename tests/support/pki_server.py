"""An in-process BridgeServer on a throw-away `tokenbridge pki` PKI (CA, server, CRL, client bundles).

For tests that need the real PKI files (revocation, CRL reloads and expiry): one way to build
them, the server config over them, and a client's TLS context from its bundle.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bridge_admin.pki import Pki
from bridge_server.app import BridgeServer
from bridge_server.config import parse_server_config
from protocol import wire
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context

CLIENTS = ("build-vm-01", "build-vm-02")


def make_pki(folder: Path, clients: Sequence[str] = CLIENTS) -> Pki:
    """CA, a server certificate for `localhost`, a CRL and one bundle per client, in folder/pki."""
    pki = Pki(folder / "pki")
    pki.init()
    pki.issue_server(["localhost"])
    for name in clients:
        pki.issue_client(name)
    return pki


def make_server(folder: Path, *, allow: Sequence[str] = CLIENTS, **extra: Any) -> BridgeServer:
    """A server on 127.0.0.1:0 over `make_pki`'s files (CRL included), one simulated yubikey5."""
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {
            "ca": "pki/ca.pem",
            "cert": "pki/localhost.pem",
            "key": "pki/localhost.key",
            "crl": "pki/crl.pem",
        },
        "tokens": [{"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": list(allow)}],
        **extra,
    }
    return BridgeServer(parse_server_config(doc, folder / "server.yaml"))


def bundle_context(pki: Pki, name: str) -> ssl.SSLContext:
    """The client TLS context of `name`'s bundle (as `tokenbridge pki issue-client` wrote it)."""
    b = pki.folder / "clients" / name
    return client_context(ca=b / "ca.pem", cert=b / f"{name}.pem", key=b / f"{name}.key")


def cert_file(pki: Pki, name: str) -> Path:
    return pki.folder / "clients" / name / f"{name}.pem"


async def until_goodbye(framed: FramedConnection) -> wire.Goodbye | None:
    """Read until the server says Goodbye (returned) or the connection ends (None)."""
    try:
        while True:
            msg = await framed.receive()
            if isinstance(msg, wire.Goodbye):
                return msg
            if isinstance(msg, wire.ConnectionClosed):
                return None
    except trio.BrokenResourceError:
        return None
