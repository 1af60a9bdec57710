"""What the server-held PIN tells an operator when it refuses (bridge_server/guard/server_pin.py).

Each refusal's `detail` goes into the log line and the audit record (guardrails.py) and is the
only explanation the owner of a build VM gets: these tests pin the sentences, with the fields
(instruction, class, P1, reference) that the operator needs to find the offending command.
"""

from __future__ import annotations

import pickle

import pytest

from bridge_server.guard.server_pin import DEFAULT_PIV_REFERENCES, ServerPin, Verdict, decide


def detail(raw: bytes, *, listed: bool = True, pin_length: int = 6) -> str:
    decision = decide(raw, listed=listed, references=DEFAULT_PIV_REFERENCES, pin_length=pin_length)
    assert decision.verdict is Verdict.REFUSE
    return decision.detail


def test_a_malformed_pin_command_from_a_listed_identity_is_refused_as_malformed() -> None:
    assert detail(bytes.fromhex("0020008009") + b"000000\xff\xff") == "a malformed PIN command"


def test_an_unlisted_placeholder_is_refused_naming_the_server_pin_for_list() -> None:
    raw = bytes.fromhex("0020008008") + b"000000\xff\xff"
    assert detail(raw, listed=False) == "the server-PIN placeholder from an identity not in server_pin.for"


def test_a_listed_change_reference_data_is_refused_naming_its_instruction() -> None:
    raw = bytes.fromhex("002C008010") + b"12345678" + b"654321\xff\xff"
    assert detail(raw) == "instruction 2C cannot use the server-held PIN"


def test_a_listed_verify_in_another_class_or_p1_is_refused_naming_both() -> None:
    assert detail(bytes.fromhex("0C20008008") + b"000000\xff\xff") == (
        "a VERIFY with CLA 0C P1 00 cannot be rewritten"
    )
    assert detail(bytes.fromhex("0020018008") + b"000000\xff\xff") == (
        "a VERIFY with CLA 00 P1 01 cannot be rewritten"
    )


def test_a_listed_verify_of_an_unconfigured_reference_is_refused_naming_it() -> None:
    raw = bytes.fromhex("0020008108") + b"000000\xff\xff"
    assert detail(raw) == "PIN reference 81 is not in server_pin.references"


def test_a_listed_verify_with_a_real_pin_is_told_to_send_the_placeholder() -> None:
    raw = bytes.fromhex("0020008008") + b"123456\xff\xff"
    assert detail(raw) == "a VERIFY that does not carry the placeholder 000000"


def test_a_server_pin_longer_than_the_padded_field_is_refused_saying_so() -> None:
    raw = bytes.fromhex("0020008008") + b"000000\xff\xff"
    assert detail(raw, pin_length=9) == "the server-held PIN is longer than the card's padded PIN field"


def test_a_server_pin_prints_as_redacted_and_refuses_pickling_saying_why() -> None:
    pin = ServerPin(bytearray(b"918273"))
    assert repr(pin) == "ServerPin(<redacted>)"
    assert str(pin) == "ServerPin(<redacted>)"
    with pytest.raises(TypeError, match=r"^a server PIN is not serialisable$"):
        pickle.dumps(pin)
