"""bridge_server/tokens/speculation.py at its edges: which INS keep the content, exact size bounds,
the book's counters and /metrics fields (what `make mutation MUTATION_ARGS="speculation_book"` found)."""

from __future__ import annotations

import pytest

from bridge_server.tokens.speculation import (
    CONTENT_SAFE_INS,
    PathRecorder,
    SpeculationBook,
    may_change_content,
)
from protocol.speculation import MAX_STEP_BYTES, MAX_STEPS, MAX_STEPS_BYTES

ATR = bytes.fromhex("3BD518008131FE7D8073C82110F4")
SELECT = bytes.fromhex("00A4040009A0000003080000100000")
GET_CERT = bytes.fromhex("00CB3FFF055C035FC10500")
READ_BINARY = bytes.fromhex("00B0000000")
OK = b"\x90\x00"

# ISO 7816-4/-8 and the YubiKey: reads, VERIFY, authenticate, crypto, GET CHALLENGE, MSE, GET VERSION/SERIAL.
KEEPS_CONTENT = [
    0xA4,
    0xB0,
    0xB1,
    0xB2,
    0xB3,
    0xCA,
    0xCB,
    0xC0,
    0x20,
    0x21,
    0x84,
    0x86,
    0x87,
    0x88,
    0x2A,
    0x22,
]
KEEPS_CONTENT += [0xFD, 0xF8]
# PUT DATA, GENERATE KEY, CHANGE REFERENCE DATA, RESET RETRY COUNTER, UPDATE BINARY, IMPORT KEY (Yubico).
MAY_CHANGE = [0xDB, 0x47, 0x24, 0x2C, 0xD6, 0xFE, 0xA5, 0xB4, 0xCC, 0x89, 0x23, 0x2B, 0xF9]


@pytest.mark.parametrize("ins", KEEPS_CONTENT, ids=lambda ins: f"{ins:02X}")
def test_each_read_verify_and_crypto_instruction_keeps_the_taught_paths(ins: int) -> None:
    command = bytes((0x00, ins, 0x00, 0x00))
    assert not may_change_content(command)
    book = SpeculationBook()
    book.learn(_recorded((SELECT, OK)))
    book.learn(_recorded((SELECT, OK), (command, OK)))  # a read may extend the path
    assert book.withdrawals == 0
    assert book.paths[-1] == ((SELECT, OK),) or book.paths[0][0] == (SELECT, OK)


@pytest.mark.parametrize("ins", MAY_CHANGE, ids=lambda ins: f"{ins:02X}")
def test_writes_and_neighbouring_instructions_may_change_the_content(ins: int) -> None:
    assert may_change_content(bytes((0x00, ins, 0x00, 0x00)))


def test_the_content_safe_set_is_exactly_the_documented_instructions() -> None:
    assert sorted(CONTENT_SAFE_INS) == sorted(KEEPS_CONTENT)


def test_a_command_too_short_to_name_an_instruction_may_change_the_content() -> None:
    assert may_change_content(b"")
    assert may_change_content(b"\xa4")
    assert not may_change_content(b"\x00\xa4")  # two bytes name the instruction


def test_a_fresh_recording_is_open_and_has_changed_nothing() -> None:
    rec = PathRecorder(ATR)
    assert rec.atr == ATR
    assert rec.open is True
    assert rec.content_changed is False
    assert rec.steps == []


def test_a_recording_ends_with_open_false_after_a_power_event_and_after_a_verify() -> None:
    rec = PathRecorder(ATR)
    rec.interrupt()
    assert rec.open is False
    rec = _recorded((SELECT, OK), (bytes.fromhex("00200080"), b"\x63\xc3"))
    assert rec.open is False
    rec = _recorded((SELECT, None))
    assert rec.open is False


def test_a_path_of_exactly_max_steps_is_kept_and_one_more_ends_it() -> None:
    rec = _recorded(*[(READ_BINARY, OK)] * MAX_STEPS)
    assert len(rec.steps) == MAX_STEPS
    assert rec.open is True
    rec.note(READ_BINARY, OK)
    assert len(rec.steps) == MAX_STEPS
    assert rec.open is False


