"""How long the server waits for a token's card (issue 15 item 2): libccid's extra wait for the
eToken Fusion's on-board key generation, and the per-token `timeouts` of the server config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_ccid_driver import FakeDevice, card_handler

from bridge_server.config import TokenTimeouts, parse_server_config
from bridge_server.errors import CardError, DeviceTimeoutError
from bridge_server.simulator.profiles import PROFILES
from bridge_server.usb.ccid_driver import CcidDriver
from bridge_server.usb.transport import DeviceInfo
from protocol.ccid import CcidMessage, MessageType
from protocol.errors import ConfigError

GENERATE_RSA2048 = bytes.fromhex("0047009A05AC03800107")  # PIV GENERATE ASYMMETRIC KEY PAIR, 9A


class _SilentKeygen(FakeDevice):
    """A card that answers an XfrBlock after `delay_s` and says nothing meanwhile."""

    delay_s = 0.0

    async def read(self) -> bytes:
        if self.sent[-1].msg_type is MessageType.PC_to_RDR_XfrBlock:
            await trio.sleep(self.delay_s)
        return await super().read()


def _token(profile: str, delay_s: float) -> _SilentKeygen:
    p = PROFILES[profile]

    def card(msg: CcidMessage) -> bytes:
        return b"\x90\x00"

    dev = _SilentKeygen(p.descriptor, card_handler(p.atr, card))
    dev.delay_s = delay_s
    dev.info = DeviceInfo(p.vid, p.pid, "S1", p.bcd_device, 1, 2, p.product)
    return dev


async def test_etoken_fusion_gets_five_more_minutes_for_a_silent_key_generation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The Fusion reader sends no time extension; libccid (commit e919724) adds 5 minutes to the
    # ATR-derived wait (about 24 s here) so an RSA key generation of up to 5 minutes completes.
    driver = CcidDriver(_token("etoken-fusion", 4 * 60.0))  # type: ignore[arg-type]
    await driver.power_on()
    start = trio.current_time()
    assert await driver.transmit(GENERATE_RSA2048) == b"\x90\x00"
    assert trio.current_time() - start == pytest.approx(240)


async def test_a_reader_with_time_extensions_gets_no_extra_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # yubikey5 would announce a long computation with time extensions; silence past its frame
    # wait (3 s floor) is a dead exchange, not a key generation.
    driver = CcidDriver(_token("yubikey5", 4 * 60.0))  # type: ignore[arg-type]
    await driver.power_on()
    start = trio.current_time()
    with pytest.raises((CardError, DeviceTimeoutError)):
        await driver.transmit(GENERATE_RSA2048)
    assert trio.current_time() - start < 60


async def test_a_configured_frame_wait_replaces_the_derived_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timeouts = TokenTimeouts(frame_s=20.0, max_s=30.0)
    dev = _token("yubikey5", 15.0)
    driver = CcidDriver(dev, frame_timeout_s=timeouts.frame_s, max_wait_s=timeouts.max_s)  # type: ignore[arg-type]
    await driver.power_on()
    assert await driver.transmit(GENERATE_RSA2048) == b"\x90\x00"
    dev.delay_s = 25.0  # beyond the configured 20 s frame wait
    with pytest.raises((CardError, DeviceTimeoutError)):
        await driver.transmit(GENERATE_RSA2048)


def _config(tmp_path: Path, timeouts: Any) -> dict[str, Any]:
    token: dict[str, Any] = {"name": "codesign", "match": {"vid": 0x08E6, "pid": 0x34D2}, "allow": ["vm"]}
    if timeouts is not None:
        token["timeouts"] = timeouts
    return {"tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"}, "tokens": [token]}


def test_token_timeouts_default_to_the_atr_derived_frame_and_a_60_s_cap(tmp_path: Path) -> None:
    config = parse_server_config(_config(tmp_path, None), tmp_path / "server.yaml")
    assert config.tokens[0].timeouts == TokenTimeouts(frame_s=None, max_s=60.0)


def test_token_timeouts_are_read_from_the_config(tmp_path: Path) -> None:
    config = parse_server_config(_config(tmp_path, {"frame_s": 30, "max_s": 600}), tmp_path / "s.yaml")
    assert config.tokens[0].timeouts == TokenTimeouts(frame_s=30.0, max_s=600.0)


@pytest.mark.parametrize(
    ("timeouts", "key", "words"),
    [
        ({"frame_s": 120, "max_s": 60}, "tokens[0].timeouts.frame_s", "longer than max_s"),
        ({"max_s": 7200}, "tokens[0].timeouts.max_s", "3600"),
        ({"frame_s": 0}, "tokens[0].timeouts.frame_s", "0.5"),
        ({"frame_s": "slow"}, "tokens[0].timeouts.frame_s", ""),
        ({"frame": 10}, "tokens[0].timeouts", "frame"),
    ],
)
def test_bad_token_timeouts_name_the_key_and_the_problem(
    tmp_path: Path, timeouts: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_server_config(_config(tmp_path, timeouts), tmp_path / "server.yaml")
    text = str(caught.value)
    assert key in text and "server.yaml" in text and words in text, text
