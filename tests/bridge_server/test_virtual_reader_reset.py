"""VirtualReader: IccPowerOn is a reset (issue 15 item 8; PC/SC test: tests/e2e/test_pcsc_reset.py)."""

from __future__ import annotations

from server_fakes import ATR, SIGN, SW_OK, SW_SECURITY_NOT_SATISFIED, VERIFY, FakeCard

from bridge_server.tokens.virtual_reader import VirtualReader
from protocol import ccid


async def test_power_on_after_an_apdu_cold_resets_the_card_and_drops_the_login() -> None:
    card = FakeCard()
    reader = VirtualReader(card, ATR)
    assert (await reader.execute(ccid.xfr_block(0, VERIFY))).response.data == SW_OK
    result = await reader.execute(ccid.icc_power_on(1))  # vpcd's RESET (SCARD_RESET_CARD)
    assert result.response.data == ATR
    assert card.calls[-2:] == ["power_off", "power_on"]
    assert (await reader.execute(ccid.xfr_block(2, SIGN))).response.data == SW_SECURITY_NOT_SATISFIED


async def test_power_on_right_after_the_grant_does_not_reset_again() -> None:
    card = FakeCard()
    reader = VirtualReader(card, ATR)
    assert (await reader.execute(ccid.icc_power_on(0))).response.data == ATR
    assert (await reader.execute(ccid.icc_power_on(1))).response.data == ATR
    assert card.calls == []  # no APDU reached the card: it is still as the grant's reset left it


async def test_a_rewritten_command_reaches_the_card_instead_and_its_buffer_is_wiped_after() -> None:
    # issue 16 hook (guard/server_pin.py): the card sees the rewrite, the client's command never.
    card = FakeCard()
    sent: list[bytearray] = []

    def rewrite(raw: bytes) -> bytearray | None:
        if raw[1] != 0x20:
            return None
        sent.append(bytearray(raw[:5]) + bytearray(b"918273\xff\xff"))
        return sent[-1]

    reader = VirtualReader(card, ATR, rewrite=rewrite)
    placeholder = bytes.fromhex("0020008008") + b"000000\xff\xff"
    await reader.execute(ccid.xfr_block(0, placeholder))
    await reader.execute(ccid.xfr_block(1, SIGN))
    assert card.calls == [
        ("transmit", bytes.fromhex("0020008008") + b"918273\xff\xff"),
        ("transmit", SIGN),  # not rewritten: sent as the client sent it
    ]
    assert sent == [bytearray(13)]  # overwritten once the card had it
