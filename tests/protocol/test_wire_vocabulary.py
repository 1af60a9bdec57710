"""The wire's vocabulary is the one docs/protocol.md gives peers: codes, reasons, version, port."""

from __future__ import annotations

import re
from pathlib import Path

from protocol.wire import DEFAULT_PORT, HEARTBEAT_MISSES, PROTOCOL_VERSION, ErrorCode, LeaseEndReason

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(title)
    return DOC[start : DOC.index("\n#", start + len(title))]


def test_every_error_code_is_the_one_the_protocol_documents() -> None:
    table = re.findall(r"^\| `([a-z_]+)` \|", _section("## 6. Heartbeats and errors"), flags=re.M)
    assert [code.value for code in ErrorCode] == table


def test_every_lease_end_reason_is_documented_and_queue_timeout_only_ends_a_wait() -> None:
    section = _section("### 5.3 How a lease ends")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", section, re.M))
    assert set(rows) == {reason.value for reason in LeaseEndReason}
    # a waiter's end (Dequeued): it never comes as LeaseEnded
    assert rows["queue_timeout"] == "no"


def test_version_port_and_heartbeat_misses_are_the_documented_ones() -> None:
    assert f"wire protocol, version {PROTOCOL_VERSION}\n" in DOC.splitlines(keepends=True)[0]
    assert f"**{DEFAULT_PORT}**" in DOC
    assert f"silent for {HEARTBEAT_MISSES} intervals is dead" in DOC
    assert (PROTOCOL_VERSION, DEFAULT_PORT, HEARTBEAT_MISSES) == (2, 7447, 3)
