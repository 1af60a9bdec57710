"""Which PPS the driver sends, as libccid 1.5.2 decides (ifdhandler.c IFDHSetProtocolParameters),
and how it reads the card's confirmation (towitoko pps.c PPS_Match); issue 15 item 5.
The end-to-end check (libccid and our driver on the same emulated 5110+ FIPS) is in
tests/usb_rig/test_libusb_pps.py and test_libccid_reference.py."""

from __future__ import annotations

import dataclasses

import pytest

from bridge_server.errors import CardError
from bridge_server.simulator.profiles import EXTRA_PROFILES, PROFILES
from bridge_server.usb.ccid_policy import pps_confirmed, pps_fidi, pps_request, t1_parameters
from protocol.atr import Atr

FIPS = EXTRA_PROFILES["safenet-5110-fips"]
FIPS_ATR = Atr.parse(FIPS.atr)


def _atr_with_ta1(ta1: int) -> Atr:
    body = bytearray(FIPS.atr)
    body[2] = ta1
    body[-1] = 0
    for byte in body[1:-1]:
        body[-1] ^= byte
    return Atr.parse(bytes(body))


def test_the_5110_fips_reader_negotiates_ta1_and_sets_the_reader_to_it() -> None:
    fidi = pps_fidi(FIPS_ATR, FIPS.descriptor, FIPS.data_rates)
    assert fidi == 0x96  # 300000 bps at 4.8 MHz, in the reader's GET_DATA_RATES table
    assert pps_request(FIPS_ATR, FIPS.descriptor, 1, fidi) == bytes.fromhex("FF 11 96 78")
    assert t1_parameters(FIPS_ATR, fidi)[0] == 0x96


def test_a_rate_missing_from_the_readers_table_is_not_asked_for() -> None:
    assert pps_fidi(FIPS_ATR, FIPS.descriptor, (12903, 825806)) is None
    assert pps_fidi(FIPS_ATR, FIPS.descriptor, None) == 0x96  # no table: dwMaxDataRate decides


def test_a_card_too_fast_for_the_reader_gets_the_fastest_lower_ta1_it_can_do() -> None:
    slow_reader = dataclasses.replace(FIPS.descriptor, max_data_rate_bps=400_000)
    # TA1 0x97 (Fi 512, Di 64) is 600000 bps; 0x96 (300000) is the first below it that fits.
    assert pps_fidi(_atr_with_ta1(0x97), slow_reader, None) == 0x96


def test_readers_that_negotiate_themselves_or_slow_ones_send_no_pps() -> None:
    for name in ("yubikey5", "etoken-fusion", "epass2003"):  # AUTO_PPS_PROP
        p = PROFILES[name]
        atr = Atr.parse(p.atr)
        assert pps_request(atr, p.descriptor, 1, pps_fidi(atr, p.descriptor, None)) is None
    p = PROFILES["safenet-5110"]  # 10752 bps at most: TA1 0x18 would be 154838 bps
    assert pps_fidi(Atr.parse(p.atr), p.descriptor, None) is None


def test_the_confirmation_is_read_as_libccid_reads_it() -> None:
    request = bytes.fromhex("FF 11 96 78")
    assert pps_confirmed(request, request) == 0x96
    assert pps_confirmed(request, bytes.fromhex("FF 01 FE")) is None  # the card keeps Fd/Dd
    for bad in (b"", bytes.fromhex("FF 11 95 7B"), request + b"\x00", bytes.fromhex("FF 11 96 79")):
        with pytest.raises(CardError, match="PPS ff 11 96 78 refused"):
            pps_confirmed(request, bad)
