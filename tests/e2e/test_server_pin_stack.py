"""The PIN stays on the token host (issue 16), through the real stack.

pkcs11-tool / osslsigncode -> OpenSC -> pcscd -> vpcd -> tokenbridge-client -> TLS ->
tokenbridge-server -> simulated safenet-5110. The card's PIN is held by the server only, as
systemd hands a `LoadCredentialEncrypted=` credential to a unit: `systemd-creds encrypt` writes
the credential (what `tokenbridge pin set` does), and at "unit start" it is decrypted into a
private `$CREDENTIALS_DIRECTORY` whose path is the only thing the server's environment carries.
systemd is not PID 1 on this host or in CI, so `systemd-run -p LoadCredentialEncrypted=` cannot
start the unit; the decryption and the variable are exactly what it would provide.

The build VM's side (its client config, environment, signing commands) holds only the
placeholder 000000; the canary PIN must be found nowhere but in the credential.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import VpcdSlot

from bridge_admin.local_stack import BridgeStack, Daemon, free_port, wait_for
from bridge_admin.signing_tools import (
    minimal_pe,
    osslsigncode_sign,
    osslsigncode_verify,
    pkcs11,
    pkcs11_sign,
    read_certificate_pem,
)
from bridge_server.guard.audit import verify_file
from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.profiles import PROFILES
from protocol.runtime.config import dump_yaml, load_yaml

pytestmark = pytest.mark.e2e

CANARY = "918273"
PLACEHOLDER = "000000"
FORMS = (CANARY, CANARY.encode().hex(), (CANARY.encode() + b"\xff\xff").hex())
CREDENTIAL = "codesign-pin"


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [form for form in FORMS if form.lower() in lowered]


@pytest.fixture
def stack() -> Iterator[BridgeStack]:
    folder = Path(tempfile.mkdtemp(prefix="tb-spin-"))  # short: the control socket lives here
    s = BridgeStack(folder / "stack", log_level="debug")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(folder, ignore_errors=True)


def set_card_pin(stack: BridgeStack, pin: str) -> None:
    profile = PROFILES["safenet-5110"]
    PivCard(state_path=stack.workdir / "state" / f"{profile.serial}.json", pin=pin)


def card_pin_retries(stack: BridgeStack) -> int:
    (state,) = (stack.workdir / "state").glob("*.json")
    return int(json.loads(state.read_text())["pin_left"])


def load_credential(stack: BridgeStack, pin: str) -> Path:
    """What LoadCredentialEncrypted= does: encrypt (pin set), then decrypt into a private folder."""
    encrypted = stack.workdir / f"{CREDENTIAL}.cred"
    subprocess.run(
        ["systemd-creds", "encrypt", f"--name={CREDENTIAL}", "-", str(encrypted)],
        input=pin.encode(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert pin.encode() not in encrypted.read_bytes()
    folder = stack.workdir / "credentials"
    folder.mkdir(mode=0o700, exist_ok=True)
    target = folder / CREDENTIAL
    target.unlink(missing_ok=True)
    subprocess.run(
        ["systemd-creds", "decrypt", f"--name={CREDENTIAL}", str(encrypted), str(target)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    target.chmod(0o400)
    return folder


def configure(
    stack: BridgeStack, *, allow: list[str], server_pin_for: list[str], metrics_port: int = 0, **guard: int
) -> None:
    path = stack.write_server_config(allow=allow)
    doc = load_yaml(path)
    doc["tokens"][0]["server_pin"] = {"credential": CREDENTIAL, "for": server_pin_for}
    if metrics_port:
        doc["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    if guard:
        doc["pin_guard"] = guard
    path.write_text(dump_yaml(doc))


def start_server(stack: BridgeStack, credentials: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    with monkeypatch.context() as env:
        env.setenv("CREDENTIALS_DIRECTORY", str(credentials))  # only the server's environment
        return stack.start_server()


def tokenbridge(stack: BridgeStack, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bridge_admin.cli", *args, "--config", str(stack.workdir / "server.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def status(stack: BridgeStack) -> dict[str, object]:
    out = tokenbridge(stack, "status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (token,) = doc["tokens"]
    return dict(token)


def pin_test(stack: BridgeStack) -> subprocess.CompletedProcess[str]:
    """`tokenbridge pin test codesign --json` once the token is free: pin test refuses while a lease
    is held, and pcscd (shared with whatever else runs on this machine) may power the card up
    again and so take a lease at any moment."""
    answers: list[subprocess.CompletedProcess[str]] = []

    def free() -> bool:
        answers.append(tokenbridge(stack, "pin", "test", "codesign", "--json"))
        return "is leased by" not in answers[-1].stdout

    wait_for(free, timeout=60, what="pin test to find the token free")
    return answers[-1]


def login(slot: int, pin: str) -> subprocess.CompletedProcess[str]:
    return pkcs11("--login", "--pin", pin, "--list-objects", "--type", "privkey", slot=slot, check=False)


def audit_events(stack: BridgeStack) -> list[dict[str, object]]:
    return [json.loads(line) for line in (stack.workdir / "audit.jsonl").read_text().splitlines()]


def test_a_build_vm_holding_only_the_placeholder_signs_and_the_canary_pin_is_found_nowhere(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01"])
    metrics_port = free_port()
    configure(stack, allow=["build-vm-01"], server_pin_for=["build-vm-01"], metrics_port=metrics_port)
    set_card_pin(stack, CANARY)
    start_server(stack, load_credential(stack, CANARY), monkeypatch)
    client = stack.start_client("build-vm-01", [slot])
    stack.wait_card(slot, client)

    data = tmp_path / "data.bin"
    data.write_bytes(b"signed with the server-held PIN")
    signed = pkcs11_sign(slot, data, tmp_path / "sig.bin", pin=PLACEHOLDER, check=False)
    assert signed.returncode == 0, signed.stderr
    cert = read_certificate_pem(slot, "01", tmp_path / "cert.pem")
    program = tmp_path / "build.exe"
    program.write_bytes(minimal_pe(b"\xc3 server pin build"))
    # A fresh lease (so a cold-reset card) for osslsigncode, as two CI jobs would have. Observed
    # twice in ~15 runs under load: when osslsigncode started while pkcs11-tool's login was still on
    # the card (same lease, no reset between the processes), OpenSC answered C_Login with
    # CKR_PIN_INCORRECT having sent only the empty VERIFY (9000), no PIN at all (docs/client.md).
    wait_for(lambda: status(stack)["holder"] is None, timeout=60, what="the first lease to end")
    osslsigncode_sign(slot, cert, program, tmp_path / "signed.exe", pin=PLACEHOLDER)
    assert "Signature verification: ok" in osslsigncode_verify(cert, tmp_path / "signed.exe").stdout
    assert card_pin_retries(stack) == 3  # no attempt was wrong

    token = status(stack)
    assert token["server_pin"] == {
        "state": "configured", "source": f"credential {CREDENTIAL}", "for": ["build-vm-01"],
        "references": ["80"], "message": "",
    }  # fmt: skip
    tested = pin_test(stack)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert json.loads(tested.stdout)["result"]["retries_before"] == 3
    raw_status = tokenbridge(stack, "status", "--json").stdout + tested.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert 'tokenbridge_server_pin_ok{token="codesign"} 1' in metrics
    client_environ = Path(f"/proc/{client.proc.pid}/environ").read_bytes().decode(errors="replace")
    stack.stop()

    events = audit_events(stack)
    verified = [e for e in events if e["event"] == "pin.verified"]
    assert len(verified) == 3  # pkcs11-tool, osslsigncode, pin test
    assert all(e.get("server_pin") is True and e["outcome"] == "ok" for e in verified)
    *busy, tested_event = [e for e in events if e["event"] == "server_pin.tested"]
    assert tested_event["ok"] is True and tested_event["actor"].startswith("local:")
    assert all("is leased by" in str(e["message"]) for e in busy)  # refused while pcscd held the card
    assert verify_file(stack.workdir / "audit.jsonl").ok
    server_log = (stack.workdir / "server.log").read_text()
    assert '"apdu.exchanged"' in server_log and '"server_pin.loaded"' in server_log  # debug was on
    client_side = {p.name: p for p in stack.workdir.iterdir() if p.name.startswith("client-")}
    client_side |= {p.name: p for p in (stack.pki.folder / "clients" / "build-vm-01").iterdir()}
    found = {
        "server log": leaks(server_log),
        "audit log": leaks((stack.workdir / "audit.jsonl").read_text()),
        "pin guard state": leaks((stack.workdir / "pin-guard.json").read_text()),
        "status --json": leaks(raw_status),
        "metrics": leaks(metrics),
        "client environment": leaks(client_environ),
        **{
            f"client side: {name}": leaks(p.read_bytes().decode(errors="replace"))
            for name, p in client_side.items()
        },
    }
    assert found == {where: [] for where in found}
    assert "client-build-vm-01.log" in client_side and "client-build-vm-01.yaml" in client_side


def test_a_wrong_stored_pin_engages_the_guard_after_one_failure_until_fixed_and_reset(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01"])
    # max_failures 3: the guard would allow three wrong PINs from a client; a wrong stored PIN
    # would be wrong every time, so it stops after the first.
    configure(
        stack, allow=["build-vm-01"], server_pin_for=["build-vm-01"], max_failures=3, min_retries_left=0
    )
    set_card_pin(stack, "123456")
    credentials = load_credential(stack, "654321")  # not the card's PIN
    start_server(stack, credentials, monkeypatch)
    client = stack.start_client("build-vm-01", [slot])
    stack.wait_card(slot, client)

    first, second = login(slot, PLACEHOLDER), login(slot, PLACEHOLDER)
    assert "CKR_PIN_INCORRECT" in first.stderr  # the card's own answer to the stored PIN
    assert "CKR_PIN_LOCKED" in second.stderr, second.stderr  # the guard, without reaching the card
    assert card_pin_retries(stack) == 2
    token = status(stack)
    server_pin = token["server_pin"]
    assert isinstance(server_pin, dict)
    assert server_pin["state"] == "rejected"
    assert "server PIN rejected by the card" in server_pin["message"]
    assert token["state"] == "guarded"

    load_credential(stack, "123456")  # the operator fixes the credential and reloads
    server = stack.server
    assert server is not None
    offset = len(server.log_text())
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"reload.applied"' in server.log_text()[offset:], timeout=30, what="the reload")
    assert status(stack)["server_pin"]["state"] == "rejected"  # type: ignore[index]  # until the reset
    reset = tokenbridge(stack, "pin-guard", "reset", "codesign", "--json")
    assert reset.returncode == 0, reset.stderr

    data = tmp_path / "data.bin"
    data.write_bytes(b"after the fix")
    signed = pkcs11_sign(slot, data, tmp_path / "sig.bin", pin=PLACEHOLDER, check=False)
    assert signed.returncode == 0, signed.stderr
    assert card_pin_retries(stack) == 3
    assert status(stack)["server_pin"]["state"] == "configured"  # type: ignore[index]
    stack.stop()
    events = audit_events(stack)
    engaged = [e for e in events if e["event"] == "pin_guard.engaged"]
    assert [e["reason"] for e in engaged] == ["server_pin_rejected"]


def test_an_identity_not_on_the_list_needs_its_own_pin_and_is_guarded_as_before(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01", "release-vm"])
    configure(stack, allow=["build-vm-01", "release-vm"], server_pin_for=["build-vm-01"])
    set_card_pin(stack, "123456")
    start_server(stack, load_credential(stack, "123456"), monkeypatch)
    client = stack.start_client("release-vm", [slot])
    stack.wait_card(slot, client)

    placeholder = login(slot, PLACEHOLDER)
    assert placeholder.returncode != 0
    assert card_pin_retries(stack) == 3  # refused by the server: the placeholder never reached the card
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed with my own PIN")
    own = pkcs11_sign(slot, data, tmp_path / "sig.bin", pin="123456", check=False)
    assert own.returncode == 0, own.stderr

    wrong = login(slot, "111111")
    assert "CKR_PIN_INCORRECT" in wrong.stderr
    assert "CKR_PIN_LOCKED" in login(slot, "123456").stderr  # pin_guard.max_failures 1, as before
    assert card_pin_retries(stack) == 2
    token = status(stack)
    assert token["state"] == "guarded"
    assert token["server_pin"]["state"] == "configured"  # type: ignore[index]  # its own PIN failed
    engaged = pin_test(stack)
    assert engaged.returncode == 1 and "PIN guard of 'codesign' is engaged" in engaged.stdout
    assert tokenbridge(stack, "pin-guard", "reset", "codesign").returncode == 0
    floor = pin_test(stack)  # 2 retries left = the floor
    assert floor.returncode == 1
    assert "not risking a retry" in json.loads(floor.stdout)["result"]["message"]
    assert card_pin_retries(stack) == 2  # the test read the counter and stopped there
    stack.stop()
    events = audit_events(stack)
    refused = [e for e in events if e["event"] == "command.refused"]
    assert [e["reason"] for e in refused][:1] == ["server_pin"]
    verified = [e for e in events if e["event"] == "pin.verified"]
    assert [e.get("server_pin", False) for e in verified] == [False, False]  # the PIN test presented none
