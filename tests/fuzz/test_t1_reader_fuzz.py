"""Fuzz the T=1 reader (protocol/t1.py) against a malicious card (reliability §2.1, §7.2 B3).

The card answers every block with arbitrary bytes, a mutation of what a healthy card would
say, or a well-formed but hostile block (WTX/IFS/ABORT/RESYNCH requests, empty chained blocks).
Pass criteria: the reader only returns SendBlock/ApduComplete or raises T1Error; a completed
response never exceeds `max_response`; undecodable garbage kills the link within the retry and
resynch budget. Unbounded well-formed chatter (endless WTX) is bounded by the CCID driver's
per-APDU deadline, fuzzed in test_ccid_driver_fuzz.py.
"""

from __future__ import annotations

from fuzz_support import budget, mutated
from hypothesis import given
from hypothesis import strategies as st

from protocol.atr import Checksum
from protocol.errors import T1Error
from protocol.t1 import ApduComplete, Idle, SendBlock, SType, T1Card, T1Reader, i_block, s_block

MAX_RESPONSE = 600
NAD = 0  # the card answers with SAD/DAD swapped: still 0


@st.composite
def _hostile_block(draw: st.DrawFn, checksum: Checksum, healthy: bytes | None) -> bytes:
    kind = draw(st.sampled_from(("garbage", "mutated", "healthy", "s_request", "i_block")))
    if kind == "garbage" or (healthy is None and kind in ("mutated", "healthy")):
        return draw(st.binary(max_size=300))
    if kind == "mutated":
        return draw(mutated(healthy or b"", max_edits=3))
    if kind == "healthy":
        return healthy or b""
    if kind == "s_request":
        stype = draw(st.sampled_from(list(SType)))
        inf = draw(st.binary(max_size=2))
        return s_block(NAD, stype, draw(st.booleans()), inf, checksum)
    inf = draw(st.binary(max_size=254))
    return i_block(NAD, draw(st.integers(0, 1)), draw(st.booleans()), inf, checksum)


@budget(300)
@given(
    data=st.data(),
    checksum=st.sampled_from(list(Checksum)),
    ifsc=st.integers(1, 254),
    apdu=st.binary(min_size=1, max_size=300),
)
def test_reader_against_a_malicious_card_only_completes_or_raises_t1_error(
    data: st.DataObject, checksum: Checksum, ifsc: int, apdu: bytes
) -> None:
    reader = T1Reader(ifsc=ifsc, ifsd=254, checksum=checksum, max_response=MAX_RESPONSE)
    card = T1Card(ifsc=254, checksum=checksum)
    block = reader.begin_apdu(apdu)
    for _ in range(40):
        healthy = _healthy_answer(card, block)
        answer = data.draw(_hostile_block(checksum, healthy))
        try:
            step = reader.receive(answer)
        except T1Error:
            return
        if isinstance(step, ApduComplete):
            assert len(step.apdu) <= MAX_RESPONSE
            return
        assert isinstance(step, SendBlock)
        assert 0 <= step.wtx <= 255
        block = step.block


def _healthy_answer(card: T1Card, block: bytes) -> bytes | None:
    """What an honest card would answer (None once it is confused by earlier hostility)."""
    try:
        step = card.receive(block)
        if isinstance(step, ApduComplete):
            return card.respond(step.apdu[::-1] + b"\x90\x00")
    except Exception:
        return None
    return None if isinstance(step, Idle) else step.block


@budget(200)
@given(
    checksum=st.sampled_from(list(Checksum)),
    garbage=st.lists(st.binary(max_size=8), min_size=1, max_size=1),
)
def test_undecodable_answers_kill_the_link_within_the_retry_budget(
    checksum: Checksum, garbage: list[bytes]
) -> None:
    reader = T1Reader(checksum=checksum, max_retries=3, max_resynchs=3)
    reader.begin_apdu(b"\x00\xa4\x04\x00")
    # Blocks shorter than prologue + EDC are never valid: each one costs a retry.
    bound = (3 + 1) * (3 + 2)
    for _step in range(bound):
        try:
            reader.receive(garbage[0][:3])
        except T1Error:
            return
    raise AssertionError(f"link still alive after {bound} undecodable blocks")
