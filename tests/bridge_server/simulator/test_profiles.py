from __future__ import annotations

import pytest

from bridge_server.simulator.profiles import PROFILES
from protocol.atr import Atr
from protocol.ccid import CcidClassDescriptor, ExchangeLevel


def test_design_profiles_exist() -> None:
    assert set(PROFILES) == {"safenet-5110", "yubikey5", "etoken-fusion", "epass2003"}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_atr_is_valid_and_offers_t1_only(name: str) -> None:
    atr = Atr.parse(PROFILES[name].atr)
    assert atr.protocols == (1,)
    assert atr.ifsc == 254


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_descriptor_round_trips_through_54_bytes(name: str) -> None:
    descriptor = PROFILES[name].descriptor
    raw = descriptor.encode()
    assert len(raw) == 54
    assert CcidClassDescriptor.parse(raw) == descriptor


def test_safenet_5110_matches_readers_dump() -> None:
    p = PROFILES["safenet-5110"]
    assert (p.vid, p.pid, p.bcd_device, p.interface_number) == (0x0529, 0x0620, 0x0100, 0)
    assert p.descriptor.features == 0x0001023C
    assert p.descriptor.exchange_level is ExchangeLevel.TPDU
    assert (p.descriptor.max_ccid_message_length, p.descriptor.max_ifsd) == (271, 252)
    assert p.descriptor.supported_protocols == frozenset({0, 1})
    assert p.has_interrupt
    assert p.escape_supported
    assert p.atr == bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4")


def test_yubikey5_matches_readers_dump() -> None:
    p = PROFILES["yubikey5"]
    assert (p.vid, p.pid, p.interface_number) == (0x1050, 0x0407, 2)
    d = p.descriptor
    assert d.exchange_level is ExchangeLevel.EXTENDED_APDU
    assert (d.features, d.max_ccid_message_length, d.max_ifsd) == (0x000400FE, 3072, 3062)
    assert (d.class_get_response, d.class_envelope) == (0xFF, 0xFF)
    assert b"YubiKey" in p.atr


def test_etoken_fusion_forces_chaining_with_275_byte_messages() -> None:
    p = PROFILES["etoken-fusion"]
    assert (p.vid, p.pid, p.interface_number) == (0x08E6, 0x34D2, 1)
    d = p.descriptor
    assert d.exchange_level is ExchangeLevel.EXTENDED_APDU
    assert (d.features, d.max_ccid_message_length, d.max_ifsd) == (0x00040472, 275, 254)
    # An extended RSA-2048 GENERAL AUTHENTICATE (266 data bytes) does not fit one message.
    assert d.max_apdu_data == 265
    assert d.max_apdu_data < 4 + 3 + 266 + 2
    assert p.escape_supported


def test_epass2003_has_no_interrupt_endpoint() -> None:
    p = PROFILES["epass2003"]
    assert (p.vid, p.pid) == (0x096E, 0x0807)
    assert not p.has_interrupt
    d = p.descriptor
    assert (d.features, d.max_ccid_message_length, d.max_ifsd) == (0x00040840, 2100, 2048)
    # The real ePass2003 ATR would select OpenSC's epass2003 driver; ours must not start like it.
    assert not p.atr.startswith(bytes.fromhex("3B 9F 95 81 31 FE 9F 00 66 46 53 05"))
