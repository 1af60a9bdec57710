"""PPS where libccid negotiates one (issue 15 item 5), through real libusb.

The rig-only profile safenet-5110-fips has the reader of the eToken 5110+ FIPS (08E6:34CF, from
its descriptor dump): TPDU level, no automatic PPS, 12903 bps by default, up to 825806 bps, and
a GET_DATA_RATES table. Its card's TA1 0x96 (Fi 512, Di 32) means 300000 bps at 4.8 MHz, 23
times the default. The emulated card confirms a valid PPS and then runs at PPS1's rate; a reader
left at another rate than the card gets no answer (the simulator answers ICC_MUTE).
"""

from __future__ import annotations

from pathlib import Path

from test_libusb_session import run_session
from usb_rig.rig import ALL_PROFILES, emulated_token

from protocol.ccid import MessageType

PROFILE = "safenet-5110-fips"


def test_the_server_negotiates_ta1_with_a_pps_and_sets_the_reader_to_it(tmp_path: Path) -> None:
    with emulated_token(tmp_path / "usb", PROFILE) as token:
        stack, atr, (select, verify, signature) = run_session(tmp_path, token)
        events = token.events()
    assert atr == ALL_PROFILES[PROFILE].atr
    assert select[-2:] == b"\x90\x00" and verify == b"\x90\x00"
    assert signature[0] == 0x7C and signature[-2:] == b"\x90\x00"
    kinds = [(e["type"], e["head"]) for e in events]
    power_on = kinds.index((MessageType.PC_to_RDR_IccPowerOn, ""))
    # ISO 7816-3 §9.2: PPSS FF, PPS0 0x11 (T=1, PPS1 follows), PPS1 = TA1 0x96, then PCK.
    assert kinds[power_on + 1] == (MessageType.PC_to_RDR_XfrBlock, "ff11")
    set_parameters = [head for kind, head in kinds if kind == MessageType.PC_to_RDR_SetParameters]
    assert set_parameters and all(head.startswith("96") for head in set_parameters)  # bmFindexDindex
    assert stack.server is not None
    assert '"card.pps_negotiated"' in stack.server.log_text()
