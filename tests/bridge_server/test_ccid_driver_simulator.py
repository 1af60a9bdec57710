"""CCID driver end to end: pyusb → simulator backend → simulated token and PIV card.

These cross into pyusb worker threads, so they use the real clock with short deadlines.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from bridge_server.errors import CardError, DeviceGoneError
from bridge_server.simulator.backend import open_simulator
from bridge_server.usb.ccid_driver import CcidDriver
from bridge_server.usb.transport import AsyncUsbDevice, DeviceMatch
from protocol.ccid import NotifySlotChange

PROFILES = ("safenet-5110", "yubikey5", "etoken-fusion", "epass2003")
SELECT_PIV = bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00")
VERIFY_PIN = bytes.fromhex("00 20 00 80 08") + b"123456\xff\xff"
GET_CERT_9A = bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 05 00")
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@asynccontextmanager
async def open_driver(profile: str, **kw: float) -> AsyncIterator[tuple[CcidDriver, Any]]:
    backend, (token,) = open_simulator([profile])
    dev = await AsyncUsbDevice.open(DeviceMatch(serial=token.serial), backend=backend, poll_ms=50)
    try:
        yield CcidDriver(dev, **kw), token
    finally:
        await dev.aclose()


async def exchange(driver: CcidDriver, apdu: bytes) -> bytes:
    """transmit + the GET RESPONSE loop OpenSC runs on 61xx (reference §4.3)."""
    rapdu = await driver.transmit(apdu)
    body = b""
    while rapdu[-2] == 0x61:
        body += rapdu[:-2]
        rapdu = await driver.transmit(bytes([0x00, 0xC0, 0x00, 0x00, rapdu[-1]]))
    return body + rapdu


def tlv_value(data: bytes, tag: int) -> bytes:
    """Value of a leading one-byte-tag BER TLV."""
    assert data[0] == tag, f"expected tag {tag:02x}, got {data[:4].hex()}"
    first = data[1]
    if first < 0x80:
        return data[2 : 2 + first]
    n = first & 0x7F
    length = int.from_bytes(data[2 : 2 + n], "big")
    return data[2 + n : 2 + n + length]


def tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    head = bytes([n]) if n < 0x80 else (b"\x81" + bytes([n]) if n < 0x100 else b"\x82" + n.to_bytes(2, "big"))
    return bytes([tag]) + head + value


async def read_cert(driver: CcidDriver) -> x509.Certificate:
    rapdu = await exchange(driver, GET_CERT_9A)
    assert rapdu[-2:] == b"\x90\x00"
    return x509.load_der_x509_certificate(tlv_value(tlv_value(rapdu[:-2], 0x53), 0x70))


def sign_request(message: bytes) -> bytes:
    """GENERAL AUTHENTICATE data for a raw RSA-2048 PKCS#1 v1.5 signature (reference §4.3)."""
    digest_info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info
    return tlv(0x7C, b"\x82\x00" + tlv(0x81, block))


def signature_of(rapdu: bytes) -> bytes:
    assert rapdu[-2:] == b"\x90\x00", rapdu[-2:].hex()
    return tlv_value(tlv_value(rapdu[:-2], 0x7C), 0x82)


@pytest.mark.parametrize("profile", PROFILES)
async def test_piv_sign_round_trip_on_every_profile(profile: str) -> None:
    async with open_driver(profile) as (driver, token):
        assert await driver.power_on() == token.profile.atr
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"
        assert await driver.transmit(VERIFY_PIN) == b"\x90\x00"
        cert = await read_cert(driver)
        data = sign_request(b"release-1.2.3.exe")
        # ISO 7816-4 command chaining (CLA 0x10) as OpenSC sends it: 255 bytes, then the rest.
        first = bytes([0x10, 0x87, 0x07, 0x9A, 0xFF]) + data[:255]
        assert await driver.transmit(first) == b"\x90\x00"
        last = bytes([0x00, 0x87, 0x07, 0x9A, len(data) - 255]) + data[255:] + b"\x00"
        signature = signature_of(await exchange(driver, last))
        assert len(signature) == 256
        cert.public_key().verify(signature, b"release-1.2.3.exe", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]


