"""The simulated card's T=0 side at a TPDU reader: case 4 carried as case 3, 61xx, GET RESPONSE."""

from __future__ import annotations

from bridge_server.simulator.t0_card import T0Tpdu


def test_response_data_of_a_case_3_tpdu_is_fetched_with_get_response_256_bytes_at_a_time() -> None:
    t0 = T0Tpdu(lambda apdu: bytes(300) + b"\x90\x00")
    assert t0.handle(bytes.fromhex("0087119D03 7C0182")) == b"\x61\x00"  # 300 bytes wait: 256 or more
    first = t0.handle(bytes.fromhex("00C0000000"))
    assert len(first) == 256 + 2 and first[-2:] == b"\x61\x2c"  # 44 left
    assert t0.handle(bytes.fromhex("00C000002C")) == bytes(44) + b"\x90\x00"


def test_a_case_2_tpdu_gets_its_data_at_once_and_a_bad_length_is_refused() -> None:
    t0 = T0Tpdu(lambda apdu: b"\x01\x02\x90\x00")
    assert t0.handle(bytes.fromhex("00CA010202")) == b"\x01\x02\x90\x00"
    assert t0.handle(bytes.fromhex("00DA0102 05 0102")) == b"\x67\x00"  # P3 says 5, 2 follow
