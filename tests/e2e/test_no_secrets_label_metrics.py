"""S8: a canary key label and a canary PIN, through a real login-and-sign, are in no output,
the Prometheus metrics included (reliability-anchors §7.3 S8, §8 P4).

The card's certificates carry a canary in their subject (what OpenSC shows as the key's
subject and what a customer would name after a product or a person): it crosses the bridge in
every GET DATA answer, so it proves response data is redacted as well as VERIFY data. The test
first checks the canary really reached the build machine (the certificate read back through
pkcs11-tool), then searches both daemons' debug logs, the audit log, the PIN guard state,
`tokenbridge status --json` and `GET /metrics` for it, as text and as hex.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e_stack import VpcdSlot

from bridge_admin.local_stack import BridgeStack, free_port
from bridge_admin.signing_tools import (
    minimal_pe,
    osslsigncode_sign,
    osslsigncode_verify,
    read_certificate_pem,
)
from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.piv_state import KEY_OBJECTS, PivState, cert_object
from bridge_server.simulator.profiles import PROFILES
from protocol.runtime.config import dump_yaml

pytestmark = pytest.mark.e2e

PIN = "739146"
LABEL = "canary-key-label-5f3a9c"


def _forms(text: str) -> tuple[str, ...]:
    raw = text.encode()
    return (text, raw.hex(), raw.hex().upper())


FORMS = {"pin": (*_forms(PIN), (PIN.encode() + b"\xff\xff").hex()), "key label": _forms(LABEL)}


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [
        f"{what} as {form!r}" for what, forms in FORMS.items() for form in forms if form.lower() in lowered
    ]


def _labelled_certificate(key: object) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LABEL)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2049, 12, 31, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def _card_with_canaries(state_path: Path) -> None:
    PivCard(state_path=state_path, pin=PIN)
    state = PivState.from_json(state_path.read_text())
    for slot, tag in KEY_OBJECTS.items():
        state.objects[tag] = cert_object(_labelled_certificate(state.keys[slot]))
    state.save(state_path)


@pytest.fixture
def stack() -> Iterator[BridgeStack]:
    folder = Path(tempfile.mkdtemp(prefix="tb-label-"))  # short: the control socket lives here
    s = BridgeStack(folder / "stack", log_level="debug")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_canary_key_label_and_pin_are_in_no_log_audit_status_or_metrics(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01"])
    config = stack.write_server_config(allow=["build-vm-01"])
    metrics_port = free_port()
    document = yaml.safe_load(config.read_text())
    document["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    config.write_text(dump_yaml(document))
    _card_with_canaries(stack.workdir / "state" / f"{PROFILES['safenet-5110'].serial}.json")
    stack.start_server()
    client = stack.start_client("build-vm-01", [slot])
    stack.wait_card(slot, client)

    cert = read_certificate_pem(slot, "01", tmp_path / "cert.pem")
    subject = x509.load_pem_x509_certificate(cert.read_bytes()).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == LABEL  # it crossed the bridge
    program = tmp_path / "build.exe"
    program.write_bytes(minimal_pe(b"\xc3 label canary build"))
    signed = tmp_path / "signed.exe"
    osslsigncode_sign(slot, cert, program, signed, pin=PIN)
    assert "Signature verification: ok" in osslsigncode_verify(cert, signed).stdout

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as answer:
        metrics = answer.read().decode()
    assert "tokenbridge_" in metrics  # the real exposition, not an error page
    status = subprocess.run(
        [sys.executable, "-m", "bridge_admin.cli", "status", "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    stack.stop()

    server_log = (stack.workdir / "server.log").read_text()
    client_log = (stack.workdir / "client-build-vm-01.log").read_text()
    assert '"apdu.exchanged"' in server_log and '"apdu.sent"' in client_log  # debug was on
    found = {
        "server log": leaks(server_log),
        "client log": leaks(client_log),
        "audit log": leaks((stack.workdir / "audit.jsonl").read_text()),
        "pin guard state": leaks((stack.workdir / "pin-guard.json").read_text()),
        "status --json": leaks(status.stdout),
        "metrics": leaks(metrics),
    }
    assert found == {where: [] for where in found}


def test_the_leak_search_finds_the_canaries_in_every_form() -> None:
    """The search itself can fail: each form of each canary, in mixed case, is found."""
    assert leaks(f"x {LABEL.upper()} y")
    assert leaks(LABEL.encode().hex().upper())
    assert leaks("apdu=00200080083733393134" + "36FFFF")
    assert not leaks("apdu=00 20 00 80 Lc=08 <8 bytes redacted>")