async def test_two_kilobyte_object_crosses_t1_chaining_on_safenet() -> None:
    async with open_driver("safenet-5110") as (driver, _):
        await driver.power_on()
        assert driver.protocol == 1
        await exchange(driver, SELECT_PIV)
        assert await driver.transmit(VERIFY_PIN) == b"\x90\x00"
        blob = bytes(i * 7 & 0xFF for i in range(2048))
        body = bytes.fromhex("5C 03 5F C1 0A") + tlv(0x53, tlv(0x70, blob) + b"\x71\x01\x00\xfe\x00")
        put = bytes.fromhex("00 DB 3F FF 00") + len(body).to_bytes(2, "big") + body  # extended, one APDU
        assert await driver.transmit(put) == b"\x90\x00"
        rapdu = await exchange(driver, bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 0A 00"))
        assert tlv_value(tlv_value(rapdu[:-2], 0x53), 0x70) == blob


async def test_extended_apdu_is_chained_over_fusion_small_messages() -> None:
    async with open_driver("etoken-fusion") as (driver, _):
        await driver.power_on()
        await exchange(driver, SELECT_PIV)
        assert await driver.transmit(VERIFY_PIN) == b"\x90\x00"
        cert = await read_cert(driver)
        data = sign_request(b"chained")
        # 4 + 3 + 266 + 2 = 275 bytes > 265 per XfrBlock: CCID wLevelParameter chaining (§1.10.4).
        apdu = bytes.fromhex("00 87 07 9A 00") + len(data).to_bytes(2, "big") + data + b"\x00\x00"
        signature = signature_of(await exchange(driver, apdu))
        cert.public_key().verify(signature, b"chained", padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]


# ---- faults ----


async def test_unplug_mid_apdu_raises_device_gone() -> None:
    async with open_driver("safenet-5110") as (driver, token):
        await driver.power_on()
        token.faults.delay_next_s = 5.0  # the answer is held back behind time extensions

        async def pull() -> None:
            await trio.testing.wait_all_tasks_blocked()
            token.unplug()

        with pytest.RaisesGroup(DeviceGoneError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pull)
                await driver.transmit(SELECT_PIV)


@pytest.mark.parametrize("profile", ["safenet-5110", "yubikey5"])
async def test_time_extension_outlasts_the_frame_timeout(profile: str) -> None:
    # Each frame must come within 0.2 s; the answer takes 0.4 s, announced by time extensions.
    async with open_driver(profile, frame_timeout_s=0.2, max_wait_s=5) as (driver, token):
        await driver.power_on()
        token.faults.delay_next_s = 0.4
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"


async def test_stall_fails_the_apdu_and_the_card_is_usable_afterwards() -> None:
    async with open_driver("safenet-5110") as (driver, token):
        await driver.power_on()
        token.faults.stall_next = True
        with pytest.raises(CardError, match="stalled"):
            await driver.transmit(SELECT_PIV)
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"


@pytest.mark.parametrize("profile", ["safenet-5110", "yubikey5"])
async def test_stale_frame_with_wrong_bseq_is_dropped(profile: str) -> None:
    async with open_driver(profile) as (driver, token):
        await driver.power_on()
        resets = token.card.counters.resets
        token.faults.wrong_seq_next = True
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"
        assert token.card.counters.resets == resets  # no recovery was needed


@pytest.mark.parametrize("profile", ["safenet-5110", "etoken-fusion"])
async def test_malformed_response_is_a_card_error_and_power_on_works_after(profile: str) -> None:
    async with open_driver(profile) as (driver, token):
        await driver.power_on()
        assert await driver.transmit(VERIFY_PIN) == b"\x90\x00"
        token.faults.malformed_next = True
        with pytest.raises(CardError):
            await driver.transmit(SELECT_PIV)
        assert not token.card.pin_verified  # the recovery cold-reset the card
        assert await driver.power_on() == token.profile.atr
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"


async def test_card_resynch_after_verify_fails_the_apdu_and_spends_one_retry_only() -> None:
    # Promise P2: the card ran the VERIFY, then its answer was replaced by S(RESYNCH request).
    # Sending it again would spend a second retry for one wrong PIN; the driver fails the APDU.
    wrong_pin = bytes.fromhex("00 20 00 80 08") + b"999999\xff\xff"
    async with open_driver("safenet-5110") as (driver, token):
        await driver.power_on()
        await exchange(driver, SELECT_PIV)
        retries, attempts = token.card.pin_retries_left, token.evidence.pin_attempts
        token.faults.t1_resynch_next = True
        with pytest.raises(CardError, match="not sent again"):
            await driver.transmit(wrong_pin)
        assert token.evidence.pin_attempts == attempts + 1
        assert token.card.pin_retries_left == retries - 1
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"  # the card was reset


async def test_card_resynch_after_select_resends_it() -> None:
    async with open_driver("safenet-5110") as (driver, token):
        await driver.power_on()
        token.faults.t1_resynch_next = True
        assert (await exchange(driver, SELECT_PIV))[-2:] == b"\x90\x00"
        assert [r.ins for r in token.evidence.apdus] == [0xA4, 0xA4]


# ---- presence and interrupts ----


async def test_power_off_then_transmit_is_refused_and_slot_still_present() -> None:
    async with open_driver("yubikey5") as (driver, _):
        await driver.power_on()
        await driver.power_off()
        assert await driver.slot_present()
        with pytest.raises(CardError, match="not powered"):
            await driver.transmit(SELECT_PIV)


async def test_interrupt_pipe_reports_the_insertion() -> None:
    async with open_driver("yubikey5") as (driver, _):
        send, recv = trio.open_memory_channel[object](4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.watch_interrupts, send)
            with trio.fail_after(2):
                assert await recv.receive() == NotifySlotChange(present=(True,), changed=(True,))
            nursery.cancel_scope.cancel()


async def test_token_without_interrupt_pipe_ends_the_watch_at_once() -> None:
    async with open_driver("epass2003") as (driver, _):
        send, recv = trio.open_memory_channel[object](1)
        await driver.watch_interrupts(send)
        with pytest.raises(trio.EndOfChannel):
            await recv.receive()
