"""The card side of `tokenbridge selftest`: a SELECT/GET DATA round, and (only with a PIN) a
login and a signature checked against the certificate on the card.

Everything here talks PIV (NIST SP 800-73-4), the application the simulator and most tokens
used with OpenSC's PIV driver carry. A token without one answers SELECT with 6A82; the round
then asks for the card production life cycle data (GET DATA 9F7F) instead, and the login and
signature steps say they need a PIV application rather than guessing at a vendor applet.

PIN handling: the PIN arrives as a bytearray, goes into exactly one VERIFY, and is wiped
after. Before it, a VERIFY without data asks how many tries are left (no PIN is presented);
with one try or fewer left the selftest refuses to log in, so it can never block a token.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from protocol.apdu import describe_sw, retries_left

Transmit = Callable[[bytes], Awaitable[bytes]]

PIV_AID: Final = bytes.fromhex("A000000308000010000100")
SELECT_PIV: Final = bytes([0x00, 0xA4, 0x04, 0x00, len(PIV_AID)]) + PIV_AID + b"\x00"
GET_CHUID: Final = bytes.fromhex("00CB3FFF055C035FC10200")
GET_CPLC: Final = bytes.fromhex("80CA9F7F00")
VERIFY_STATUS: Final = bytes.fromhex("00200080")  # case 1, no data: asks for the tries left
PIN_REF: Final = 0x80
MAX_PIN_LEN: Final = 8  # SP 800-73-4 Part 2 §3.2.1: PIN padded with FF to 8 bytes
MIN_TRIES_FOR_LOGIN: Final = 2
MAX_GET_RESPONSE: Final = 64  # 64 * 256 bytes: larger than any PIV certificate object
# SP 800-73-4 Part 1 Table 3: key reference -> certificate object.
CERT_OBJECTS: Final[dict[int, bytes]] = {
    0x9A: bytes.fromhex("5FC105"),
    0x9C: bytes.fromhex("5FC10A"),
    0x9D: bytes.fromhex("5FC10B"),
    0x9E: bytes.fromhex("5FC101"),
}
_SHA256_DIGEST_INFO: Final = bytes.fromhex("3031300d060960864801650304020105000420")


class CardStepError(Exception):
    """A card step failed; the message says what the card answered and what it means."""


@dataclass
class Exchange:
    name: str
    header: str  # CLA INS P1 P2 only: never the data
    sw: str
    response_length: int
    ms: float


async def transmit_all(transmit: Transmit, apdu: bytes) -> bytes:
    """Send `apdu`, then GET RESPONSE while the card says 61xx (bounded)."""
    rapdu = await transmit(apdu)
    body = bytearray()
    for _ in range(MAX_GET_RESPONSE):
        if len(rapdu) < 2 or rapdu[-2] != 0x61:
            return bytes(body + rapdu)
        body += rapdu[:-2]
        rapdu = await transmit(bytes([apdu[0] & 0x0F, 0xC0, 0x00, 0x00, rapdu[-1]]))
    raise CardStepError(f"card kept answering 61xx after {MAX_GET_RESPONSE} GET RESPONSE rounds")


def sw_of(rapdu: bytes) -> int:
    if len(rapdu) < 2:
        raise CardStepError(f"card answered {len(rapdu)} bytes, fewer than a status word")
    return rapdu[-2] << 8 | rapdu[-1]


def ber_tlv(data: bytes) -> dict[int, bytes]:
    """Top-level BER-TLV objects of `data` by tag (first one wins); raises on a truncated one."""
    try:
        return _ber_tlv(data)
    except IndexError:
        raise CardStepError(f"truncated BER-TLV in the card's answer ({len(data)} bytes)") from None


def _ber_tlv(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        tag = data[pos]
        pos += 1
        if tag & 0x1F == 0x1F:  # multi-byte tag
            while pos < len(data) and data[pos] & 0x80:
                tag, pos = tag << 8 | data[pos], pos + 1
            tag, pos = tag << 8 | data[pos], pos + 1
        first = data[pos]
        pos += 1
        length = first
        if first & 0x80:
            count = first & 0x7F
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise CardStepError(f"truncated BER-TLV object {tag:X} ({length} bytes announced)")
        out.setdefault(tag, data[pos : pos + length])
        pos += length
    return out


def tlv(tag: bytes, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return tag + length + value


def chained(cla: int, ins: int, p1: int, p2: int, data: bytes) -> list[bytes]:
    """ISO 7816-4 §5.1.1 command chaining in short APDUs (what OpenSC's PIV driver sends)."""
    pieces = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        head = bytes([cla | (0 if last else 0x10), ins, p1, p2, len(piece)])
        out.append(head + piece + (b"\x00" if last else b""))
    return out


async def select_round(transmit: Transmit) -> dict[str, Any]:
    """SELECT the PIV application and read the CHUID; CPLC instead when there is no PIV."""
    select = await transmit_all(transmit, SELECT_PIV)
    result: dict[str, Any] = {"select_piv": describe_sw(sw_of(select)), "piv": sw_of(select) == 0x9000}
    if result["piv"]:
        fci = ber_tlv(select[:-2]).get(0x61, b"")
        label = ber_tlv(fci).get(0x50, b"") if fci else b""
        result["application_label"] = label.decode("ascii", "replace")
        chuid = await transmit_all(transmit, GET_CHUID)
        result["get_data"] = {"object": "CHUID 5FC102", "sw": describe_sw(sw_of(chuid))}
        result["get_data"]["length"] = len(chuid) - 2
    else:
        cplc = await transmit_all(transmit, GET_CPLC)
        result["get_data"] = {"object": "CPLC 9F7F", "sw": describe_sw(sw_of(cplc))}
        result["get_data"]["length"] = len(cplc) - 2
    return result


async def pin_tries_left(transmit: Transmit) -> int | None:
    """VERIFY without data: the tries left (None when already verified or not reported)."""
    status = sw_of(await transmit(VERIFY_STATUS))
    if status == 0x6983:
        return 0
    return retries_left(status)


async def login(transmit: Transmit, pin: bytearray) -> dict[str, Any]:
    """One VERIFY with `pin`, only when at least MIN_TRIES_FOR_LOGIN tries are left."""
    if not 1 <= len(pin) <= MAX_PIN_LEN:
        raise CardStepError(f"the PIN must be 1 to {MAX_PIN_LEN} bytes long (PIV), got {len(pin)}")
    left = await pin_tries_left(transmit)
    if left is not None and left < MIN_TRIES_FOR_LOGIN:
        raise CardStepError(
            f"the card has {left} PIN tries left: the selftest does not log in below "
            f"{MIN_TRIES_FOR_LOGIN}, so it cannot block the token; unblock it with the PUK first"
        )
    padded = bytearray(pin) + b"\xff" * (MAX_PIN_LEN - len(pin))
    apdu = bytearray(bytes([0x00, 0x20, 0x00, PIN_REF, MAX_PIN_LEN])) + padded
    try:
        status = sw_of(await transmit(bytes(apdu)))
    finally:
        padded[:] = b"\x00" * len(padded)
        apdu[:] = b"\x00" * len(apdu)
    if status != 0x9000:
        raise CardStepError(f"VERIFY answered {describe_sw(status)}: the PIN was not accepted")
    return {"tries_left_before": left, "verify": describe_sw(status)}


async def read_certificate(transmit: Transmit, key_ref: int) -> x509.Certificate:
    tag = CERT_OBJECTS[key_ref]
    rapdu = await transmit_all(transmit, bytes.fromhex("00CB3FFF055C03") + tag + b"\x00")
    if sw_of(rapdu) != 0x9000:
        raise CardStepError(f"reading the certificate of key {key_ref:02X}: {describe_sw(sw_of(rapdu))}")
    body = ber_tlv(ber_tlv(rapdu[:-2]).get(0x53, b""))
    der, info = body.get(0x70), body.get(0x71, b"\x00")
    if not der:
        raise CardStepError(f"the certificate object of key {key_ref:02X} holds no certificate (tag 70)")
    if info[:1] == b"\x01":  # SP 800-73-4 Part 1 Appendix A: CertInfo 01 = gzip-compressed
        der = gzip.decompress(der)
    return x509.load_der_x509_certificate(der)


def _algorithm(public_key: Any) -> tuple[int, str]:
    """SP 800-78-4 Table 6-2 identifier for the certificate's key."""
    if isinstance(public_key, rsa.RSAPublicKey):
        ids = {1024: 0x06, 2048: 0x07, 3072: 0x05, 4096: 0x16}
        if public_key.key_size in ids:
            return ids[public_key.key_size], f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1":
        return 0x11, "ECC P-256"
    raise CardStepError(f"the certificate's key ({type(public_key).__name__}) is not one the selftest signs")


async def sign_and_verify(transmit: Transmit, key_ref: int) -> dict[str, Any]:
    """GENERAL AUTHENTICATE over a fresh SHA-256 digest; the signature checked with the certificate."""
    cert = await read_certificate(transmit, key_ref)
    public_key = cert.public_key()
    alg, alg_name = _algorithm(public_key)
    message = b"tokenbridge selftest " + os.urandom(16)
    digest = hashlib.sha256(message).digest()
    if isinstance(public_key, rsa.RSAPublicKey):
        info = _SHA256_DIGEST_INFO + digest
        size = public_key.key_size // 8
        challenge = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
    else:
        challenge = digest
    template = tlv(b"\x7c", tlv(b"\x82", b"") + tlv(b"\x81", challenge))
    rapdu = b""
    for apdu in chained(0x00, 0x87, alg, key_ref, template):
        rapdu = await transmit_all(transmit, apdu)
        if sw_of(rapdu) != 0x9000:
            raise CardStepError(f"GENERAL AUTHENTICATE with key {key_ref:02X}: {describe_sw(sw_of(rapdu))}")
    signature = ber_tlv(ber_tlv(rapdu[:-2]).get(0x7C, b"")).get(0x82, b"")
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CardStepError(
            f"the signature of key {key_ref:02X} does not verify against its certificate "
            f"({cert.subject.rfc4514_string()}): wrong key in the slot, or a card fault"
        ) from None
    return {
        "key": f"{key_ref:02X}",
        "algorithm": alg_name,
        "certificate_subject": cert.subject.rfc4514_string(),
        "certificate_sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "signature_bytes": len(signature),
        "verified": True,
    }