def test_a_path_of_exactly_max_steps_bytes_is_kept_and_one_byte_more_ends_it() -> None:
    # SELECT counts too: the step sizes must add up from the first byte of the first command.
    first = (SELECT, OK)
    room = MAX_STEPS_BYTES - len(SELECT) - len(OK)
    chunk = MAX_STEP_BYTES - len(GET_CERT)
    steps = [first]
    while room > len(GET_CERT) + chunk:
        steps.append((GET_CERT, bytes(chunk)))
        room -= len(GET_CERT) + chunk
    last = (GET_CERT, bytes(room - len(GET_CERT)))
    rec = _recorded(*steps, last)
    assert len(rec.steps) == len(steps) + 1 and rec.open
    rec.note(SELECT, b"")  # one more command byte count beyond the bound
    assert len(rec.steps) == len(steps) + 1 and not rec.open

    over = _recorded(*steps, (GET_CERT, bytes(room - len(GET_CERT) + 1)))
    assert len(over.steps) == len(steps)
    assert over.open is False


def test_a_response_of_exactly_max_step_bytes_is_kept_and_one_byte_more_is_not() -> None:
    assert _recorded((GET_CERT, bytes(MAX_STEP_BYTES))).steps == [(GET_CERT, bytes(MAX_STEP_BYTES))]
    assert _recorded((GET_CERT, bytes(MAX_STEP_BYTES + 1))).steps == []


def test_a_fresh_book_reports_every_counter_at_zero_under_its_metrics_names() -> None:
    assert SpeculationBook().snapshot() == {
        "enabled": True,
        "paths": 0,
        "steps": 0,
        "bytes": 0,
        "hits": 0,
        "mismatches": 0,
        "prefetched": 0,
        "withdrawals": 0,
    }


def test_the_snapshot_counts_paths_steps_and_bytes() -> None:
    book = SpeculationBook()
    book.learn(_recorded((SELECT, OK), (GET_CERT, b"cert" + OK)))
    book.learn(_recorded((SELECT, OK), (READ_BINARY, b"x" + OK)))
    snap = book.snapshot()
    assert (snap["paths"], snap["steps"]) == (2, 4)
    assert snap["bytes"] == 2 * (len(SELECT) + 2) + len(GET_CERT) + 6 + len(READ_BINARY) + 3


def test_every_contradiction_and_every_withdrawal_is_counted() -> None:
    book = SpeculationBook()
    book.learn(_recorded((SELECT, OK), (GET_CERT, b"one" + OK)))
    assert book.learn(_recorded((SELECT, OK), (GET_CERT, b"two" + OK)))  # contradiction
    assert book.learn(_recorded((SELECT, OK), (GET_CERT, b"three" + OK)))  # and again
    assert book.withdrawals == 2
    assert book.forget()
    assert book.withdrawals == 3


def test_a_lease_on_a_new_card_with_nothing_to_teach_reports_the_withdrawal() -> None:
    book = SpeculationBook()
    book.learn(_recorded((SELECT, OK)))
    assert book.learn(_recorded(atr=ATR[:-1] + b"\x00"))  # the old card's path went
    assert book.paths == []
    assert book.atr == ATR[:-1] + b"\x00"


def test_a_first_lease_with_nothing_recorded_changes_nothing() -> None:
    book = SpeculationBook()
    assert book.learn(PathRecorder(b"")) is False  # False, not merely falsy: its -> bool contract
    assert book.learn(_recorded((bytes.fromhex("00200080"), OK))) is False  # a VERIFY first: no path
    assert book.withdrawals == 0


def test_the_teaching_message_names_the_token_and_carries_the_paths() -> None:
    book = SpeculationBook()
    book.learn(_recorded((SELECT, OK)))
    msg = book.message(42)
    assert msg.token_id == 42
    assert msg.paths == (((SELECT, OK),),)


def test_switching_off_withdraws_the_paths_at_the_next_lease() -> None:
    book = SpeculationBook()
    book.learn(_recorded((SELECT, OK)))
    book.enabled = False
    assert book.learn(_recorded((SELECT, OK), (READ_BINARY, OK)))
    assert book.paths == [] and book.withdrawals == 1


def _recorded(*steps: tuple[bytes, bytes | None], atr: bytes = ATR) -> PathRecorder:
    rec = PathRecorder(atr)
    for command, response in steps:
        rec.note(command, response)
    return rec
