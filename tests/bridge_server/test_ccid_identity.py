"""Token identity without a USB serial number (issue 15 item 3): device choice, what the
operator is told when two identical tokens cannot be told apart, and the card-read identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from bridge_server.config import parse_server_config
from bridge_server.errors import CardError, DeviceNotFoundError
from bridge_server.simulator.piv import PivCard
from bridge_server.usb.devices import card_opener
from bridge_server.usb.identity import IdentitySource, chuid_guid, read_card_identity, yubikey_serial
from bridge_server.usb.transport import DeviceInfo, DeviceMatch, select_device
from protocol.errors import ConfigError

YK = 0x1050, 0x0407


def _info(serial: str, port: str) -> DeviceInfo:
    return DeviceInfo(*YK, serial, 0x0503, 1, int(port[-1]), "YubiKey", port_path=port)


def test_a_configured_serial_picks_the_one_device_without_usb_serial() -> None:
    seen = [_info("", "1-1.2"), DeviceInfo(0x0529, 0x0620, "0247A1B2", 0x0100, 1, 5, "eToken", "1-3")]
    assert select_device(DeviceMatch(*YK, serial="17331337"), seen) is seen[0]


def test_two_identical_tokens_without_serial_are_told_apart_by_port() -> None:
    seen = [_info("", "1-1.2"), _info("", "1-1.3")]
    with pytest.raises(DeviceNotFoundError) as caught:
        select_device(DeviceMatch(*YK), seen)
    text = str(caught.value)
    assert "no usb serial number" in text
    assert "port: (one of '1-1.2', '1-1.3')" in text
    assert "add the serial" not in text  # there is no serial to add
    assert select_device(DeviceMatch(*YK, port="1-1.3"), seen) is seen[1]


def test_two_identical_tokens_with_serials_are_told_apart_by_serial() -> None:
    seen = [_info("111", "1-1.2"), _info("222", "1-1.3")]
    with pytest.raises(DeviceNotFoundError, match=r"serial: one of '111', '222'"):
        select_device(DeviceMatch(*YK), seen)


def test_yubikey_serial_and_chuid_guid_are_parsed_from_the_card_answers() -> None:
    assert yubikey_serial(bytes.fromhex("01087489") + b"\x90\x00") == "17331337"
    assert yubikey_serial(bytes.fromhex("6D00")) is None
    guid = bytes(range(1, 17))
    chuid = bytes.fromhex("5316") + bytes.fromhex("3410") + guid + bytes.fromhex("3E00FE00") + b"\x90\x00"
    assert chuid_guid(chuid) == guid.hex().upper()
    zero = bytes.fromhex("5312") + bytes.fromhex("3410") + bytes(16) + b"\x90\x00"
    assert chuid_guid(zero) is None


class _Card:
    """A PivCard behind the driver methods `read_card_identity` uses."""

    def __init__(self, card: PivCard, *, broken: bool = False) -> None:
        self.card, self.broken, self.powered = card, broken, False

    async def power_on(self) -> bytes:
        self.powered = True
        return b"\x3b\x00"

    async def power_off(self) -> None:
        self.powered = False

    async def transmit(self, apdu: bytes) -> bytes:
        if self.broken:
            raise CardError("card mute")
        return self.card.execute(apdu)


async def test_a_yubikey_reports_its_serial_and_the_card_is_powered_off_after() -> None:
    card = _Card(PivCard(yubikey_serial=17331337))
    assert await read_card_identity(card) == ("17331337", IdentitySource.CARD_SERIAL)
    assert not card.powered


async def test_another_piv_card_is_known_by_its_chuid_guid() -> None:
    found = await read_card_identity(_Card(PivCard()))
    assert found is not None and found[1] is IdentitySource.CARD_GUID and len(found[0]) == 32


async def test_a_card_that_cannot_say_who_it_is_gives_no_identity() -> None:
    card = _Card(PivCard(), broken=True)
    assert await read_card_identity(card) is None
    assert not card.powered
    await trio.lowlevel.checkpoint()


def _server_config(match: dict[str, object]) -> dict[str, object]:
    token = {"name": "codesign", "match": match, "allow": ["vm"]}
    return {"tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"}, "tokens": [token]}


def test_a_token_can_be_matched_by_usb_port_path(tmp_path: Path) -> None:
    config = parse_server_config(_server_config({"vid": 0x1050, "port": "1-1.2"}), tmp_path / "s.yaml")
    assert config.tokens[0].match.port == "1-1.2"


@pytest.mark.parametrize("port", ["usb1", "1-", "1-1..2", "1/1"])
def test_a_malformed_port_path_is_a_config_error_with_an_example(tmp_path: Path, port: str) -> None:
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.match\.port: expected a usb port path such as"):
        parse_server_config(_server_config({"vid": 0x1050, "port": port}), tmp_path / "s.yaml")


async def test_a_simulated_token_without_usb_serial_is_known_by_its_card(tmp_path: Path) -> None:
    # match: {simulate: yubikey5, usb_serial: false}: the simulator's device has no iSerialNumber.
    config = parse_server_config(
        _server_config({"simulate": "yubikey5", "usb_serial": False}), tmp_path / "server.yaml"
    )
    open_card, _sim = card_opener(config.tokens[0])
    with capture_logs() as logs:
        card = await open_card()
    try:
        assert (card.serial, card.identity_source) == ("17331337", "card-serial")
    finally:
        await card.close()
    assert any(e["event"] == "device.identity_fallback" and e["log_level"] == "warning" for e in logs)


def test_usb_serial_applies_to_simulated_tokens_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"match\.usb_serial: only applies to a simulated token"):
        parse_server_config(_server_config({"vid": 0x1050, "usb_serial": False}), tmp_path / "s.yaml")
