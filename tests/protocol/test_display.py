"""One vocabulary for people: token states, ATRs and durations (protocol/display.py)."""

from __future__ import annotations

import pytest

from protocol.display import TokenState, format_atr, format_duration


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0, "0s"),
        (4.9, "4s"),
        (59.99, "59s"),
        (60, "1m00s"),
        (75, "1m15s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (3725, "1h02m"),
        (86399, "23h59m"),
        (86400 + 4 * 3600 + 59, "1d04h"),
        (-3, "0s"),
    ],
)
def test_durations_for_people_have_one_format(seconds: float | None, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_an_atr_is_upper_case_hex_without_separators() -> None:
    atr = bytes([0x3B, 0xD5, 0x18, 0x00, 0x81, 0x31, 0xFE, 0x7D, 0x80, 0x73, 0xC8, 0x21, 0x10, 0xF4])
    assert format_atr(atr) == "3BD518008131FE7D8073C82110F4"
    assert format_atr(b"") == ""


@pytest.mark.parametrize(
    ("present", "leased", "guarded", "locked", "word"),
    [
        (False, True, True, True, "absent"),
        (True, True, True, True, "locked"),
        (True, True, True, False, "guarded"),
        (True, True, False, False, "leased"),
        (True, False, False, False, "idle"),
    ],
)
def test_token_state_precedence(present: bool, leased: bool, guarded: bool, locked: bool, word: str) -> None:
    assert TokenState.of(present=present, leased=leased, guarded=guarded, locked=locked) == word


def test_there_is_no_free_state_word() -> None:
    assert {str(s) for s in TokenState} == {"idle", "leased", "guarded", "locked", "absent"}
