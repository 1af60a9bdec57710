"""How long the server waits for a slow card, through real libusb (issue 15 item 2).

The emulated yubikey5 signs slowly; its ATR-derived frame wait is 1.51 s (libccid's value),
3 s with our floor. A card that announces the work with time extensions is waited for; a
silent one is waited for when the token's `timeouts.frame_s` says so.
"""

from __future__ import annotations

from pathlib import Path

import trio
from test_libusb_link import sign_twice
from usb_rig.rig import LibusbStack, emulated_token

SLOW_SIGN_MS = 5000  # beyond the 3 s frame wait


def _run(
    tmp_path: Path, *, time_extensions: bool, timeouts: dict[str, float] | None
) -> tuple[LibusbStack, list[bytes]]:
    with emulated_token(
        tmp_path / "usb", "yubikey5", slow_sign_ms=SLOW_SIGN_MS, time_extensions=time_extensions
    ) as token:
        stack = LibusbStack(
            tmp_path / "stack", profiles=["yubikey5"], tokens=[token], token_timeouts=timeouts
        )
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        try:
            stack.start_server()
            answers = trio.run(sign_twice, stack)
        finally:
            stack.stop()
    return stack, answers


def test_time_extensions_keep_the_server_waiting_past_the_frame_wait(tmp_path: Path) -> None:
    stack, (_select, verify, first, second) = _run(tmp_path, time_extensions=True, timeouts=None)
    assert verify == b"\x90\x00"
    assert first[0] == 0x7C and first[-2:] == b"\x90\x00"
    assert second[0] == 0x7C and second[-2:] == b"\x90\x00"
    assert stack.server is not None
    assert "card.reset" not in stack.server.log_text()


def test_a_configured_frame_wait_lets_a_silent_slow_card_finish(tmp_path: Path) -> None:
    timeouts = {"frame_s": 8.0, "max_s": 30.0}
    stack, (_select, verify, first, second) = _run(tmp_path, time_extensions=False, timeouts=timeouts)
    assert verify == b"\x90\x00"
    assert first[0] == 0x7C and first[-2:] == b"\x90\x00"
    assert second[0] == 0x7C and second[-2:] == b"\x90\x00"
    assert stack.server is not None
    assert "card.reset" not in stack.server.log_text()
