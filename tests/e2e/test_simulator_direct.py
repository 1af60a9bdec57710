"""The simulated PIV token straight in a vpcd slot, driven by the real OpenSC, openssl and osslsigncode.

This is the baseline: if these pass, OpenSC 0.23 accepts the simulator as a PIV card, and
the bridge tests can use the same incantations through tokenbridge.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from e2e_stack import (
    OPENSC_PKCS11,
    SimulatorProcess,
    VpcdSlot,
    run,
    simulator_direct,
)

from bridge_admin.signing_tools import (
    certificate_table,
    minimal_pe,
    osslsigncode_sign_command,
    osslsigncode_verify_command,
)

pytestmark = pytest.mark.e2e

PIN = "123456"
MESSAGE = b"tokenbridge e2e: sign me\n"


def pkcs11_tool(sim: SimulatorProcess, *args: str) -> str:
    cmd = ["pkcs11-tool", "--module", OPENSC_PKCS11, "--slot-description", sim.slot.reader, *args]
    return run(cmd).stdout


def token_serial(sim: SimulatorProcess) -> str:
    """The token serial of our reader's slot in `pkcs11-tool -L` (unique per simulated card)."""
    out = run(["pkcs11-tool", "--module", OPENSC_PKCS11, "-L"]).stdout
    section = out.split(sim.slot.reader, 1)[1].split("Slot ", 1)[0]
    m = re.search(r"serial num\s*:\s*(\S+)", section)
    assert m, out
    return m.group(1)


def read_cert(sim: SimulatorProcess, key_id: str, tmp_path: Path) -> x509.Certificate:
    der = tmp_path / f"cert-{key_id}.der"
    pkcs11_tool(sim, "--read-object", "--type", "cert", "--id", key_id, "-o", str(der))
    return x509.load_der_x509_certificate(der.read_bytes())


def test_pkcs11_tool_lists_the_token(direct_card: SimulatorProcess) -> None:
    out = run(["pkcs11-tool", "--module", OPENSC_PKCS11, "-L"]).stdout
    section = out.split(direct_card.slot.reader, 1)[1].split("Slot ", 1)[0]
    assert "token label        : tokenbridge simulated token 9A" in section
    assert "token manufacturer : piv_II" in section


@pytest.mark.parametrize("key_id", ["01", "02"])
def test_rsa_sign_verifies_against_card_certificate(
    direct_card: SimulatorProcess, tmp_path: Path, key_id: str
) -> None:
    msg, sig = tmp_path / "msg.bin", tmp_path / "sig.bin"
    msg.write_bytes(MESSAGE)
    before = direct_card.stats()
    pkcs11_tool(
        direct_card, "--login", "--pin", PIN, "--sign", "-m", "SHA256-RSA-PKCS",
        "--id", key_id, "-i", str(msg), "-o", str(sig),
    )  # fmt: skip
    after = direct_card.stats()
    print(f"pkcs11-tool --login --sign (RSA, id {key_id}): {after['apdus'] - before['apdus']} APDUs")
    assert after["signatures"] - before["signatures"] == 1
    pub = read_cert(direct_card, key_id, tmp_path).public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(sig.read_bytes(), MESSAGE, padding.PKCS1v15(), hashes.SHA256())


def test_ecdsa_p256_sign_verifies_against_card_certificate(
    direct_card: SimulatorProcess, tmp_path: Path
) -> None:
    digest = hashlib.sha256(MESSAGE).digest()
    msg, sig = tmp_path / "digest.bin", tmp_path / "sig.der"
    msg.write_bytes(digest)
    pkcs11_tool(
        direct_card, "--login", "--pin", PIN, "--sign", "-m", "ECDSA", "--id", "03",
        "--signature-format", "openssl", "-i", str(msg), "-o", str(sig),
    )  # fmt: skip
    pub = read_cert(direct_card, "03", tmp_path).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig.read_bytes(), digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_wrong_pin_is_refused_and_counted(direct_card: SimulatorProcess, tmp_path: Path) -> None:
    msg = tmp_path / "msg.bin"
    msg.write_bytes(MESSAGE)
    cmd = ["pkcs11-tool", "--module", OPENSC_PKCS11, "--slot-description", direct_card.slot.reader]
    cmd += ["--login", "--pin", "999999", "--sign", "-m", "SHA256-RSA-PKCS", "--id", "01", "-i", str(msg)]
    proc = run(cmd, check=False)
    assert proc.returncode != 0
    assert "CKR_PIN_INCORRECT" in proc.stdout + proc.stderr
    stats = direct_card.stats()
    assert stats["pin_attempts"] == 1
    assert stats["signatures"] == 0


def test_osslsigncode_signs_a_program(direct_card: SimulatorProcess, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_bytes(read_cert(direct_card, "01", tmp_path).public_bytes(Encoding.PEM))
    program, signed = tmp_path / "program.exe", tmp_path / "signed.exe"
    program.write_bytes(minimal_pe(b"\xc3 hello from tokenbridge"))
    # The token serial (from the CHUID GUID) is unique per simulated card, unlike the label.
    key_uri = f"pkcs11:serial={token_serial(direct_card)};id=%01;type=private;pin-value={PIN}"
    before = direct_card.stats()
    run(osslsigncode_sign_command(key_uri, cert_pem, program, signed))
    after = direct_card.stats()
    print(f"osslsigncode sign: {after['apdus'] - before['apdus']} APDUs")
    assert after["signatures"] - before["signatures"] == 1
    assert certificate_table(signed.read_bytes())[1] > 0  # an Authenticode signature was embedded
    out = run(osslsigncode_verify_command(cert_pem, signed)).stdout
    assert "Signature verification: ok" in out
    # Tampering with the script must break the signature (so the check above can fail).
    tampered = tmp_path / "tampered.exe"
    tampered.write_bytes(signed.read_bytes().replace(b"hello", b"HELLO"))
    bad = run(osslsigncode_verify_command(cert_pem, tampered), check=False)
    assert bad.returncode != 0


def test_state_file_keeps_keys_and_pin_counter_across_restarts(vpcd_slot: VpcdSlot, tmp_path: Path) -> None:
    state = tmp_path / "piv-state.json"
    msg = tmp_path / "msg.bin"
    msg.write_bytes(MESSAGE)
    with simulator_direct(vpcd_slot, tmp_path, profile="yubikey5", state=state) as sim:
        first = read_cert(sim, "01", tmp_path)
        cmd = ["pkcs11-tool", "--module", OPENSC_PKCS11, "--slot-description", vpcd_slot.reader]
        cmd += ["--login", "--pin", "999999", "--sign", "-m", "SHA256-RSA-PKCS", "--id", "01", "-i", str(msg)]
        assert run(cmd, check=False).returncode != 0
    assert json.loads(state.read_text())["pin_left"] == 2
    with simulator_direct(vpcd_slot, tmp_path, profile="yubikey5", state=state) as sim:
        assert read_cert(sim, "01", tmp_path) == first
        # A correct PIN after the restart works and restores the persisted counter.
        cmd = ["pkcs11-tool", "--module", OPENSC_PKCS11, "--slot-description", vpcd_slot.reader]
        run(
            [
                *cmd,
                "--login",
                "--pin",
                PIN,
                "--sign",
                "-m",
                "SHA256-RSA-PKCS",
                "--id",
                "01",
                "-i",
                str(msg),
                "-o",
                str(tmp_path / "sig"),
            ]
        )
        assert sim.stats()["signatures"] == 1
    assert json.loads(state.read_text())["pin_left"] == 3
