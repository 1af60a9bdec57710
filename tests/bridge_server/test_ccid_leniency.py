"""What libccid accepts from real devices, accepted here too with a warning (issue 15 item 7):
a wrong TCK or bytes after the ATR (towitoko ATR_InitFromArray checks neither), and bytes after
a T=1 block (openct proto-t1.c t1_xcv cuts the block to LEN + 3 + EDC)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs
from test_ccid_driver import ETOKEN_5100_ATR, YUBIKEY5, _driver, card_handler

from bridge_server.errors import CardError, DeviceError
from bridge_server.simulator.ccid_device import CcidDevice
from bridge_server.simulator.faults import Evidence, Faults
from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.profiles import PROFILES
from bridge_server.usb.ccid_policy import parse_card_atr, t1_block_length
from bridge_server.usb.transport import DeviceInfo, refuse_iccd
from protocol import ccid
from protocol.atr import Atr, Checksum
from protocol.ccid import CcidMessage, MessageType
from protocol.errors import MalformedAtrError

SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")
WRONG_TCK = ETOKEN_5100_ATR[:-1] + bytes([ETOKEN_5100_ATR[-1] ^ 0x5A])


def test_an_atr_with_a_wrong_tck_is_read_as_libccid_reads_it() -> None:
    atr, problem = parse_card_atr(WRONG_TCK)
    assert problem is not None and "TCK" in problem
    assert atr.raw == WRONG_TCK  # applications see the card's own bytes
    assert (atr.ifsc, atr.bwi, atr.protocols) == (254, 7, (1,))


def test_bytes_after_the_atr_are_ignored_as_libccid_ignores_them() -> None:
    atr, problem = parse_card_atr(ETOKEN_5100_ATR + b"\x90\x00")
    assert problem is not None and "trailing" in problem
    assert atr.historical == Atr.parse(ETOKEN_5100_ATR).historical
    assert atr.raw == ETOKEN_5100_ATR + b"\x90\x00"


def test_a_well_formed_atr_has_no_problem_and_a_truncated_one_stays_an_error() -> None:
    assert parse_card_atr(ETOKEN_5100_ATR)[1] is None
    with pytest.raises(MalformedAtrError):
        parse_card_atr(ETOKEN_5100_ATR[:6])


def test_t1_block_length_counts_header_inf_and_edc() -> None:
    block = bytes.fromhex("00 00 02 90 00 92")
    assert t1_block_length(block, Checksum.LRC) is None
    assert t1_block_length(block + b"\x00\x00", Checksum.LRC) == 6
    assert t1_block_length(block + b"\x00", Checksum.CRC) is None  # 7 bytes: the CRC's second byte


async def test_power_on_accepts_a_wrong_tck_and_warns() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(WRONG_TCK))
    with capture_logs() as logs:
        assert await driver.power_on() == WRONG_TCK
    warned = [e for e in logs if e["event"] == "card.atr_accepted"]
    assert warned and "TCK" in warned[0]["problem"]
    assert await driver.transmit(b"\x00\xa4\x04\x00") == b"\x00\xa4\x04\x00\x90\x00"


async def test_power_on_still_refuses_an_atr_libccid_cannot_read() -> None:
    driver, _ = await _driver(YUBIKEY5, card_handler(bytes.fromhex("3B F0")))
    with pytest.raises(CardError, match="malformed atr"):
        await driver.power_on()


def _padding_tpdu_reader() -> CcidDevice:
    p = PROFILES["safenet-5110"]
    return CcidDevice(p, PivCard(), faults=Faults(), evidence=Evidence())


async def test_a_t1_block_with_trailing_bytes_is_read_and_the_apdu_completes() -> None:
    # The eToken 5110 profile is a TPDU reader: every XfrBlock carries one T=1 block. This
    # reader pads each DataBlock with two zero bytes after the block's EDC.
    p = PROFILES["safenet-5110"]
    device = _padding_tpdu_reader()

    def handler(msg: CcidMessage) -> list[bytes]:
        frames = list(device.handle(msg.encode()).frames)
        if msg.msg_type is MessageType.PC_to_RDR_XfrBlock:
            answer = ccid.decode_message(frames[-1])
            frames[-1] = ccid.data_block(answer.seq, answer.data + b"\x00\x00").encode()
        return frames

    driver, dev = await _driver(p.descriptor, handler)
    await driver.power_on()
    with capture_logs() as logs:
        rapdu = await driver.transmit(SELECT_PIV)
    assert rapdu[-2:] == b"\x90\x00"
    assert any(e["event"] == "t1.trailing_bytes_ignored" for e in logs)
    assert MessageType.PC_to_RDR_IccPowerOff not in dev.types()[2:]  # no recovery was needed


@pytest.mark.parametrize(("protocol", "version"), [(1, "A"), (2, "B")])
def test_an_iccd_interface_is_refused_by_name(protocol: int, version: str) -> None:
    # Seen in the reference descriptor dumps: Oberthur CosmoCard and Aktiv Rutoken Magistra
    # report bInterfaceProtocol 2; libccid talks to them over control transfers.
    info = DeviceInfo(0x1A74, 0x0001, "", 0x0100, 1, 3, "Token", "1-2")
    with pytest.raises(DeviceError, match=f"ICCD version {version} device"):
        refuse_iccd(protocol, info)
    refuse_iccd(0, info)  # plain CCID: nothing to refuse
