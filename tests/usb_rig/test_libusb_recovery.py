"""Recovery from a card that never finishes, through real libusb (issue 15 item 6).

The emulated yubikey5 starts a signature and never answers it (no time extension either); the
slot answers every later command "slot busy" (bError 0xE0). The cold reset cannot get through,
so the server escalates: CCID Abort (ABORT class request, then PC_to_RDR_Abort with the same
bSeq, CCID 1.1 §5.3.1), or, on a reader that stalls the ABORT request as most tokens do, a USB
reset. Either way the next lease finds a working card. The token's `timeouts.max_s` keeps the
test short (each recovery step is bounded by it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from test_libusb_link import sign_then_fresh_lease
from usb_rig.rig import LibusbStack, emulated_token

from protocol import ccid
from protocol.ccid import MessageType

HUNG_MS = 3_600_000  # the signature "takes an hour"


def _run(tmp_path: Path, *, abort_stalls: bool) -> tuple[LibusbStack, Any, list[bytes], list[dict[str, Any]]]:
    with emulated_token(
        tmp_path / "usb", "yubikey5", slow_sign_ms=HUNG_MS, time_extensions=False, abort_stalls=abort_stalls
    ) as token:
        stack = LibusbStack(
            tmp_path / "stack", profiles=["yubikey5"], tokens=[token], token_timeouts={"max_s": 4.0}
        )
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        try:
            stack.start_server()
            failed, answers = trio.run(sign_then_fresh_lease, stack)
        finally:
            stack.stop()
        events = token.events()
    return stack, failed, answers, events


def test_a_hung_slot_is_freed_by_ccid_abort(tmp_path: Path) -> None:
    stack, failed, (select, verify), events = _run(tmp_path, abort_stalls=False)
    assert failed.command_status is ccid.CommandStatus.FAILED
    assert select[-2:] == b"\x90\x00" and verify == b"\x90\x00"
    requests = [e for e in events if e["type"] == "abort_request"]
    aborts = [e for e in events if e["type"] == MessageType.PC_to_RDR_Abort]
    assert requests and aborts and requests[0]["seq"] == aborts[0]["seq"]  # same bSeq, §5.3.1
    assert stack.server is not None
    log = stack.server.log_text()
    assert '"step": "abort"' in log and "card.reset_failed" not in log


def test_a_hung_reader_that_stalls_abort_is_reset_over_usb(tmp_path: Path) -> None:
    stack, failed, (select, verify), events = _run(tmp_path, abort_stalls=True)
    assert failed.command_status is ccid.CommandStatus.FAILED
    assert select[-2:] == b"\x90\x00" and verify == b"\x90\x00"
    assert not [e for e in events if e["type"] == MessageType.PC_to_RDR_Abort]
    assert stack.server is not None
    log = stack.server.log_text()
    assert '"device.usb_reset"' in log and '"step": "usb_reset"' in log
    assert "card.reset_failed" not in log
