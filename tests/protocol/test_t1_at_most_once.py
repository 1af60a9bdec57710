"""What the T=1 reader says when it refuses to send a PIN-class command again, and what counts as one.

After a resynch the reader cannot know whether the card already compared the PIN, so it stops
(promise P2, test_t1_pin_once.py). The client then sees this error text: it must name the
instruction and tell the user what to do. And the check must hold for any command whose
instruction byte is PIN-class, however short, because the reader forwards what it is given.
"""

from __future__ import annotations

import pytest
from t1_link import Fault, Link

from protocol.errors import T1Error
from protocol.t1 import T1Card, T1Reader, at_most_once

CHANGE_PIN = bytes.fromhex("00 24 00 80 10 31 32 33 34 35 36 FF FF 36 35 34 33 32 31 FF FF")


def test_the_refusal_names_the_instruction_and_asks_for_the_pin_again() -> None:
    lnk = Link(T1Reader(ifsc=254), T1Card(), faults=[Fault(0, "resynch_back")])
    with pytest.raises(T1Error) as info:
        lnk.exchange(CHANGE_PIN)
    assert str(info.value) == (
        "pin-class command (ins 24) not sent again after a t=1 resynch: "
        "the card may already have counted it; present the pin again"
    )


@pytest.mark.parametrize(
    ("command", "once"),
    [
        (b"", False),
        (b"\x20", False),  # one byte has no instruction
        (b"\x00\x20", True),  # CLA INS only: still a VERIFY to the card
        (b"\x00\x2c\x00", True),
        (b"\x00\xc3", True),  # ENVELOPE may carry a VERIFY
        (b"\x20\x00", False),  # 20 in the class byte is not the instruction
        (b"\x00\xa4", False),
    ],
)
def test_any_command_whose_second_byte_is_pin_class_is_at_most_once(command: bytes, once: bool) -> None:
    assert at_most_once(command) is once
