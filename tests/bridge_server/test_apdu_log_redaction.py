"""Per-APDU debug lines show command data only for an allow list of reading commands (issue 13 item 8).

An ENVELOPE-wrapped VERIFY used to put the PIN in the debug log (only PIN-class instructions
were redacted); management keys and imported keys would have followed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import trio
from rails_fakes import SELECT_PIV, PivDevice, apdu, lease, make_manager, make_rails
from server_fakes import Client

from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard

CANARY_PIN = b"739164"
CANARY_KEY = bytes.fromhex("C0FFEE5EC2E7A11CE0")
SECRET_COMMANDS = {
    "envelope-verify": bytes.fromhex("00C200000D0020008008") + CANARY_PIN + b"\xff\xff",
    "envelope-c3": bytes.fromhex("00C3000006") + CANARY_PIN,
    "put-data": bytes.fromhex("00DB3FFF0E5C035FC1055307") + CANARY_KEY[:7],
    "general-authenticate": bytes.fromhex("0087039B0D7C0B8209") + CANARY_KEY,
    "yubikey-import-key": bytes.fromhex("00FE079A0B0109") + CANARY_KEY,
    "yubikey-set-management-key": bytes.fromhex("00FFFFFF0C039B09") + CANARY_KEY,
}


def _leaks(text: str) -> list[str]:
    flat = text.lower().replace(" ", "")
    needles = [CANARY_PIN.hex(), CANARY_KEY[:4].hex(), CANARY_KEY[4:].hex()]
    return [n for n in needles if n in flat] + ([CANARY_PIN.decode()] if CANARY_PIN.decode() in text else [])


@pytest.mark.parametrize("name", sorted(SECRET_COMMANDS))
async def test_a_debug_log_of_a_command_carrying_a_secret_never_shows_its_data(
    nursery: trio.Nursery, tmp_path: Path, name: str
) -> None:
    rails = make_rails(tmp_path)
    manager = make_manager(Hub(), PivDevice(PivCard()), rails)
    await nursery.start(manager.run)
    client = Client(manager.hub, "ops", admin=True)  # an admin: management commands reach the card
    epoch = await lease(manager, client)
    with structlog.testing.capture_logs() as logs:  # keeps DEBUG events
        await apdu(manager, client, epoch, SELECT_PIV)
        await apdu(manager, client, epoch, SECRET_COMMANDS[name])
    lines = [e for e in logs if e["event"] in ("apdu.exchanged", "apdu.refused")]
    assert len(lines) == 2, logs  # the per-APDU debug lines exist
    assert lines[0]["apdu"] == "00 A4 04 00 Lc=09 A0 00 00 03 08 00 00 10 00"  # SELECT's AID is shown
    assert "redacted" in lines[1]["apdu"]
    assert _leaks(repr(logs)) == []
