"""S11 / P9: every audit line about a client names it by its certificate (issue 18 item 11).

Through the real server over mutual TLS: a refused connection, an accepted one, a lease
requested, granted and ended, a PIN outcome, a refused command and an admin action. Each line
must carry the certificate-derived identity (`client_id`), its names (CN and SANs, `names`) and
the SHA-256 fingerprint of the DER certificate (`fingerprint`), never something the client said
in a protocol field (the ClientHello's `software` is free text and must not become the identity).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from inproc import VERIFY_123456, Pki, expect, open_lease, power_on, raw_client, running_server

from protocol import ccid, wire
from protocol.runtime.framed import FramedConnection

UPDATE_BINARY = bytes.fromhex("00D6000001AA")  # outside the PIV allow list: refused before the card
WRONG_PIN = bytes.fromhex("0020008008393939393939FFFF")


def fingerprint(pem: Path) -> str:
    der = x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _refused_stranger(pki: Pki, port: int) -> None:
    async with raw_client(pki, port, "stranger") as c:
        assert isinstance(await c.receive(), wire.Refused)


async def _admin_status(pki: Pki, port: int) -> None:
    async with raw_client(pki, port, "ops") as c:
        assert isinstance(await c.receive(), wire.Welcome)
        await c.send(wire.ClientHello(version=wire.PROTOCOL_VERSION, software="ops-console"))
        await c.send(wire.AdminRequest(request_id=1, action="revoke", args={"token": "codesign"}))
        assert (await expect(c, wire.AdminResponse)).request_id == 1


async def _xfr(c: FramedConnection, epoch: int, seq: int, command: bytes) -> bytes:
    """The card's (or the guard's) answer; the ErrorMessage that follows a refusal is skipped."""
    await c.send(wire.CcidFrame(token_id=0, epoch=epoch, message=ccid.xfr_block(seq, command).encode()))
    while True:
        msg = await c.receive()
        if isinstance(msg, wire.CcidFrame):
            return ccid.decode_message(msg.message).data
        assert isinstance(msg, wire.ErrorMessage | wire.TokenStatus | wire.Ping), msg


async def _lease_with_pin_and_refusal(pki: Pki, port: int) -> None:
    async with raw_client(pki, port) as c:
        granted = await open_lease(c)
        await c.send(wire.AdminRequest(request_id=2, action="revoke", args={"token": "codesign"}))
        assert (await expect(c, wire.AdminResponse)).ok is False  # not an admin: refused, audited
        await power_on(c, granted.epoch, 1)
        assert await _xfr(c, granted.epoch, 2, WRONG_PIN) == b"\x63\xc2"  # the guard engages
        assert await _xfr(c, granted.epoch, 3, VERIFY_123456) == b"\x69\x83"  # refused by the guard
        assert await _xfr(c, granted.epoch, 4, UPDATE_BINARY) == b"\x69\x85"  # refused by the policy
        for seq in range(5, 25):  # past the 20 refusals audited one by one: a summary line follows
            assert await _xfr(c, granted.epoch, seq & 0xFF, UPDATE_BINARY) == b"\x69\x85"
        await c.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
        while not isinstance(await c.receive(), wire.LeaseEnded):
            pass


async def _ejected_flooder(pki: Pki, port: int) -> None:
    """Refused commands past the flood limit: the server ejects the session (audited)."""
    async with raw_client(pki, port) as c:
        granted = await open_lease(c)
        for seq in range(400):
            msg = ccid.xfr_block(seq & 0xFF, UPDATE_BINARY).encode()
            await c.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=msg))
            while True:
                reply = await c.receive()
                if isinstance(reply, wire.Goodbye):
                    return
                if isinstance(reply, wire.CcidFrame):
                    break
        raise AssertionError("never ejected")


async def test_every_client_event_names_the_certificate_identity_sans_and_fingerprint(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "stranger", "ops"))
    audit = tmp_path / "audit.log"
    async with running_server(tmp_path, admins=["ops"], audit={"path": "audit.log"}) as (_, port):
        with trio.fail_after(30):
            await _refused_stranger(pki, port)
            await _admin_status(pki, port)
            await _lease_with_pin_and_refusal(pki, port)
            await _ejected_flooder(pki, port)
    lines = audit_lines(audit)
    expected = {
        ("connection.refused", "stranger"),
        ("connection.accepted", "ops"),
        ("admin.action", "ops"),
        ("admin.refused", "build-vm-01"),
        ("connection.closed", "ops"),
        ("connection.accepted", "build-vm-01"),
        ("lease.requested", "build-vm-01"),
        ("lease.granted", "build-vm-01"),
        ("pin.verified", "build-vm-01"),
        ("pin_guard.engaged", "build-vm-01"),
        ("command.refused", "build-vm-01"),
        ("command.refused_summary", "build-vm-01"),
        ("connection.ejected", "build-vm-01"),
        ("lease.released", "build-vm-01"),
        ("connection.closed", "build-vm-01"),
    }
    seen = {(e["event"], e.get("client_id")) for e in lines}
    assert expected <= seen, expected - seen
    about_clients = [e for e in lines if (e["event"], e.get("client_id")) in expected]
    for entry in about_clients:
        who = entry["client_id"]
        assert entry["fingerprint"] == fingerprint(tmp_path / f"{who}.pem"), entry
        assert who in entry["names"], entry  # CN and SANs from the certificate
        assert "ops-console" not in json.dumps(entry)  # a protocol field never names anyone
    assert [e["outcome"] for e in lines if e["event"] == "pin.verified"] == ["wrong_pin"]
    refusals = [e["reason"] for e in lines if e["event"] == "command.refused"]
    assert refusals[:3] == ["pin_guard", "policy", "policy"]
