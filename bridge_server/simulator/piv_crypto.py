"""Private-key operations of the simulated PIV card (SP 800-73-4 Part 2 §3.2.4 GENERAL AUTHENTICATE).

OpenSC pads RSA input itself and sends the whole modulus-sized block, so RSA is the raw
private-key operation m^d mod n. For ECDSA OpenSC sends the digest truncated to the field size
and expects a DER `SEQUENCE{r, s}` back.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from bridge_server.simulator.piv_state import (
    ALG_ECC_P256,
    ALG_RSA_2048,
    PrivateKey,
    generate_key,
    key_algorithm,
)
from bridge_server.simulator.tlv import find, tlv
from protocol import apdu as sw

SUPPORTED_ALGORITHMS: Final = frozenset({ALG_RSA_2048, ALG_ECC_P256})
P256_FIELD_BYTES: Final = 32

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "algorithm_of",
    "generate_key",
    "private_key_operation",
    "public_key_template",
]


def algorithm_of(key: PrivateKey) -> int:
    return key_algorithm(key)


def private_key_operation(key: PrivateKey, template: bytes) -> tuple[bytes, int]:
    """Run the operation a 7C dynamic authentication template asks for: 81 = sign/decrypt, 85 = ECDH."""
    if find(template, b"\x82") != b"":  # the template must request a response (82 00)
        return b"", sw.SW_WRONG_DATA
    challenge = find(template, b"\x81")
    exponentiation = find(template, b"\x85")
    if isinstance(key, rsa.RSAPrivateKey) and challenge is not None:
        return _rsa_raw(key, challenge)
    if isinstance(key, ec.EllipticCurvePrivateKey) and challenge is not None:
        return _ecdsa(key, challenge), sw.SW_OK
    if isinstance(key, ec.EllipticCurvePrivateKey) and exponentiation is not None:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, exponentiation)
        return key.exchange(ec.ECDH(), peer), sw.SW_OK
    return b"", sw.SW_WRONG_DATA


def _rsa_raw(key: rsa.RSAPrivateKey, block: bytes) -> tuple[bytes, int]:
    size = key.key_size // 8
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    m = int.from_bytes(block, "big")
    if len(block) != size or m >= n:
        return b"", sw.SW_WRONG_DATA
    return pow(m, numbers.d, n).to_bytes(size, "big"), sw.SW_OK


def _ecdsa(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    # Same integer as OpenSC's truncation: keep the leftmost field-size bytes, left-pad short input.
    digest = digest[:P256_FIELD_BYTES].rjust(P256_FIELD_BYTES, b"\x00")
    return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def public_key_template(key: PrivateKey) -> bytes:
    """SP 800-73-4 Part 2 §3.3.2: 7F49 {81 modulus, 82 exponent} or 7F49 {86 point}."""
    if isinstance(key, rsa.RSAPrivateKey):
        pub = key.public_key().public_numbers()
        modulus = pub.n.to_bytes(key.key_size // 8, "big")
        exponent = pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")
        return tlv(b"\x7f\x49", tlv(b"\x81", modulus) + tlv(b"\x82", exponent))
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return tlv(b"\x7f\x49", tlv(b"\x86", point))
