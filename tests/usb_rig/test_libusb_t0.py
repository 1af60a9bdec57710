"""A T=0 card at a TPDU reader, through real libusb (issue 15: T=0 ATRs in the rig).

The rig-only profile safenet-5110-t0 puts a card whose ATR offers T=0 only (no TD1) on the
5110's TPDU reader. The server must pick T=0, send T=0 SetParameters (5 bytes), no S(IFS),
carry a case-4 command (SELECT, GENERAL AUTHENTICATE) as case 3 and fetch the answer with GET
RESPONSE after 61xx.
"""

from __future__ import annotations

from pathlib import Path

from test_libusb_session import run_session
from usb_rig.rig import ALL_PROFILES, emulated_token

from protocol.ccid import MessageType

PROFILE = "safenet-5110-t0"


def test_a_t0_card_signs_through_the_server_on_real_libusb(tmp_path: Path) -> None:
    with emulated_token(tmp_path / "usb", PROFILE) as token:
        stack, atr, (select, verify, signature) = run_session(tmp_path, token)
        events = token.events()
    assert atr == ALL_PROFILES[PROFILE].atr
    assert select[-2:] == b"\x90\x00" and verify == b"\x90\x00"
    assert signature[0] == 0x7C and signature[-2:] == b"\x90\x00"
    xfr = [e["head"] for e in events if e["type"] == MessageType.PC_to_RDR_XfrBlock]
    assert not [h for h in xfr if h[2:] == "c1"]  # no T=1 S(IFS request): this is T=0
    assert xfr.count("00c0") >= 2  # GET RESPONSE after 61xx (SELECT and the signature)
    assert stack.server is not None
    assert '"protocol": 0' in stack.server.log_text()
