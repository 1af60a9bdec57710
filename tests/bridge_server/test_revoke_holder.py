"""S3 / P7: revoke the client that holds the lease, a stolen VM identity (issue 18 item 4).

Through the real server with a CRL on disk: build-vm-01 holds the lease with its PIN verified
and build-vm-02 waits. `tokenbridge pki revoke build-vm-01` rewrites the CRL; within 5 s the
holder gets Goodbye(REVOKED) and is closed, the waiter is granted a cold-reset card (a signature
without VERIFY answers 6982), the revoked certificate cannot come back, and the audit names the
revoked certificate by fingerprint, with the lease ended as `revoked`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from inproc import (
    SELECT_PIV,
    SIGN_9D,
    SW_OK,
    SW_SECURITY_NOT_SATISFIED,
    VERIFY_123456,
    apdu,
    expect,
    power_on,
)
from pki_server import bundle_context, cert_file, make_pki, make_server, until_goodbye

from bridge_admin.pki import Pki
from protocol import wire
from protocol.connection import BridgeConnection, Role
from protocol.errors import CloseCode
from protocol.runtime.framed import FramedConnection

REVOCATION_BOUND_S = 5.0


async def connect(pki: Pki, port: int, name: str) -> tuple[trio.SSLStream[Any], FramedConnection]:
    ctx = bundle_context(pki, name)
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")
    framed = FramedConnection(stream, BridgeConnection(Role.CLIENT))
    try:
        await stream.do_handshake()
        assert isinstance(await framed.receive(), wire.Welcome)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    await framed.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="revoke-test"))
    return stream, framed


async def refused(pki: Pki, port: int, name: str) -> bool:
    try:
        stream, _ = await connect(pki, port, name)
    except trio.BrokenResourceError:
        return True
    await trio.aclose_forcefully(stream)
    return False


async def test_revoking_the_lease_holder_drops_it_and_hands_a_clean_card_to_the_waiter(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    server = make_server(tmp_path, heartbeat_s=5.0, audit={"path": "audit.log"})
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        with trio.fail_after(30):
            s1, vm1 = await connect(pki, port, "build-vm-01")
            s2, vm2 = await connect(pki, port, "build-vm-02")
            await vm1.send(wire.LeaseRequest(token_id=0))
            held = await expect(vm1, wire.LeaseGranted)
            await power_on(vm1, held.epoch, 0)
            assert (await apdu(vm1, held.epoch, 1, SELECT_PIV))[-2:] == SW_OK
            assert await apdu(vm1, held.epoch, 2, VERIFY_123456) == SW_OK
            await vm2.send(wire.LeaseRequest(token_id=0))
            await expect(vm2, wire.LeaseQueued)
            start = trio.current_time()
            pki.revoke("build-vm-01")
            with trio.fail_after(REVOCATION_BOUND_S):
                bye = await until_goodbye(vm1)
                granted = await expect(vm2, wire.LeaseGranted)
            took = trio.current_time() - start
            await power_on(vm2, granted.epoch, 0)
            assert (await apdu(vm2, granted.epoch, 1, SELECT_PIV))[-2:] == SW_OK
            unverified = await apdu(vm2, granted.epoch, 2, SIGN_9D)
            came_back = not await refused(pki, port, "build-vm-01")
            for s in (s1, s2):
                await trio.aclose_forcefully(s)
        server.request_shutdown()
    assert bye is not None and bye.code == CloseCode.REVOKED, bye
    assert took <= REVOCATION_BOUND_S
    assert unverified == SW_SECURITY_NOT_SATISFIED
    assert not came_back
    der = x509.load_pem_x509_certificate(cert_file(pki, "build-vm-01").read_bytes())
    revoked_fp = hashlib.sha256(der.public_bytes(serialization.Encoding.DER)).hexdigest()
    audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    closed = [e for e in audit if e["event"] == "connection.closed" and e["fingerprint"] == revoked_fp]
    assert [e["reason"] for e in closed] == ["certificate_revoked"]
    released = [e for e in audit if e["event"] == "lease.released" and e.get("fingerprint") == revoked_fp]
    assert [(e["lease_epoch"], e["reason"]) for e in released] == [(held.epoch, "revoked")]
    grants = [e["client_id"] for e in audit if e["event"] == "lease.granted"]
    assert grants == ["build-vm-01", "build-vm-02"]
