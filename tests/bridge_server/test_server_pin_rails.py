"""The server-held PIN on a token's APDU path (guard/server_pin_rails.py through `Guardrails`)."""

from __future__ import annotations

import structlog.testing

from bridge_server.guard.guardrails import Guardrails, Holder
from bridge_server.guard.pin_guard import Attempt, Engaged, PinGuard
from bridge_server.guard.server_pin import ServerPin
from bridge_server.guard.server_pin_config import ServerPinConfig
from bridge_server.guard.server_pin_rails import SERVER_PIN_REJECTED

PLACEHOLDER_VERIFY = bytes.fromhex("0020008008") + b"000000\xff\xff"
LISTED = Holder("build-vm-01", ("build-vm-01",), admin=False)
OTHER = Holder("release-vm", ("release-vm",), admin=False)


def rails(pin: bytes | None = b"918273", *, max_failures: int = 3) -> Guardrails:
    config = ServerPinConfig(
        credential="codesign-pin",
        identities=("build-vm-01",),
        pin=None if pin is None else ServerPin(bytearray(pin)),
        problem="" if pin is not None else "$CREDENTIALS_DIRECTORY is not set",
    )
    return Guardrails("codesign", guard=PinGuard(max_failures=max_failures), server_pin=config)


def test_a_listed_placeholder_passes_the_screen_and_reaches_the_card_with_the_real_pin() -> None:
    r = rails()
    assert r.screen(PLACEHOLDER_VERIFY, LISTED) is None
    out = r.server_pin.apdu(PLACEHOLDER_VERIFY, LISTED.names)
    assert out is not None and bytes(out) == bytes.fromhex("0020008008") + b"918273\xff\xff"
    events = r.observe(PLACEHOLDER_VERIFY, b"\x90\x00", LISTED)
    assert [type(e) for e in events] == [Attempt]
    assert isinstance(events[0], Attempt) and events[0].server_pin and events[0].outcome == "ok"
    assert r.server_pin.status(r.guard) == {
        "state": "configured", "source": "credential codesign-pin", "for": ["build-vm-01"],
        "references": ["80"], "message": "",
    }  # fmt: skip


def test_an_unlisted_identitys_verify_is_never_rewritten_and_its_answer_is_not_marked() -> None:
    r = rails()
    own = bytes.fromhex("0020008008") + b"123456\xff\xff"
    assert r.screen(own, OTHER) is None
    assert r.server_pin.apdu(own, OTHER.names) is None
    (event,) = r.observe(own, b"\x90\x00", OTHER)
    assert isinstance(event, Attempt) and not event.server_pin


def test_one_rejected_stored_pin_engages_the_guard_whatever_max_failures_says() -> None:
    r = rails(max_failures=3)
    assert r.server_pin.apdu(PLACEHOLDER_VERIFY, LISTED.names) is not None
    with structlog.testing.capture_logs() as logs:
        events = r.observe(PLACEHOLDER_VERIFY, b"\x63\xc5", LISTED)
    engaged = [e for e in events if isinstance(e, Engaged)]
    assert [e.reason for e in engaged] == [SERVER_PIN_REJECTED]
    assert r.guard.engaged("codesign")
    assert [entry["event"] for entry in logs] == ["server_pin.rejected"]
    status = r.server_pin.status(r.guard)
    assert status is not None and status["state"] == "rejected"
    assert "server PIN rejected by the card" in status["message"]
    refused = r.screen(PLACEHOLDER_VERIFY, LISTED)
    assert refused is not None and refused.kind == "pin_guard"  # the card never sees it again
    r.guard.reset("codesign")
    assert r.server_pin.status(r.guard)["state"] == "configured"  # type: ignore[index]


def test_a_client_pin_failure_does_not_say_the_server_pin_was_rejected() -> None:
    r = rails(max_failures=3)
    own = bytes.fromhex("0020008008") + b"111111\xff\xff"
    events = r.observe(own, b"\x63\xc5", OTHER)
    assert not any(isinstance(e, Engaged) for e in events)
    assert r.server_pin.status(r.guard)["state"] == "configured"  # type: ignore[index]


def test_a_lost_answer_to_the_stored_pin_counts_as_a_failure_but_not_as_rejected() -> None:
    r = rails(max_failures=1)
    r.server_pin.apdu(PLACEHOLDER_VERIFY, LISTED.names)
    (attempt, engaged) = r.observe(PLACEHOLDER_VERIFY, b"\x6f\x00", LISTED)
    assert isinstance(attempt, Attempt) and attempt.server_pin and attempt.outcome == "failed"
    assert isinstance(engaged, Engaged) and engaged.reason == "max_failures"
    assert r.server_pin.status(r.guard)["state"] == "configured"  # type: ignore[index]


def test_without_a_loaded_pin_the_listed_placeholder_is_refused_and_status_says_missing() -> None:
    r = rails(pin=None)
    refused = r.screen(PLACEHOLDER_VERIFY, LISTED)
    assert refused is not None and refused.kind == "server_pin_missing"
    assert "CREDENTIALS_DIRECTORY" in refused.detail
    assert "000000" in r.notice(refused)
    assert "CREDENTIALS_DIRECTORY" not in r.notice(refused)  # server paths stay on the server
    assert r.server_pin.status(r.guard)["state"] == "missing"  # type: ignore[index]


def test_a_placeholder_from_an_unlisted_identity_is_refused_with_6985() -> None:
    refused = rails().screen(PLACEHOLDER_VERIFY, OTHER)
    assert refused is not None and (refused.kind, refused.sw) == ("server_pin", 0x6985)


def test_a_substitution_never_observed_does_not_mark_the_next_command() -> None:
    r = rails(max_failures=3)
    assert r.server_pin.apdu(PLACEHOLDER_VERIFY, LISTED.names) is not None  # then the exchange vanished
    own = bytes.fromhex("0020008008") + b"111111\xff\xff"
    assert r.screen(own, OTHER) is None
    events = r.observe(own, b"\x63\xc5", OTHER)
    assert [e for e in events if isinstance(e, Attempt) and e.server_pin] == []
    assert r.server_pin.status(r.guard)["state"] == "configured"  # type: ignore[index]


def test_a_token_without_server_pin_changes_nothing() -> None:
    r = Guardrails("codesign", guard=PinGuard())
    assert r.screen(PLACEHOLDER_VERIFY, LISTED) is None
    assert r.server_pin.apdu(PLACEHOLDER_VERIFY, LISTED.names) is None
    assert r.server_pin.status(r.guard) is None


def test_a_reload_wipes_the_pin_it_replaces() -> None:
    r = rails()
    old = r.server_pin.config
    assert old is not None and old.pin is not None
    r.server_pin.configure(
        ServerPinConfig(credential="x", identities=("build-vm-01",), pin=ServerPin(bytearray(b"1234")))
    )
    assert old.pin.value == bytearray(6)
