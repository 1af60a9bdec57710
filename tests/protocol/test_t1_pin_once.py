"""A PIN-class command reaches the card application at most once over T=1 (issue 18, promise P2).

The reader may send the same I-block again when the card answers with an R-block asking for it
(ISO 7816-3 §11.6.3.2 rule 7.1: the card did not accept it, so its application never saw it).
After a resynch (rule 6) the card may or may not have processed the command, so a PIN-class
command is never sent again: the reader reports a T1Error and the card is not asked twice.
"""

from __future__ import annotations

import pytest
from t1_link import Fault, Link, transform

from protocol.apdu import PIN_INS
from protocol.errors import T1Error
from protocol.t1 import T1Card, T1Reader

VERIFY = bytes.fromhex("00 20 00 80 08 31 32 33 34 35 36 FF FF")
SELECT = bytes.fromhex("00 A4 04 00 05 A0 00 00 03 08")
# ENVELOPE may wrap any command, a VERIFY included, so it is treated like one.
AT_MOST_ONCE_INS = sorted(PIN_INS | {0xC2, 0xC3})


def link(*faults: Fault, ifsc: int = 254) -> Link:
    return Link(T1Reader(ifsc=ifsc), T1Card(), faults=list(faults))


def pin_command(ins: int) -> bytes:
    return bytes([0x00, ins]) + VERIFY[2:]


@pytest.mark.parametrize("ins", AT_MOST_ONCE_INS)
def test_card_forced_resynch_after_verify_is_an_error_not_a_second_verify(ins):
    command = pin_command(ins)
    lnk = link(Fault(0, "resynch_back"))  # the card processed it, then its answer became S(RESYNCH)
    with pytest.raises(T1Error, match="not sent again"):
        lnk.exchange(command)
    assert lnk.card_saw == [command]
    assert lnk.exchange(SELECT) == transform(SELECT)  # the link itself recovered


def test_lost_answers_then_resynch_do_not_deliver_verify_twice():
    # The answer and all three repeats of it are lost: three R-blocks, then a resynch.
    lnk = link(*(Fault(step, "drop_back") for step in range(4)))
    with pytest.raises(T1Error, match="not sent again"):
        lnk.exchange(VERIFY)
    assert lnk.card_saw == [VERIFY]
    assert lnk.exchange(SELECT) == transform(SELECT)


def test_resynch_in_the_middle_of_a_chained_pin_command_is_an_error():
    # ifsc 4: the command goes in four blocks; the card's acknowledgement of the second is lost.
    lnk = link(Fault(1, "resynch_back"), ifsc=4)
    with pytest.raises(T1Error, match="not sent again"):
        lnk.exchange(VERIFY)
    assert lnk.card_saw == []


def test_a_verify_the_card_asked_for_again_is_resent_and_delivered_once():
    # Rule 7.1: the card answers a corrupted I-block with R(N(R) = N(S)): it did not accept the
    # block, so sending that same I-block again is the first delivery, not a repeat.
    lnk = link(Fault(0, "corrupt_out", pos=5))
    assert lnk.exchange(VERIFY) == transform(VERIFY)
    assert lnk.card_saw == [VERIFY]
    assert lnk.sent[0] == lnk.sent[1]  # the card NAKed the first; the second is the same I-block


def test_a_duplicated_verify_block_is_delivered_once():
    lnk = link(Fault(0, "dup_out"))
    assert lnk.exchange(VERIFY) == transform(VERIFY)
    assert lnk.card_saw == [VERIFY]


def test_other_commands_still_restart_after_a_resynch():
    lnk = link(Fault(0, "resynch_back"))
    assert lnk.exchange(SELECT) == transform(SELECT)
    assert lnk.card_saw == [SELECT, SELECT]
