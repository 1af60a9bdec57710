"""bridge_server/tokens/speculation.py: what a lease teaches, when paths go, the replay rule."""

from __future__ import annotations

import pytest

from bridge_server.tokens.speculation import (
    PathRecorder,
    SpeculationBook,
    may_change_content,
    replay_matches,
)
from protocol.speculation import MAX_STEP_BYTES, MAX_STEPS_BYTES, encode_payload, paths_size

ATR = bytes.fromhex("3BD518008131FE7D8073C82110F4")
SELECT = bytes.fromhex("00A4040009A0000003080000100000")
GET_CHUID = bytes.fromhex("00CB3FFF055C035FC10200")
GET_CERT = bytes.fromhex("00CB3FFF055C035FC10500")
GET_RESPONSE = bytes.fromhex("00C0000000")
VERIFY_EMPTY = bytes.fromhex("00200080")
VERIFY_PIN = bytes.fromhex("002000800831323334353600FF")
PUT_DATA = bytes.fromhex("00DB3FFF055C035FC105")
OK = b"\x90\x00"


def recorded(*steps: tuple[bytes, bytes | None], atr: bytes = ATR) -> PathRecorder:
    rec = PathRecorder(atr)
    for command, response in steps:
        rec.note(command, response)
    return rec


# -- the replay check ---------------------------------------------------------------------------


def test_a_replayed_step_stands_only_on_the_identical_answer() -> None:
    assert replay_matches(b"\x53\x01\x00" + OK, b"\x53\x01\x00" + OK)
    assert not replay_matches(b"\x53\x01\x00" + OK, b"\x53\x01\x01" + OK)  # the content changed
    assert not replay_matches(OK, b"\x6a\x82")  # the status word changed
    assert not replay_matches(b"\x01" + OK, b"\x01\x00" + OK)  # one byte more
    assert not replay_matches(b"\x01\x00" + OK, b"\x01" + OK)  # one byte less
    assert not replay_matches(OK, None)  # refused by the policy, or the device failed
    assert not replay_matches(b"", None)


# -- what a lease records ---------------------------------------------------------------------


def test_the_recording_stops_at_the_first_verify_even_the_status_query() -> None:
    rec = recorded(
        (SELECT, OK), (GET_CHUID, b"\x53" + OK), (VERIFY_EMPTY, b"\x63\xc3"), (GET_CERT, b"cert" + OK)
    )
    assert rec.steps == [(SELECT, OK), (GET_CHUID, b"\x53" + OK)]
    assert not rec.open


def test_nothing_read_after_a_pin_is_ever_recorded() -> None:
    rec = recorded((SELECT, OK), (VERIFY_PIN, OK), (GET_CERT, b"secret-after-pin" + OK), (SELECT, OK))
    assert rec.steps == [(SELECT, OK)]
    assert all(b"secret-after-pin" not in response for _, response in rec.steps)


def test_a_refused_command_ends_the_recording() -> None:
    rec = recorded((SELECT, OK), (GET_CHUID, None), (GET_CERT, b"x" + OK))
    assert rec.steps == [(SELECT, OK)]


def test_a_power_event_ends_the_recording() -> None:
    rec = recorded((SELECT, OK))
    rec.interrupt()
    rec.note(GET_CHUID, b"\x53" + OK)
    assert rec.steps == [(SELECT, OK)]


@pytest.mark.parametrize("command", [PUT_DATA, bytes.fromhex("00470000"), bytes.fromhex("0024008000")])
def test_a_command_that_may_change_the_content_is_noticed_even_after_the_path_ended(command: bytes) -> None:
    rec = recorded((SELECT, OK), (VERIFY_PIN, OK), (command, OK))
    assert rec.content_changed
    assert may_change_content(command)


def test_reads_verify_and_crypto_leave_the_content_alone_and_a_refused_write_changed_nothing() -> None:
    rec = recorded(
        (SELECT, OK), (GET_CHUID, OK), (GET_RESPONSE, OK), (VERIFY_PIN, OK), (bytes.fromhex("00870700"), OK),
        (bytes.fromhex("0084000008"), OK), (PUT_DATA, None),
    )  # fmt: skip
    assert not rec.content_changed


# -- the book: learn, contradict, withdraw ---------------------------------------------------------


def test_a_lease_teaches_its_path_once() -> None:
    book = SpeculationBook()
    assert book.learn(recorded((SELECT, OK), (GET_CHUID, b"\x53" + OK)))
    assert book.paths == [((SELECT, OK), (GET_CHUID, b"\x53" + OK))]
    assert not book.learn(recorded((SELECT, OK), (GET_CHUID, b"\x53" + OK)))  # nothing new


def test_an_admin_renewing_the_certificate_withdraws_every_path() -> None:
    book = SpeculationBook()
    book.learn(recorded((SELECT, OK), (GET_CERT, b"old-cert" + OK)))
    # the admin's lease: PUT DATA of the new certificate (after the management key)
    assert book.learn(recorded((SELECT, OK), (bytes.fromhex("0087009B04"), OK), (PUT_DATA, OK)))
    assert book.paths == []
    assert book.withdrawals == 1
    # the next lease reads the new certificate and teaches that
    book.learn(recorded((SELECT, OK), (GET_CERT, b"new-cert" + OK)))
    assert book.paths == [((SELECT, OK), (GET_CERT, b"new-cert" + OK))]


def test_another_answer_than_taught_replaces_the_paths() -> None:
    book = SpeculationBook()
    book.learn(recorded((SELECT, OK), (GET_CERT, b"old-cert" + OK)))
    assert book.learn(recorded((SELECT, OK), (GET_CERT, b"new-cert" + OK)))
    assert book.paths == [((SELECT, OK), (GET_CERT, b"new-cert" + OK))]


def test_another_atr_is_another_card() -> None:
    book = SpeculationBook()
    book.learn(recorded((SELECT, OK), (GET_CHUID, OK)))
    assert book.learn(recorded((SELECT, OK), atr=ATR[:-1] + b"\x00"))
    assert book.paths == [((SELECT, OK),)]


def test_switched_off_it_learns_nothing_and_teaches_nothing() -> None:
    book = SpeculationBook(enabled=False)
    assert not book.learn(recorded((SELECT, OK)))
    assert book.paths == []
    book.enabled = True
    book.learn(recorded((SELECT, OK)))
    book.enabled = False
    assert book.message(7).paths == ()
    assert book.snapshot()["enabled"] is False


def test_forget_reports_whether_there_was_anything_to_withdraw() -> None:
    book = SpeculationBook()
    assert not book.forget()
    book.learn(recorded((SELECT, OK)))
    assert book.forget()
    assert book.message(7).paths == ()


def test_a_path_stops_before_it_would_outgrow_one_message() -> None:
    step = (GET_CERT, bytes(60_000))  # 4 fit in MAX_STEPS_BYTES (256 KiB), the 5th does not
    rec = recorded(*[step] * 5)
    assert len(rec.steps) == 4 and not rec.open
    assert paths_size([rec.steps]) <= MAX_STEPS_BYTES < paths_size([[step] * 5])
    book = SpeculationBook()
    book.learn(rec)
    assert encode_payload(book.message(0))  # a longer path could not be sent at all
    assert recorded((GET_CERT, bytes(MAX_STEP_BYTES + 1))).steps == []
