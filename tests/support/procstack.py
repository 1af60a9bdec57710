"""Helpers for process-level fault tests: the server as a real process, driven at CCID level.

`ccid_signer` is the in-repo CCID-level harness: a real mTLS connection to the server process
that leases the token, powers it on, VERIFYs and signs, releasing after each signature, and
reconnects whenever the server vanishes. `control` talks JSON lines to the server's control
socket (`simulator.evidence`, `status`).
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from inproc import SELECT_PIV, SIGN_9D, VERIFY_123456, apdu, expect, greet, power_on

from bridge_admin.local_stack import BridgeStack
from bridge_admin.local_stack import wait_for as poll
from protocol import wire
from protocol.runtime.connect import ConnectFailed
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context

VERIFY_STATUS_QUERY = bytes.fromhex("00200080")  # empty VERIFY: reports retries, spends none


def client_ssl(stack: BridgeStack, name: str = "build-vm-01") -> ssl.SSLContext:
    bundle = stack.pki.folder / "clients" / name
    return client_context(ca=bundle / "ca.pem", cert=bundle / f"{name}.pem", key=bundle / f"{name}.key")


def control(stack: BridgeStack, action: str, **args: Any) -> dict[str, Any]:
    """One request on the server's control socket; the `result` object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stack.workdir / "control.sock"))
        sock.sendall(json.dumps({"action": action, "args": args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    doc = json.loads(buf)
    assert doc["ok"], doc
    return dict(doc["result"])


@dataclass
class Grant:
    run: int
    epoch: int
    signed: bool = False


@dataclass
class SignerLog:
    run: int = 0  # which server process is current (set by the killer)
    grants: list[Grant] = field(default_factory=list)
    signatures: int = 0
    connection_errors: int = 0


async def sign_once(client: FramedConnection, log: SignerLog) -> None:
    """Lease, cold power-on, SELECT, VERIFY, sign, release."""
    await client.send(wire.LeaseRequest(token_id=0))
    granted = await expect(client, wire.LeaseGranted)
    grant = Grant(log.run, granted.epoch)
    log.grants.append(grant)
    await power_on(client, granted.epoch)
    assert (await apdu(client, granted.epoch, 1, SELECT_PIV))[-2:] == b"\x90\x00"
    assert await apdu(client, granted.epoch, 2, VERIFY_123456) == b"\x90\x00"
    signature = await apdu(client, granted.epoch, 3, SIGN_9D)
    assert signature[-2:] == b"\x90\x00" and signature[0] == 0x7C, signature.hex()
    grant.signed = True
    log.signatures += 1
    await client.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
    await expect(client, wire.LeaseEnded)


async def ccid_signer(ctx: ssl.SSLContext, port: int, log: SignerLog) -> None:
    """Sign in a loop forever, one lease per signature, reconnecting after every failure."""
    await reconnecting(ctx, port, lambda conn: sign_once(conn, log), log)


async def reconnecting(
    ctx: ssl.SSLContext, port: int, step: Callable[[FramedConnection], Awaitable[None]], log: Any
) -> None:
    """Greet and run `step` forever; count each lost or refused connection in
    `log.connection_errors` and connect again (5 s bound on each greeting and step)."""
    while True:
        try:
            with trio.fail_after(5):
                greeted = await greet(ctx, port, "ccid-signer")
            try:
                while True:
                    with trio.fail_after(5):
                        await step(greeted.conn)
            finally:
                await greeted.aclose()
        except (
            ConnectFailed,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ):
            log.connection_errors += 1
            await trio.sleep(0.02)


def overlapping_leases(events: list[list[Any]]) -> list[str]:
    """Problems in one server run's simulator event log: interleaved epochs, no reset between.

    events: ["apdu", epoch, ins] / ["power_on", epoch, warm] / ["power_off", epoch, 0].
    """
    problems: list[str] = []
    finished: set[int] = set()
    current: int | None = None
    reset_since_switch = True
    for kind, epoch, _extra in events:
        if kind in ("power_off", "power_on"):
            reset_since_switch = True
            continue
        if epoch == current:
            continue
        if epoch in finished:
            problems.append(f"epoch {epoch} used again after epoch {current}: leases overlapped")
        if current is not None:
            finished.add(current)
            if not reset_since_switch:
                problems.append(f"no card reset between epoch {current} and epoch {epoch}")
        current, reset_since_switch = epoch, False
    return problems


def wait_for(predicate: Any, *, within: float, what: str, interval: float = 0.05) -> float:
    """Poll until `predicate()` holds (bounded by `within`); return how long it took."""
    start = time.monotonic()
    poll(predicate, timeout=within, what=what, interval=interval)
    return time.monotonic() - start


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def verify_signature(cert_pem: Path, data: bytes, signature: bytes) -> None:
    """pkcs11-tool's RSA PKCS#1 v1.5 or raw r||s ECDSA signature over SHA-256 of `data`."""
    key = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        return
    assert isinstance(key, ec.EllipticCurvePublicKey)
    half = len(signature) // 2
    der = encode_dss_signature(
        int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
    )
    key.verify(der, hashlib.sha256(data).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
