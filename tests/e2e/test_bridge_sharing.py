"""One token, two build machines, and a token that comes and goes (issue: client and workflow).

The simulated token records, in order, every APDU with the lease epoch the server had set and
every power event; the server exposes that record on its control socket for simulated tokens
only. That record is the oracle: leases never overlap when each epoch's APDUs form one
contiguous run, and the card was reset between holders when a power-on separates every two
runs.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from e2e_stack import VpcdSlot

from bench.pcsc import Card
from bridge_admin.local_stack import VPCD_BASE_PORT, BridgeStack, claim_vpcd_slot, reader_name
from bridge_admin.signing_tools import read_certificate_pem

pytestmark = pytest.mark.e2e

PIN = "123456"


def control(stack: BridgeStack, action: str, **args: Any) -> dict[str, Any]:
    """One request on the server's local control socket (JSON lines)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(stack.workdir / "control.sock"))
        sock.sendall(json.dumps({"action": action, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    assert reply["ok"], reply
    return reply["result"]


def runs_by_epoch(events: list[list[Any]]) -> list[tuple[int, int]]:
    """Collapse the event log into [(epoch, power_ons_before_this_run)] runs of APDUs."""
    runs: list[tuple[int, int]] = []
    power_ons = 0
    for kind, epoch, _detail in events:
        if kind == "power_on":
            power_ons += 1
        elif kind == "apdu" and epoch is not None and (not runs or runs[-1][0] != epoch):
            runs.append((epoch, power_ons))
            power_ons = 0
    return runs


def test_runs_by_epoch_detects_interleaving_and_missing_reset() -> None:
    """The oracle itself can fail: interleaved epochs and a missing reset are visible."""
    good = [
        ["power_on", None, 0],
        ["apdu", 1, 0xA4],
        ["apdu", 1, 0x87],
        ["power_on", 1, 0],
        ["apdu", 2, 0xA4],
    ]
    assert runs_by_epoch(good) == [(1, 1), (2, 1)]
    interleaved = [
        ["power_on", None, 0],
        ["apdu", 1, 0xA4],
        ["power_on", 1, 0],
        ["apdu", 2, 0xA4],
        ["apdu", 1, 1],
    ]
    assert [e for e, _ in runs_by_epoch(interleaved)] == [1, 2, 1]
    no_reset = [["power_on", None, 0], ["apdu", 1, 0xA4], ["apdu", 2, 0xA4]]
    assert runs_by_epoch(no_reset)[1] == (2, 0)


@pytest.fixture
def second_vpcd_slot(vpcd_slot: VpcdSlot) -> Iterator[VpcdSlot]:
    """The other vpcd slot (its lock is taken per open file, so this cannot return `vpcd_slot`)."""
    with claim_vpcd_slot(timeout=120) as index:
        assert index != vpcd_slot.index
        yield VpcdSlot(index, VPCD_BASE_PORT + index, reader_name(index))


DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


def piv_sign(card: Card, data: bytes) -> bytes:
    """RSA-2048 PKCS#1 v1.5 signature with PIV key 9A, by APDUs as OpenSC sends them (§4.3)."""
    digest_info = DIGEST_INFO_SHA256 + hashlib.sha256(data).digest()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info
    template = b"\x7c\x82\x01\x06\x82\x00\x81\x82\x01\x00" + block
    select = card.transmit(bytes.fromhex("00A4040009A0000003080000100000"))
    assert select[-2] in (0x90, 0x61), select.hex()
    sw = card.transmit(b"\x00\x20\x00\x80\x08" + PIN.encode().ljust(8, b"\xff"))
    assert sw == b"\x90\x00", sw.hex()
    first, rest = template[:255], template[255:]
    assert card.transmit(b"\x10\x87\x07\x9a" + bytes([len(first)]) + first) == b"\x90\x00"
    response = card.transmit(b"\x00\x87\x07\x9a" + bytes([len(rest)]) + rest + b"\x00")
    body = response[:-2]
    while response[-2] == 0x61:
        response = card.transmit(b"\x00\xc0\x00\x00" + bytes([response[-1]]))
        body += response[:-2]
    assert response[-2:] == b"\x90\x00", response[-2:].hex()
    marker = body.index(b"\x82\x82\x01\x00")
    return body[marker + 4 : marker + 4 + 256]


def sign_loop(slot: int, rounds: int, results: list[tuple[int, bytes, bytes]], errors: list[str]) -> None:
    """One build machine: `rounds` PC/SC sessions on its own reader, each a PIV login and sign.

    PC/SC directly (not pkcs11-tool): both "machines" share this host's pcscd, and OpenSC's
    PKCS#11 module binds the cards in every reader at start-up, so two pkcs11-tool processes
    would each hold one reader and wait for the other — a deadlock real, separate VMs never see.
    """
    try:
        for n in range(rounds):
            data = f"artefact {slot}-{n}".encode() * 20
            with Card(reader_name(slot)) as card:
                results.append((slot, data, piv_sign(card, data)))
    except Exception as exc:  # reported by the test thread with the daemons' logs
        errors.append(f"slot {slot}: {exc!r}")


def test_two_build_machines_signing_at_once_never_share_a_lease(
    tmp_path: Path, vpcd_slot: VpcdSlot, second_vpcd_slot: VpcdSlot
) -> None:
    stack = BridgeStack(tmp_path / "stack", lease={"linger_s": 0.3, "idle_timeout_s": 30.0})
    try:
        stack.make_pki(["build-vm-01", "build-vm-02"])
        stack.write_server_config(allow=["build-vm-01", "build-vm-02"])
        stack.start_server()
        c1 = stack.start_client("build-vm-01", [vpcd_slot.index])
        stack.wait_card(vpcd_slot.index, c1)
        # Read the certificate while only one reader shows the token: OpenSC opens every reader.
        cert = x509.load_pem_x509_certificate(
            read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert.pem").read_bytes()
        )
        c2 = stack.start_client("build-vm-02", [second_vpcd_slot.index])
        stack.wait_card(second_vpcd_slot.index, c2)
        before = control(stack, "simulator.evidence", token="codesign")

        results: list[tuple[int, bytes, bytes]] = []
        errors: list[str] = []
        loops = [
            threading.Thread(target=sign_loop, args=(s.index, 3, results, errors))
            for s in (vpcd_slot, second_vpcd_slot)
        ]
        for t in loops:
            t.start()
        for t in loops:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in loops)
        assert not errors, "\n".join(errors) + "\n" + "".join(d.log_text()[-3000:] for d in stack.daemons)
        assert len(results) == 6
        for _slot, data, sig in results:
            cert.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr]

        evidence = control(stack, "simulator.evidence", token="codesign")
        # The whole record since the server started: the first lease may have begun before the
        # signing loops (the certificate read), and it too must have started with a reset.
        runs = runs_by_epoch(evidence["events"])
        epochs = [epoch for epoch, _ in runs]
        assert len(set(epochs)) >= 2, f"both machines must have held the token: {epochs}"
        assert len(epochs) == len(set(epochs)), f"an epoch's APDUs were interleaved with another's: {epochs}"
        assert all(resets >= 1 for _, resets in runs), f"a lease began without a cold reset: {runs}"
        assert evidence["counters"]["signatures"] - before["counters"]["signatures"] == 6
    finally:
        stack.stop()


def test_unplugged_token_leaves_the_reader_within_2_s_and_comes_back_on_replug(
    tmp_path: Path, vpcd_slot: VpcdSlot
) -> None:
    stack = BridgeStack(tmp_path / "stack")
    try:
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        stack.start_server()
        client = stack.start_client("build-vm-01", [vpcd_slot.index])
        stack.wait_card(vpcd_slot.index, client)

        unplugged_at = time.monotonic()
        control(stack, "simulator.unplug", token="codesign")
        stack.wait_card(vpcd_slot.index, client, present=False, timeout=10)
        assert time.monotonic() - unplugged_at <= 2.0

        control(stack, "simulator.replug", token="codesign")
        stack.wait_card(vpcd_slot.index, client, present=True, timeout=10)
        cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert.pem")
        assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    finally:
        stack.stop()
