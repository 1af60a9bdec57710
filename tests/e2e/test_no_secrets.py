"""No secrets anywhere (issue 6): a canary PIN used for a real login-and-sign is found nowhere.

Both daemons run with `--log-level debug`; the card's PIN is the canary. Afterwards the canary
(as text, as hex, and FF-padded as VERIFY sends it) must not appear in either daemon's log,
the audit log, the PIN guard's state, `tokenbridge status --json`, or a forced traceback.
The simulated card's own state file holds the PIN by design (it is the card) and is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import REPO, VpcdSlot

from bridge_admin.local_stack import BridgeStack
from bridge_admin.signing_tools import (
    minimal_pe,
    osslsigncode_sign,
    osslsigncode_verify,
    pkcs11,
    read_certificate_pem,
)
from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.profiles import PROFILES

pytestmark = pytest.mark.e2e

CANARY = "918273"
FORMS = (CANARY, CANARY.encode().hex(), CANARY.encode().hex().upper(), (CANARY.encode() + b"\xff\xff").hex())


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [form for form in FORMS if form.lower() in lowered]


@pytest.fixture
def stack() -> Iterator[BridgeStack]:
    folder = Path(tempfile.mkdtemp(prefix="tb-canary-"))  # short: the control socket lives here
    s = BridgeStack(folder / "stack", log_level="debug")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_canary_pin_through_login_and_sign_is_found_nowhere(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01"])
    stack.write_server_config(allow=["build-vm-01"])
    profile = PROFILES["safenet-5110"]
    PivCard(state_path=stack.workdir / "state" / f"{profile.serial}.json", pin=CANARY)  # the card's PIN
    stack.start_server()
    client = stack.start_client("build-vm-01", [slot])
    stack.wait_card(slot, client)

    cert = read_certificate_pem(slot, "01", tmp_path / "cert.pem")
    program = tmp_path / "build.exe"
    program.write_bytes(minimal_pe(b"\xc3 canary build"))
    signed = tmp_path / "signed.exe"
    osslsigncode_sign(slot, cert, program, signed, pin=CANARY)
    assert "Signature verification: ok" in osslsigncode_verify(cert, signed).stdout
    wrong = pkcs11("--login", "--pin", CANARY[::-1], "--list-objects", slot=slot, check=False)
    assert wrong.returncode != 0  # a wrong PIN too: failure paths log more
    config = str(stack.workdir / "server.yaml")
    status = subprocess.run(
        [sys.executable, "-m", "bridge_admin.cli", "status", "--json", "--config", config],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert '"pin_guard"' in status.stdout
    stack.stop()

    server_log = (stack.workdir / "server.log").read_text()
    client_log = (stack.workdir / "client-build-vm-01.log").read_text()
    assert '"apdu.exchanged"' in server_log  # debug logging really was on, per APDU
    assert '"apdu.sent"' in client_log
    assert "00 20 00 80 Lc=08 <8 bytes redacted>" in server_log  # the VERIFY went through, redacted
    found = {
        "server log": leaks(server_log),
        "client log": leaks(client_log),
        "audit log": leaks((stack.workdir / "audit.jsonl").read_text()),
        "pin guard state": leaks((stack.workdir / "pin-guard.json").read_text()),
        "status --json": leaks(status.stdout),
    }
    assert found == {where: [] for where in found}


CRASH = textwrap.dedent(
    """
    import structlog, trio
    from protocol.runtime.logging import configure_logging
    from bridge_server.config import LeaseConfig, TokenConfig, TokenMatch
    from bridge_server.net.hub import Hub, Subscriber
    from bridge_server.tokens.device import OpenedCard
    from bridge_server.tokens.manager import TokenManager
    from protocol import ccid
    from protocol.runtime.tls import PeerIdentity
    from datetime import UTC, datetime

    configure_logging(level="debug", json=True)
    log = structlog.get_logger("crash")
    PIN = "%s"

    class Driver:
        async def power_on(self): return bytes.fromhex("3BD518008131FE7D8073C82110F4")
        async def power_off(self): pass
        async def slot_present(self): return True
        async def transmit(self, apdu):
            pin_bytes = apdu[5:]  # a local holding the PIN, as a careless driver would have
            raise RuntimeError("card driver bug while sending a VERIFY")

    async def main():
        async def opener():
            async def close(): pass
            return OpenedCard(driver=Driver(), serial="S1", close=close)
        hub = Hub()
        token = TokenConfig(name="codesign", match=TokenMatch(vid=1, pid=2), allow=("vm1",))
        manager = TokenManager(0, token, LeaseConfig(), hub, opener, first_epoch=7)
        ident = PeerIdentity(
            name="vm1", names=("vm1",), fingerprint_sha256="00", not_after=datetime(2100, 1, 1, tzinfo=UTC)
        )
        send, _recv = trio.open_memory_channel(64)
        sub = Subscriber(hub.next_conn_id(), ident, send, admin=False)
        hub.add(sub)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await manager.request_lease(sub)
            await trio.testing.wait_all_tasks_blocked()
            verify = bytes.fromhex("0020008008") + PIN.encode() + b"\\xff\\xff"
            await manager.submit_frame(sub, 7, ccid.xfr_block(1, verify).encode())

    import trio.testing
    try:
        trio.run(main)
    except BaseException:
        log.exception("server.crashed")
        raise
    """
)


def test_a_forced_traceback_while_handling_a_pin_shows_no_pin() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH % CANARY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" in output  # Python's own, from the uncaught exception
    assert '"server.crashed"' in output  # and the logged one
    assert "card driver bug while sending a VERIFY" in output
    assert leaks(output) == []
