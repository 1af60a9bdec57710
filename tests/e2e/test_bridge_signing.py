"""The user's workflow end to end, with the real parts (issue: client and workflow).

osslsigncode / pkcs11-tool -> OpenSC -> pcscd -> vpcd -> tokenbridge-client (process) -> TLS 1.3
on loopback -> tokenbridge-server (process) -> pyusb -> simulated token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from e2e_stack import VpcdSlot

from bridge_admin.local_stack import BridgeStack
from bridge_admin.signing_tools import (
    minimal_pe,
    osslsigncode_sign,
    osslsigncode_verify,
    pkcs11,
    pkcs11_sign,
    read_certificate_pem,
)

pytestmark = pytest.mark.e2e

PIN = "123456"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[BridgeStack]:
    s = BridgeStack(tmp_path / "stack")
    try:
        yield s
    finally:
        s.stop()


def start_bridge(stack: BridgeStack, slot: VpcdSlot, profile: str, client: str = "build-vm-01") -> None:
    stack.profiles = [profile]
    stack.make_pki([client])
    stack.write_server_config(allow=[client])
    stack.start_server()
    daemon = stack.start_client(client, [slot.index])
    stack.wait_card(slot.index, daemon)


def verify_signature(cert_pem: Path, data: bytes, signature: bytes) -> None:
    key = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        # pkcs11-tool -m ECDSA signs the given bytes as the digest and writes r||s
        half = len(signature) // 2
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

        der = encode_dss_signature(
            int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
        )
        key.verify(der, hashlib.sha256(data).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))


@pytest.mark.parametrize("profile", ["safenet-5110", "yubikey5"])
def test_pkcs11_tool_lists_and_signs_through_the_bridge(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path, profile: str
) -> None:
    start_bridge(stack, vpcd_slot, profile)
    listing = pkcs11("-L", slot=vpcd_slot.index).stdout
    assert "token initialized" in listing or "token label" in listing, listing

    data = tmp_path / "data.bin"
    data.write_bytes(b"release artefact digest input " * 10)
    cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert01.pem")
    sig = tmp_path / "sig.bin"
    pkcs11_sign(vpcd_slot.index, data, sig)
    verify_signature(cert, data.read_bytes(), sig.read_bytes())

    # A tampered input must not verify: proves the check above can fail.
    with pytest.raises(InvalidSignature):
        verify_signature(cert, data.read_bytes() + b"x", sig.read_bytes())


@pytest.mark.parametrize("profile", ["safenet-5110", "yubikey5"])
def test_osslsigncode_signs_and_verifies_a_program_through_the_bridge(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path, profile: str
) -> None:
    start_bridge(stack, vpcd_slot, profile)
    cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert.pem")
    program = tmp_path / "build.exe"
    program.write_bytes(minimal_pe(b"\xc3 release build"))
    signed = tmp_path / "build-signed.exe"
    osslsigncode_sign(vpcd_slot.index, cert, program, signed)
    out = osslsigncode_verify(cert, signed).stdout
    assert "Signature verification: ok" in out

    # The signature covers the content: a modified copy fails verification.
    tampered = tmp_path / "tampered.exe"
    tampered.write_bytes(signed.read_bytes().replace(b"release build", b"evil builds!!"))
    from bridge_admin.local_stack import DemoError

    with pytest.raises(DemoError):
        osslsigncode_verify(cert, tampered)


def test_client_reconnects_after_server_restart_and_signs_again(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    start_bridge(stack, vpcd_slot, "safenet-5110")
    cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert.pem")
    assert stack.server is not None
    assert stack.server.stop() == 0
    client = stack.daemons[-1]
    stack.wait_card(vpcd_slot.index, client, present=False, timeout=10)

    stack.start_server()
    stack.wait_card(vpcd_slot.index, client, present=True, timeout=20)
    program = tmp_path / "again.exe"
    program.write_bytes(minimal_pe(b"\xc3 after restart"))
    signed = tmp_path / "again-signed.exe"
    osslsigncode_sign(vpcd_slot.index, cert, program, signed)
    assert "Signature verification: ok" in osslsigncode_verify(cert, signed).stdout
