"""`tokenbridge selftest` against the simulator: the report's content is checked against what the
simulated tokens are known to be (their profiles, the libccid reader dumps, ATR bytes decoded by
hand here), never against a saved selftest output; no PIN without --pin-from; the signature
check really checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from bridge_admin.cli import main
from bridge_admin.selftest import Options, run_selftest
from bridge_admin.selftest_card import CardStepError, ber_tlv
from bridge_admin.selftest_report import render_text
from bridge_admin.selftest_target import Target, read_pin, resolve_target
from bridge_server.simulator.piv_state import (
    ALG_RSA_2048,
    cert_object,
    generate_key,
    self_signed_certificate,
)
from bridge_server.simulator.profiles import PROFILES
from bridge_server.usb.transport import UsbCcidDevice
from protocol.errors import ConfigError

PIN = "123456"
INS_VERIFY = 0x20

# Decoded by hand from each profile's ATR (ISO 7816-3 §8.2.3, §11.4): TA3 = IFSC, TB3 = BWI|CWI;
# exchange level from the reader dumps' dwFeatures; whether the host sends SetParameters
# (dwFeatures bit 0x40 clear) and S(IFS request) with min(dwMaxIFSD, 254) (TPDU T=1 only).
KNOWN: dict[str, dict[str, Any]] = {
    "safenet-5110": {"level": "tpdu", "ifsc": 254, "bwi": 7, "cwi": 13, "set_params": True, "ifsd": 252},
    "yubikey5": {"level": "extended_apdu", "ifsc": 254, "bwi": 1, "cwi": 5, "set_params": False},
    "etoken-fusion": {"level": "extended_apdu", "ifsc": 254, "bwi": 7, "cwi": 13, "set_params": False},
    "epass2003": {"level": "extended_apdu", "ifsc": 254, "bwi": 9, "cwi": 15, "set_params": False},
}


def _target(profile: str) -> Target:
    return resolve_target(None, None, profile)


def _run(target: Target, options: Options | None = None) -> dict[str, Any]:
    return trio.run(run_selftest, target, options or Options())


def _steps(report: dict[str, Any]) -> dict[str, str]:
    return {s["step"]: s["status"] for s in report["steps"]}


def _pin(text: str = PIN) -> Options:
    return Options(pin=bytearray(text.encode()), pin_source="env:TEST_PIN")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_report_describes_the_token_the_simulator_is(name: str) -> None:
    profile, known = PROFILES[name], KNOWN[name]
    target = _target(name)
    report = _run(target)

    assert report["result"] == "ok", report["steps"]
    usb, ccid = report["usb"], report["ccid"]
    assert (usb["idVendor"], usb["idProduct"]) == (f"0x{profile.vid:04X}", f"0x{profile.pid:04X}")
    assert (usb["iManufacturer"], usb["iProduct"]) == (profile.manufacturer, profile.product)
    assert usb["iSerialNumber"] == profile.serial
    assert usb["interface"]["bInterfaceNumber"] == profile.interface_number
    kinds = sorted(e["type"] for e in usb["endpoints"])
    assert kinds == sorted(["bulk-IN", "bulk-OUT"] + (["interrupt-IN"] if profile.has_interrupt else []))
    d = profile.descriptor
    assert bytes.fromhex(usb["ccid_descriptor_hex"]) == d.encode()
    assert ccid["dwMaxIFSD"] == d.max_ifsd
    assert ccid["dwMaxCCIDMessageLength"] == d.max_ccid_message_length
    assert ccid["dwFeatures"] == f"0x{d.features:08X}"
    assert ccid["exchange_level"] == known["level"]

    atr = report["atr"]
    assert bytes.fromhex(atr["raw"]) == profile.atr
    assert atr["protocols"] == [1]
    t1 = report["t1"]
    assert (t1["IFSC"], t1["BWI"], t1["CWI"]) == (known["ifsc"], known["bwi"], known["cwi"])
    assert t1["t1_by_host"] is (known["level"] == "tpdu")
    assert report["pps"]["pps_sent_by_host"] is False

    commands = [m["command"] for m in report["power_on_messages"]]
    assert commands[0] == "IccPowerOn"
    assert ("SetParameters" in commands) is known["set_params"]
    ifs = [c for c in commands if "S-block" in c]
    if "ifsd" in known:  # NAD 00, PCB C1 = S(IFS request), LEN 01, INF = IFSD
        assert ifs and ifs[0].split()[-1].startswith(f"00c101{known['ifsd']:02x}")
        assert t1["IFSD"] == known["ifsd"]
    else:
        assert ifs == []
    assert all(m["ms"] >= 0 for m in report["power_on_messages"])
    assert all(s["ms"] >= 0 for s in report["steps"])

    rnd = report["select_round"]
    assert rnd["piv"] is True
    assert rnd["get_data"]["sw"].startswith("9000")
    assert [a["header"] for a in report["apdus"]] == ["00 A4 04 00", "00 CB 3F FF"]
    # What the card itself saw (the simulator's evidence): one SELECT, one GET DATA, no PIN.
    assert [r.ins for r in target.simulated.evidence.apdus] == [0xA4, 0xCB]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_no_pin_is_sent_without_pin_from(name: str) -> None:
    target = _target(name)
    report = _run(target)
    sim = target.simulated
    assert sim.evidence.pin_attempts == 0
    assert sim.card.counters.pin_attempts == 0
    assert INS_VERIFY not in [r.ins for r in sim.evidence.apdus]
    assert sim.card.pin_retries_left == 3
    assert _steps(report)["login"] == "skipped"
    assert _steps(report)["signature"] == "skipped"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_login_and_signature_verify_against_the_certificate(name: str) -> None:
    target = _target(name)
    report = _run(target, _pin())
    sim = target.simulated
    assert _steps(report)["login"] == "ok", report["steps"]
    assert _steps(report)["signature"] == "ok", report["steps"]
    assert report["signature"]["verified"] is True
    assert report["signature"]["algorithm"] == "RSA-2048"  # the simulator's 9C key
    assert sim.card.counters.pin_attempts == 1  # exactly one VERIFY carried the PIN
    assert sim.card.counters.signatures == 1
    assert PIN not in json.dumps(report)
    assert PIN.encode().hex() not in json.dumps(report)


def test_a_signature_that_does_not_match_the_certificate_fails_the_report() -> None:
    target = _target("yubikey5")
    other = self_signed_certificate(0x9C, generate_key(ALG_RSA_2048))
    target.simulated.card._state.objects[bytes.fromhex("5FC10A")] = cert_object(other)
    report = _run(target, _pin())
    assert report["result"] == "fail"
    assert report["failed_steps"] == ["signature"]
    detail = next(s["detail"] for s in report["steps"] if s["step"] == "signature")
    assert "does not verify" in detail


def test_a_wrong_pin_is_presented_once_and_reported() -> None:
    target = _target("safenet-5110")
    report = _run(target, _pin("999999"))
    assert report["failed_steps"] == ["login"]
    assert _steps(report)["signature"] == "skipped"
    assert target.simulated.card.counters.pin_attempts == 1
    assert target.simulated.card.pin_retries_left == 2


def test_no_login_when_one_try_is_left() -> None:
    target = _target("epass2003")
    target.simulated.card._state.pin_left = 1
    report = _run(target, _pin())
    assert report["failed_steps"] == ["login"]
    assert "1 PIN tries left" in next(s["detail"] for s in report["steps"] if s["step"] == "login")
    assert target.simulated.card.counters.pin_attempts == 0
    assert target.simulated.card.pin_retries_left == 1


class ReplugPrompter:
    def __init__(self, target: Target, *, agree: bool) -> None:
        self.target, self.agree, self.events = target, agree, []  # type: ignore[var-annotated]

    def confirm(self, question: str) -> bool:
        self.events.append("asked")
        return self.agree

    def say(self, event: str, text: str) -> None:
        self.events.append(event)
        if event == "unplug_now":
            self.target.simulated.unplug()
        elif event == "replug_now":
            self.target.simulated.replug()


def test_unplug_and_replug_when_the_user_agrees() -> None:
    target = _target("yubikey5")
    prompter = ReplugPrompter(target, agree=True)
    report = _run(target, Options(prompter=prompter, replug_wait_s=10))
    assert report["result"] == "ok", report["steps"]
    assert prompter.events == ["asked", "unplug_now", "replug_now"]
    steps = _steps(report)
    for step in ("unplug seen", "replug seen", "reopen", "power on after replug", "select after replug"):
        assert steps[step] == "ok"
    assert report["replug"]["atr_unchanged"] is True
    assert report["replug"]["power_on_messages"][0]["command"] == "IccPowerOn"
    assert report["select_round_after_replug"]["piv"] is True
    assert target.simulated.evidence.power_ons >= 2


def test_replug_declined_or_unattended_is_skipped() -> None:
    target = _target("yubikey5")
    prompter = ReplugPrompter(target, agree=False)
    report = _run(target, Options(prompter=prompter))
    assert prompter.events == ["asked"]
    assert _steps(report)["replug"] == "skipped"
    assert target.simulated.plugged


def test_a_replug_that_never_comes_fails_with_a_clear_step() -> None:
    target = _target("yubikey5")

    class NoReplug(ReplugPrompter):
        def say(self, event: str, text: str) -> None:
            if event == "unplug_now":
                self.target.simulated.unplug()

    report = _run(target, Options(prompter=NoReplug(target, agree=True), replug_wait_s=0.5))
    assert report["failed_steps"] == ["replug seen"]
    assert "not plugged in within 0.5 s" in report["steps"][-1]["detail"]


def test_a_token_claimed_by_the_server_is_reported_with_what_to_do() -> None:
    target = _target("safenet-5110")
    held = UsbCcidDevice.open(target.match, backend=target.backend)  # as a running server holds it
    try:
        report = _run(target)
    finally:
        held.close()
    assert report["failed_steps"] == ["open"]
    assert "systemctl stop tokenbridge-server" in report["steps"][-1]["detail"]
    assert target.simulated.evidence.apdu_count == 0


def test_text_report_lays_out_the_descriptor_as_the_reader_dump_does() -> None:
    text = render_text(_run(_target("safenet-5110")))
    # Lines of shared/reference/ccid-readers/SafeNet_Token_JC.txt (libccid's dump of this token).
    for line in (
        " idVendor: 0x0529",
        "  iProduct: Token JC",
        " bcdDevice: 1.00 (firmware release?)",
        "  dwProtocols: 0x0000 0x0003",
        "  dwDefaultClock: 4.000 MHz",
        "  dwMaxIFSD: 252",
        "  dwFeatures: 0x0001023C",
        "   ..02.. NAD value other than 00 accepted (T=1)",
        "   01.... TPDU level exchange",
        "  dwMaxCCIDMessageLength: 271 bytes",
    ):
        assert line in text.splitlines()
    assert "tokenbridge selftest --json" in text


def _server_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(
        "tls: {ca: ca.pem, cert: server.pem, key: server.key}\n"
        "tokens:\n"
        "  - {name: release, match: {simulate: epass2003}, allow: [vm]}\n"
        "  - {name: nightly, match: {simulate: etoken-fusion}, allow: [vm]}\n"
    )
    return path


def test_cli_json_from_a_server_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _server_yaml(tmp_path)
    rc = main(["selftest", "--config", str(config), "--token", "nightly", "--json", "--no-replug"])
    out = capsys.readouterr().out
    report = json.loads(out)  # stdout is the report and nothing else
    assert rc == 0
    assert report["usb"]["idProduct"] == f"0x{PROFILES['etoken-fusion'].pid:04X}"
    assert report["target"] == f"config {config} token nightly"
    assert _steps(report)["replug"] == "skipped"


def test_cli_needs_a_token_name_when_the_config_has_several(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pick one with --token"):
        resolve_target(_server_yaml(tmp_path), None, None)
    with pytest.raises(ConfigError, match="no token 'other'"):
        resolve_target(_server_yaml(tmp_path), "other", None)


def test_cli_logs_in_with_pin_from_env_and_never_prints_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TB_SELFTEST_PIN", PIN)
    rc = main(["selftest", "--simulate", "yubikey5", "--pin-from", "env:TB_SELFTEST_PIN"])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert "verified: True" in out
    assert "stdin is not a terminal" in out  # nobody to ask: no replug prompt
    assert PIN not in out + err


def test_cli_refuses_an_unusable_pin_source_first(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["selftest", "--simulate", "yubikey5", "--pin-from", "env:TB_SELFTEST_UNSET", "--json"])
    assert rc == 2  # the PIN source is unusable: nothing was run
    assert "TB_SELFTEST_UNSET is unset" in capsys.readouterr().err


def test_read_pin_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(b"123456\n")
    os.chmod(path, 0o600)
    assert read_pin(str(path)) == (bytearray(b"123456"), str(path), "")
    os.chmod(path, 0o644)
    assert "chmod 600" in read_pin(str(path))[2]
    with pytest.raises(ConfigError, match="cannot read the PIN file"):
        read_pin(str(tmp_path / "missing"))


def test_a_truncated_answer_is_a_card_step_error_not_a_crash() -> None:
    assert ber_tlv(bytes.fromhex("5302AABB")) == {0x53: b"\xaa\xbb"}
    for broken in ("5F", "5F C1", "53 82 01", "53 05 AA"):
        with pytest.raises(CardStepError):
            ber_tlv(bytes.fromhex(broken))
