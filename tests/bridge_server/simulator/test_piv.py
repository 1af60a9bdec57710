from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.tlv import find

SELECT_PIV = bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00")
CERT_TAGS = {0x9A: "5FC105", 0x9C: "5FC10A", 0x9D: "5FC10B", 0x9E: "5FC101"}


def verify_apdu(pin: bytes) -> bytes:
    return bytes.fromhex("00 20 00 80 08") + pin.ljust(8, b"\xff")


EMPTY_VERIFY = bytes.fromhex("00 20 00 80")


def sw(resp: bytes) -> int:
    return int.from_bytes(resp[-2:], "big")


def get_data(card: PivCard, tag_hex: str) -> bytes:
    """Read a whole object the way OpenSC does: Le 00, then GET RESPONSE while 61xx."""
    tag = bytes.fromhex(tag_hex)
    resp = card.execute(bytes((0x00, 0xCB, 0x3F, 0xFF, len(tag) + 2, 0x5C, len(tag))) + tag + b"\x00")
    return collect(card, resp)


def collect(card: PivCard, resp: bytes) -> bytes:
    data = resp[:-2]
    while resp[-2] == 0x61:
        resp = card.execute(bytes((0x00, 0xC0, 0x00, 0x00, resp[-1])))
        data += resp[:-2]
    assert sw(resp) == 0x9000, hex(sw(resp))
    return data


def read_cert(card: PivCard, slot: int) -> x509.Certificate:
    obj = get_data(card, CERT_TAGS[slot])
    inner = find(obj, b"\x53")
    assert inner is not None
    der = find(inner, b"\x70")
    assert der is not None
    assert find(inner, b"\x71") == b"\x00"
    return x509.load_der_x509_certificate(der)


def general_authenticate(card: PivCard, alg: int, slot: int, payload: bytes) -> bytes:
    """GENERAL AUTHENTICATE as OpenSC sends it: 7C{82 00, 81 input}, chained in 255-byte chunks."""
    inner = b"\x82\x00\x81" + _ber_len(len(payload)) + payload
    data = b"\x7c" + _ber_len(len(inner)) + inner
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)]
    for chunk in chunks[:-1]:
        assert sw(card.execute(bytes((0x10, 0x87, alg, slot, len(chunk))) + chunk)) == 0x9000
    last = chunks[-1]
    resp = card.execute(bytes((0x00, 0x87, alg, slot, len(last))) + last + b"\x00")
    template = find(collect(card, resp), b"\x7c")
    assert template is not None
    result = find(template, b"\x82")
    assert result is not None
    return result


def _ber_len(n: int) -> bytes:
    return bytes((n,)) if n < 0x80 else bytes((0x81, n)) if n < 0x100 else b"\x82" + n.to_bytes(2, "big")


@pytest.fixture
def card() -> PivCard:
    c = PivCard()
    c.power_on()
    return c


def test_select_with_truncated_aid_returns_application_template(card: PivCard) -> None:
    resp = card.execute(SELECT_PIV)
    assert sw(resp) == 0x9000
    template = find(resp[:-2], b"\x61")
    assert template is not None
    assert find(template, b"\x4f") == bytes.fromhex("00 00 10 00 01 00")


@pytest.mark.parametrize(
    "aid_hex",
    ["62 76 01 FF 00 00 00", "A0 00 00 00 01 01", "E8 2B 06 01 04 01 81 C3 1F 02 01", "A0 00 00 03 09"],
)
def test_select_of_other_applications_is_file_not_found(card: PivCard, aid_hex: str) -> None:
    aid = bytes.fromhex(aid_hex)
    assert sw(card.execute(bytes((0x00, 0xA4, 0x04, 0x00, len(aid))) + aid + b"\x00")) == 0x6A82


def test_unknown_instruction_is_6d00(card: PivCard) -> None:
    assert card.execute(bytes.fromhex("00 FD 00 00 03")) == b"\x6d\x00"


def test_discovery_object_carries_piv_aid(card: PivCard) -> None:
    expected = bytes.fromhex("7E 12 4F 0B A0 00 00 03 08 00 00 10 00 01 00 5F 2F 02 40 00")
    assert get_data(card, "7E") == expected


