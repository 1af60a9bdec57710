"""Persistent state of the simulated PIV card: keys, certificates, data objects, PIN/PUK counters.

Everything here survives a power cycle (and, with a `state_path`, a process restart); the
volatile security status lives in `piv.PivCard`. Key generation is the slow part (RSA-2048 takes
~0.1 s), so a card without a state file reuses keys generated once per process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge_server.simulator.tlv import tlv

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

STATE_VERSION: Final = 1

# SP 800-78-4 Table 6-2 algorithm identifiers (the ones OpenSC 0.23 registers and we support).
ALG_RSA_2048: Final = 0x07
ALG_ECC_P256: Final = 0x11

# SP 800-73-4 Part 1 Table 3: key reference -> certificate object tag.
KEY_OBJECTS: Final[dict[int, bytes]] = {
    0x9A: bytes.fromhex("5FC105"),  # PIV Authentication
    0x9C: bytes.fromhex("5FC10A"),  # Digital Signature
    0x9D: bytes.fromhex("5FC10B"),  # Key Management
    0x9E: bytes.fromhex("5FC101"),  # Card Authentication
}
# RSA where signing tools expect it most (9A, 9C); P-256 in 9D and 9E so both algorithms are covered.
DEFAULT_ALGORITHMS: Final[dict[int, int]] = {
    0x9A: ALG_RSA_2048,
    0x9C: ALG_RSA_2048,
    0x9D: ALG_ECC_P256,
    0x9E: ALG_ECC_P256,
}

TAG_CHUID: Final = bytes.fromhex("5FC102")
TAG_CCC: Final = bytes.fromhex("5FC107")
TAG_KEY_HISTORY: Final = bytes.fromhex("5FC10C")
TAG_DISCOVERY: Final = b"\x7e"
PIV_AID: Final = bytes.fromhex("A000000308000010000100")
# SP 800-73-4 Part 1 §3.1.2: FASC-N with agency code 9999 (a test credential).
TEST_FASCN: Final = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")

_KEY_CACHE: dict[tuple[int, int], PrivateKey] = {}


def generate_key(alg: int) -> PrivateKey:
    if alg == ALG_RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == ALG_ECC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unsupported piv algorithm 0x{alg:02x}")


def key_algorithm(key: PrivateKey) -> int:
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048:
        return ALG_RSA_2048
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return ALG_ECC_P256
    raise ValueError("key is neither rsa-2048 nor ecc p-256")


def _cached_key(slot: int, alg: int) -> PrivateKey:
    if (slot, alg) not in _KEY_CACHE:
        _KEY_CACHE[slot, alg] = generate_key(alg)
    return _KEY_CACHE[slot, alg]


def self_signed_certificate(slot: int, key: PrivateKey) -> bytes:
    """DER self-signed certificate; codeSigning EKU so osslsigncode accepts it as the signer."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tokenbridge simulated token {slot:02X}")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Fixed validity: no clock read, and valid for any CI run of the next decades.
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2049, 12, 31, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, slot == 0x9D, False, slot == 0x9D, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def cert_object(der: bytes) -> bytes:
    # SP 800-73-4 Part 1 Appendix A: 70 cert, 71 CertInfo (00 = uncompressed), FE LRC (empty).
    return tlv(b"\x53", tlv(b"\x70", der) + tlv(b"\x71", b"\x00") + tlv(b"\xfe", b""))


def chuid_object(guid: bytes) -> bytes:
    body = tlv(b"\x30", TEST_FASCN) + tlv(b"\x34", guid) + tlv(b"\x35", b"20491231")
    return tlv(b"\x53", body + tlv(b"\x3e", b"") + tlv(b"\xfe", b""))


def ccc_object(card_id: bytes) -> bytes:
    body = tlv(b"\xf0", card_id) + bytes.fromhex("F10121F20121F300F400F50110F600F700FA00FB00FC00FD00FE00")
    return tlv(b"\x53", body)


def default_objects(guid: bytes) -> dict[bytes, bytes]:
    return {
        TAG_CHUID: chuid_object(guid),
        TAG_CCC: ccc_object(bytes.fromhex("A000000116FF") + guid[:15]),
        TAG_KEY_HISTORY: tlv(b"\x53", bytes.fromhex("C10100C20100FE00")),
        # SP 800-73-4 Part 1 §3.3.2: PIV AID, PIN usage policy 40 00 (application PIN only).
        TAG_DISCOVERY: tlv(b"\x7e", tlv(b"\x4f", PIV_AID) + tlv(b"\x5f\x2f", b"\x40\x00")),
    }


@dataclass
class PivState:
    pin: bytes  # ASCII digits, unpadded
    puk: bytes
    pin_max: int
    puk_max: int
    pin_left: int
    puk_left: int
    keys: dict[int, PrivateKey] = field(default_factory=dict)
    objects: dict[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def fresh(cls, *, pin: str, puk: str, pin_retries: int, puk_retries: int, use_cache: bool) -> PivState:
        state = cls(pin.encode(), puk.encode(), pin_retries, puk_retries, pin_retries, puk_retries)
        state.objects = default_objects(secrets.token_bytes(16))
        for slot, alg in DEFAULT_ALGORITHMS.items():
            key = _cached_key(slot, alg) if use_cache else generate_key(alg)
            state.keys[slot] = key
            state.objects[KEY_OBJECTS[slot]] = cert_object(self_signed_certificate(slot, key))
        return state

    def to_json(self) -> str:
        # The simulator's state file holds the PIN in clear: it is test fixture data, not a secret.
        doc = {
            "version": STATE_VERSION,
            "pin": self.pin.decode(),
            "puk": self.puk.decode(),
            "pin_max": self.pin_max,
            "puk_max": self.puk_max,
            "pin_left": self.pin_left,
            "puk_left": self.puk_left,
            "keys": {f"{slot:02X}": _pem(key) for slot, key in self.keys.items()},
            "objects": {tag.hex().upper(): value.hex().upper() for tag, value in self.objects.items()},
        }
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PivState:
        doc = json.loads(text)
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported piv state version {doc.get('version')!r}")
        state = cls(
            doc["pin"].encode(), doc["puk"].encode(), int(doc["pin_max"]), int(doc["puk_max"]),
            int(doc["pin_left"]), int(doc["puk_left"]),
        )  # fmt: skip
        for slot, pem in doc["keys"].items():
            key = serialization.load_pem_private_key(pem.encode(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError(f"piv state key {slot} has an unsupported type")
            state.keys[int(slot, 16)] = key
        state.objects = {bytes.fromhex(t): bytes.fromhex(v) for t, v in doc["objects"].items()}
        return state

    def save(self, path: Path) -> None:
        """Atomic replace, so a crash never leaves a half-written state file."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def _pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
