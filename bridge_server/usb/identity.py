"""Who a token is when its USB device has no serial number (issue 15 item 3).

A token is normally known by its USB iSerialNumber. Some have none: a YubiKey shows it only
when its SerialNumberUsbVisible flag is set, and many readers never do. Then the identity
comes from the card, in this order, or from where the device is plugged in:

1. `card-serial`: the YubiKey 5 serial, read as ykman's `PivSession.get_serial` does: SELECT
   the PIV application, then the YubiKey extension `00 F8 00 00` (4 bytes, big-endian). It is
   the decimal number printed on the key and shown by `ykman info`, and the same text the
   YubiKey puts in iSerialNumber when the flag is set, so a configured `serial:` works either way.
2. `card-guid`: the GUID of the PIV Card Holder Unique Identifier (SP 800-73-4 Part 1 §3.1.2,
   object 5FC102, tag 34), as 32 hex digits, when it is not all zeros.
3. `usb-port`: the USB port path (`1-1.2`, as /sys/bus/usb/devices names it): true only as
   long as the token stays in that port.

Reading the card powers it on and off; nothing here sends a PIN or changes the card.
"""

from __future__ import annotations

import enum
from typing import Protocol

import structlog

from bridge_server.errors import DeviceError, DeviceGoneError

log = structlog.get_logger(__name__)

SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")  # SP 800-73-4 Part 2 §3.1.1
YUBIKEY_GET_SERIAL = bytes.fromhex("00F80000")
GET_CHUID = bytes.fromhex("00CB3FFF055C035FC10200")  # GET DATA 5FC102, Le 256
SW_OK = b"\x90\x00"
MAX_GET_RESPONSE = 16  # a CHUID with its signature is ~3 KB at most: 16 x 256 bytes covers it


class IdentitySource(enum.StrEnum):
    """Where a token's identity came from; shown in `status` as `identity_source`."""

    USB_SERIAL = "usb-serial"
    CARD_SERIAL = "card-serial"
    CARD_GUID = "card-guid"
    USB_PORT = "usb-port"


class IdentityCard(Protocol):
    """The part of `CcidDriver` this module needs."""

    async def power_on(self) -> bytes: ...
    async def power_off(self) -> None: ...
    async def transmit(self, apdu: bytes) -> bytes: ...


def yubikey_serial(rapdu: bytes) -> str | None:
    """The decimal serial in an answer to `00 F8 00 00`, or None."""
    if len(rapdu) != 6 or rapdu[-2:] != SW_OK:
        return None
    value = int.from_bytes(rapdu[:4], "big")
    return str(value) if value else None


def _tlv_items(data: bytes) -> list[tuple[int, bytes]]:
    """One level of single-byte-tag BER-TLV (ISO 7816-4 §5.2); stops at the first malformed item."""
    items, pos = [], 0
    while pos + 2 <= len(data):
        tag, length, pos = data[pos], data[pos + 1], pos + 2
        if length == 0x81 and pos < len(data):
            length, pos = data[pos], pos + 1
        elif length == 0x82 and pos + 1 < len(data):
            length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif length > 0x80:
            break
        if pos + length > len(data):
            break
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def chuid_guid(rapdu: bytes) -> str | None:
    """The CHUID's GUID (tag 34 inside tag 53) as hex, or None when absent or all zeros."""
    if rapdu[-2:] != SW_OK:
        return None
    for tag, body in _tlv_items(rapdu[:-2]):
        if tag != 0x53:
            continue
        for inner, value in _tlv_items(body):
            if inner == 0x34 and len(value) == 16 and any(value):
                return value.hex().upper()
    return None


async def _transmit_whole(card: IdentityCard, apdu: bytes) -> bytes:
    """`apdu`'s whole answer: 61xx is followed by GET RESPONSE (ISO 7816-4 §5.3.4), bounded."""
    rapdu = await card.transmit(apdu)
    body = bytearray()
    for _ in range(MAX_GET_RESPONSE):
        if len(rapdu) < 2 or rapdu[-2] != 0x61:
            break
        body += rapdu[:-2]
        rapdu = await card.transmit(bytes([0x00, 0xC0, 0x00, 0x00, rapdu[-1]]))
    return bytes(body + rapdu)


async def read_card_identity(card: IdentityCard) -> tuple[str, IdentitySource] | None:
    """The card's own identity (YubiKey serial, else CHUID GUID), or None if it has neither."""
    try:
        await card.power_on()
        try:
            if (await card.transmit(SELECT_PIV))[-2:] != SW_OK:
                return None
            serial = yubikey_serial(await card.transmit(YUBIKEY_GET_SERIAL))
            if serial is not None:
                return serial, IdentitySource.CARD_SERIAL
            guid = chuid_guid(await _transmit_whole(card, GET_CHUID))
            return (guid, IdentitySource.CARD_GUID) if guid is not None else None
        finally:
            await card.power_off()
    except DeviceGoneError:
        raise
    except DeviceError as exc:
        log.warning("device.identity_unreadable", reason=str(exc))
        return None


__all__ = ["IdentityCard", "IdentitySource", "chuid_guid", "read_card_identity", "yubikey_serial"]