def test_chuid_has_guid_and_missing_object_is_6a82(card: PivCard) -> None:
    chuid = find(get_data(card, "5FC102"), b"\x53")
    assert chuid is not None
    guid = find(chuid, b"\x34")
    assert guid is not None
    assert len(guid) == 16
    assert sw(card.execute(bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 09 00"))) == 0x6A82


def test_length_probe_gets_le_bytes_then_pending_data_is_dropped(card: PivCard) -> None:
    resp = card.execute(bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 05 08"))
    assert len(resp) == 10
    assert resp[0] == 0x53
    assert resp[-2] == 0x61
    # OpenSC does not fetch the rest after an 8-byte probe; the next command drops it.
    assert sw(card.execute(EMPTY_VERIFY)) == 0x63C3
    assert card.execute(bytes.fromhex("00 C0 00 00 00")) == b"\x69\x85"


def test_responses_never_exceed_le_and_get_response_honours_le(card: PivCard) -> None:
    resp = card.execute(bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 05 00"))
    assert len(resp) == 256 + 2
    assert resp[-2] == 0x61
    small = card.execute(bytes.fromhex("00 C0 00 00 10"))
    assert len(small) == 16 + 2
    assert small[-2] == 0x61
    rest = collect(card, small)
    whole = resp[:-2] + rest
    assert whole == get_data(card, "5FC105")
    total_len = int.from_bytes(whole[2:4], "big") + 4  # 53 82 LL LL
    assert len(whole) == total_len


def test_wrong_pins_decrement_then_block_and_puk_unblocks(card: PivCard) -> None:
    assert sw(card.execute(EMPTY_VERIFY)) == 0x63C3
    assert sw(card.execute(verify_apdu(b"000000"))) == 0x63C2
    assert sw(card.execute(verify_apdu(b"000000"))) == 0x63C1
    assert card.pin_retries_left == 1
    assert sw(card.execute(verify_apdu(b"000000"))) == 0x63C0
    assert sw(card.execute(verify_apdu(b"123456"))) == 0x6983
    assert sw(card.execute(EMPTY_VERIFY)) == 0x6983
    assert card.counters.pin_attempts == 4
    # RESET RETRY COUNTER with a wrong PUK costs a PUK try.
    bad = bytes.fromhex("00 2C 00 80 10") + b"87654321" + b"654321\xff\xff"
    assert sw(card.execute(bad)) == 0x63C2
    good = bytes.fromhex("00 2C 00 80 10") + b"12345678" + b"654321\xff\xff"
    assert sw(card.execute(good)) == 0x9000
    assert card.pin_retries_left == 3
    assert card.puk_retries_left == 3
    assert sw(card.execute(verify_apdu(b"123456"))) == 0x63C2
    assert sw(card.execute(verify_apdu(b"654321"))) == 0x9000


def test_correct_pin_restores_counter_and_empty_verify_reports_verified(card: PivCard) -> None:
    assert sw(card.execute(verify_apdu(b"999999"))) == 0x63C2
    assert sw(card.execute(verify_apdu(b"123456"))) == 0x9000
    assert card.pin_retries_left == 3
    assert sw(card.execute(EMPTY_VERIFY)) == 0x9000


def test_verify_p1_ff_resets_security_status(card: PivCard) -> None:
    card.execute(verify_apdu(b"123456"))
    assert sw(card.execute(bytes.fromhex("00 20 FF 80"))) == 0x9000
    assert sw(card.execute(EMPTY_VERIFY)) == 0x63C3


def test_security_status_is_volatile_but_retry_counter_is_not(card: PivCard) -> None:
    card.execute(verify_apdu(b"111111"))
    card.execute(verify_apdu(b"123456"))
    card.execute(verify_apdu(b"111111"))  # a failure after success also clears the status
    card.execute(verify_apdu(b"123456"))
    assert card.pin_verified
    card.execute(verify_apdu(b"111111"))
    card.power_off()
    card.power_on()
    assert not card.pin_verified
    assert sw(card.execute(EMPTY_VERIFY)) == 0x63C2
    assert card.counters.resets == 2


def test_signing_requires_pin(card: PivCard) -> None:
    block = bytes(255) + b"\x01"
    data = b"\x7c\x82\x01\x06\x82\x00\x81\x82\x01\x00" + block
    card.execute(bytes((0x10, 0x87, 0x07, 0x9A, 0xFF)) + data[:255])
    resp = card.execute(bytes((0x00, 0x87, 0x07, 0x9A, len(data) - 255)) + data[255:] + b"\x00")
    assert resp == b"\x69\x82"
    assert card.counters.signatures == 0


@pytest.mark.parametrize("slot", [0x9A, 0x9C])
def test_rsa_signature_verifies_against_certificate(card: PivCard, slot: int) -> None:
    cert = read_cert(card, slot)
    pub = cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    assert f"simulated token {slot:02X}" in cert.subject.rfc4514_string()
    message = b"tokenbridge signs this"
    # Build the PKCS#1 v1.5 block the way OpenSC does in software, then ask for raw RSA.
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + _sha256(message)
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info
    assert sw(card.execute(verify_apdu(b"123456"))) == 0x9000
    signature = general_authenticate(card, 0x07, slot, block)
    pub.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    assert card.counters.signatures == 1


def test_ecdsa_signature_verifies_against_certificate(card: PivCard) -> None:
    cert = read_cert(card, 0x9D)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    digest = _sha256(b"p-256 message")
    card.execute(verify_apdu(b"123456"))
    der_sig = general_authenticate(card, 0x11, 0x9D, digest)
    pub.verify(der_sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_card_authentication_key_needs_no_pin(card: PivCard) -> None:
    digest = _sha256(b"9e")
    sig = general_authenticate(card, 0x11, 0x9E, digest)
    pub = read_cert(card, 0x9E).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_wrong_algorithm_for_slot_is_rejected(card: PivCard) -> None:
    card.execute(verify_apdu(b"123456"))
    data = b"\x7c\x24\x82\x00\x81\x20" + bytes(32)
    assert card.execute(bytes((0x00, 0x87, 0x07, 0x9D, len(data))) + data + b"\x00") == b"\x6a\x86"


def test_chained_chunks_get_9000_and_other_command_abandons_chain(card: PivCard) -> None:
    assert card.execute(bytes.fromhex("10 DB 3F FF 03 5C 03 5F")) == b"\x90\x00"
    # A different command in between drops the partial chain.
    assert sw(card.execute(EMPTY_VERIFY)) == 0x63C3
    assert card.execute(bytes.fromhex("00 DB 3F FF 02 C1 09")) == b"\x69\x82"


def test_put_data_chained_then_get_data_returns_it(card: PivCard) -> None:
    card.execute(verify_apdu(b"123456"))
    body = bytes(range(256)) * 2
    data = b"\x5c\x03\x5f\xc1\x09\x53\x82\x02\x00" + body
    for i in range(0, len(data) - 255, 255):
        assert card.execute(bytes((0x10, 0xDB, 0x3F, 0xFF, 255)) + data[i : i + 255]) == b"\x90\x00"
    tail = data[(len(data) // 255) * 255 :]
    assert card.execute(bytes((0x00, 0xDB, 0x3F, 0xFF, len(tail))) + tail) == b"\x90\x00"
    assert get_data(card, "5FC109") == b"\x53\x82\x02\x00" + body


def test_generate_key_pair_returns_public_key_and_changes_signing_key(card: PivCard) -> None:
    card.execute(verify_apdu(b"123456"))
    resp = card.execute(bytes.fromhex("00 47 00 9D 05 AC 03 80 01 11 00"))
    template = find(collect(card, resp), b"\x7f\x49")
    assert template is not None
    point = find(template, b"\x86")
    assert point is not None
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    digest = _sha256(b"new key")
    pub.verify(general_authenticate(card, 0x11, 0x9D, digest), digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_generate_requires_authentication(card: PivCard) -> None:
    assert card.execute(bytes.fromhex("00 47 00 9A 05 AC 03 80 01 07 00")) == b"\x69\x82"


def test_change_reference_data_changes_pin(card: PivCard) -> None:
    apdu = bytes.fromhex("00 24 00 80 10") + b"123456\xff\xff" + b"24681357"
    assert card.execute(apdu) == b"\x90\x00"
    card.power_on()
    assert sw(card.execute(verify_apdu(b"123456"))) == 0x63C2
    assert sw(card.execute(verify_apdu(b"24681357"))) == 0x9000


def test_malformed_apdu_is_answered_not_raised(card: PivCard) -> None:
    assert card.execute(b"\x00\xa4") == b"\x67\x00"
    assert card.execute(bytes.fromhex("00 CB 3F FF 03 5C 05 5F 00")) == b"\x6a\x80"
    assert card.counters.apdus == 2


def test_state_persists_keys_and_counters(tmp_path: Path) -> None:
    path = tmp_path / "piv.json"
    first = PivCard(state_path=path)
    first.power_on()
    cert = read_cert(first, 0x9A)
    first.execute(verify_apdu(b"000000"))
    second = PivCard(state_path=path)
    second.power_on()
    assert second.pin_retries_left == 2
    assert read_cert(second, 0x9A) == cert
    assert sw(second.execute(verify_apdu(b"123456"))) == 0x9000
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + _sha256(b"m")
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info
    pub = cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(general_authenticate(second, 0x07, 0x9A, block), b"m", padding.PKCS1v15(), hashes.SHA256())


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def test_get_data_with_extended_le_answers_the_whole_object_as_a_yubikey_5_does(card: PivCard) -> None:
    # ISO 7816-4 §5.1: extended form, Lc 00 00 05, Le 00 00 (Ne 65536): up to 64 KiB in one answer.
    whole = get_data(card, "5FC105")
    assert len(whole) > 256
    resp = card.execute(bytes.fromhex("00 CB 3F FF 00 00 05 5C 03 5F C1 05 00 00"))
    assert sw(resp) == 0x9000, hex(sw(resp))
    assert resp[:-2] == whole


def test_extended_le_smaller_than_the_object_leaves_the_rest_behind_61xx(card: PivCard) -> None:
    whole = get_data(card, "5FC105")
    resp = card.execute(bytes.fromhex("00 CB 3F FF 00 00 05 5C 03 5F C1 05 01 00"))  # Ne 256
    assert resp[-2] == 0x61 and resp[:-2] == whole[:256]
    assert collect(card, resp) == whole
