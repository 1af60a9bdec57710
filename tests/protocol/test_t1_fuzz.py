"""T=1 under a faulty link: every exchange completes with the right response or ends in T1Error,
within a bounded number of steps; no APDU is ever delivered wrong at either end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from t1_link import KINDS, Fault, Link, transform

from protocol._t1_blocks import Block, Kind, decode, encode
from protocol.atr import Checksum
from protocol.errors import T1Error
from protocol.t1 import AT_MOST_ONCE_INS, ApduComplete, Idle, SendBlock, T1Card, T1Reader, at_most_once

MAX_RETRIES = 3
MAX_RESYNCHS = 3


def _step_bound(apdu: bytes, response_len: int, ifsc: int, ifsd: int, wtx: int) -> int:
    """Steps one exchange may take: each pass over the chains (plus WTX) may absorb
    MAX_RETRIES recoveries per block of progress, and a resynch starts a new pass. Faults that
    make the card repeat an S(WTX request) cost a step without costing the reader a retry,
    so the caller adds one step per fault."""
    blocks = -(-len(apdu) // ifsc) + max(1, -(-response_len // ifsd)) + wtx
    per_pass = blocks * (MAX_RETRIES + 2) + MAX_RETRIES + 1
    return (MAX_RESYNCHS + 1) * (per_pass + 1)


def _exchange_checked(link: Link, apdu: bytes, grow: int, wtx: int) -> bool:
    """One exchange under faults; True if it completed, False if it ended in T1Error."""
    expected = transform(apdu, grow)
    bound = _step_bound(apdu, len(expected), link.reader.ifsc, link.reader.ifsd, wtx) + len(link.faults)
    link.card_saw.clear()
    start = link.steps
    try:
        got = link.exchange(apdu, max_steps=bound)
    except T1Error:
        completed = False
    else:
        assert got == expected
        completed = True
    assert link.steps - start <= bound
    # The card never completes anything but the command that was sent.
    assert all(seen == apdu for seen in link.card_saw)
    if at_most_once(apdu):  # promise P2: a PIN-class command reaches the card at most once
        assert len(link.card_saw) <= 1
    return completed


@st.composite
def _fault_bursts(draw: st.DrawFn) -> list[Fault]:
    """Faults come in bursts on consecutive steps, so retries run out and resynchs happen."""
    faults = []
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(0, 30))
        for offset in range(draw(st.integers(1, 6))):
            kind = draw(st.sampled_from(KINDS))
            faults.append(Fault(start + offset, kind, draw(st.integers(0, 300)), draw(st.integers(1, 255))))
    return faults


def _pin_commands() -> st.SearchStrategy[bytes]:
    """Commands the reader must never restart (promise P2), with bodies long enough to chain."""
    ins = st.sampled_from(sorted(AT_MOST_ONCE_INS))
    return st.builds(lambda i, body: bytes([0x00, i]) + body, ins, st.binary(max_size=300))


@settings(max_examples=400, deadline=None)
@given(
    checksum=st.sampled_from(list(Checksum)),
    ifsc=st.integers(1, 254),
    ifsd=st.integers(1, 254),
    apdus=st.lists(st.one_of(st.binary(min_size=1, max_size=400), _pin_commands()), min_size=1, max_size=3),
    grow=st.integers(1, 3),
    wtx=st.integers(0, 2),
    faults=_fault_bursts(),
)
def test_exchanges_survive_or_fail_cleanly_under_link_faults(checksum, ifsc, ifsd, apdus, grow, wtx, faults):
    link = Link(
        T1Reader(ifsc=ifsc, checksum=checksum, max_retries=MAX_RETRIES, max_resynchs=MAX_RESYNCHS),
        T1Card(ifsc=ifsc, checksum=checksum),
        app=lambda apdu: transform(apdu, grow),
        wtx_per_command=wtx,
        faults=faults,
    )
    _negotiate(link, ifsd)
    for apdu in apdus:
        if not _exchange_checked(link, apdu, grow, wtx):
            link.power_cycle()
            _negotiate(link, ifsd)
    # Once the faults are spent, the link must work.
    link.faults = []
    if link.reader.ifsd != ifsd:
        link.power_cycle()
        link.negotiate_ifsd(ifsd)
    assert _exchange_checked(link, apdus[0], grow, wtx)


def _negotiate(link: Link, ifsd: int) -> None:
    try:
        link.negotiate_ifsd(ifsd, max_steps=MAX_RETRIES + 1)
    except T1Error:
        # A failed IFSD negotiation is not fatal; both ends keep the default IFSD 32. Only
        # start over with a clean card if the card did take the new value.
        if link.card.ifsd != link.reader.ifsd:
            link.power_cycle()


@pytest.mark.parametrize("kind", KINDS)
def test_any_single_fault_at_any_step_is_recovered(kind):
    """One fault anywhere in an exchange that chains both ways with WTX never kills the link."""
    apdu = bytes(range(40))

    def make(faults: list[Fault]) -> Link:
        link = Link(T1Reader(ifsc=16), T1Card(ifsc=16), wtx_per_command=1, faults=faults)
        link.negotiate_ifsd(16)
        return link

    clean = make([])
    start = clean.steps
    assert clean.exchange(apdu) == transform(apdu)
    assert clean.exchange(apdu[:5]) == transform(apdu[:5])
    total = clean.steps - start
    for step in range(start, start + total + 1):
        for pos in (0, 1, 2, 3, 5, 100):
            link = make([Fault(step, kind, pos, 0x41)])
            assert link.exchange(apdu) == transform(apdu), (step, pos)
            assert link.exchange(apdu[:5]) == transform(apdu[:5]), (step, pos)
            assert all(seen in (apdu, apdu[:5]) for seen in link.card_saw)


def test_a_dead_card_ends_in_t1_error_within_bound():
    link = Link(T1Reader(ifsc=8), T1Card(ifsc=8))
    link.faults = [Fault(step, "drop_out") for step in range(100)]
    with pytest.raises(T1Error, match="dead"):
        link.exchange(bytes(20), max_steps=MAX_RETRIES + MAX_RESYNCHS + 1)
    assert link.steps == MAX_RETRIES + MAX_RESYNCHS + 1


# -- every (state, input) pair: arbitrary blocks thrown at each engine --------------------

_PCBS = [0x00, 0x20, 0x40, 0x60, 0x80, 0x81, 0x82, 0x90, 0x91, 0x92, 0xA0, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4]
_PCBS += [0xE0, 0xE1, 0xE2, 0xE3]


@st.composite
def _inputs(draw: st.DrawFn, checksum: Checksum, nad: int) -> bytes | None:
    """None = timeout; else raw bytes: garbage, or a block with a valid EDC and any PCB."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return None
    if choice == 1:
        return draw(st.binary(max_size=12))
    pcb = draw(st.sampled_from(_PCBS) | st.integers(0, 255))
    inf = draw(st.binary(max_size=3) | st.just(b"\x02") | st.just(b"\xfe"))
    return encode(nad, pcb, inf, checksum)


@settings(max_examples=300, deadline=None)
@given(checksum=st.sampled_from(list(Checksum)), ifsc=st.integers(1, 16), data=st.data())
def test_reader_survives_any_input_in_any_state(checksum, ifsc, data):
    reader = T1Reader(ifsc=ifsc, checksum=checksum)
    apdu = bytes(range(1, 41))
    reader.begin_apdu(apdu)
    for raw in data.draw(st.lists(_inputs(checksum, 0), max_size=60)):
        try:
            result = reader.receive_error() if raw is None else reader.receive(raw)
        except T1Error:
            reader.reset()
            reader.begin_apdu(apdu)
            continue
        if isinstance(result, ApduComplete):
            reader.begin_apdu(apdu)
            continue
        block = decode(result.block, checksum, 0, 254)
        assert isinstance(block, Block), result.block.hex()
        if block.kind is Kind.I:
            assert 0 < len(block.inf) <= reader.ifsc
            assert block.inf in apdu  # only ever pieces of the command


@settings(max_examples=300, deadline=None)
@given(checksum=st.sampled_from(list(Checksum)), data=st.data())
def test_card_survives_any_input_in_any_state(checksum, data):
    card = T1Card(ifsc=16, checksum=checksum, max_command=100)
    for raw in data.draw(st.lists(_inputs(checksum, 0), max_size=60)):
        if raw is None:
            continue
        result = card.receive(raw)
        if isinstance(result, ApduComplete):
            assert len(result.apdu) <= 100
            reply = card.respond(transform(result.apdu))
        elif isinstance(result, SendBlock):
            reply = result.block
        else:
            assert isinstance(result, Idle)
            continue
        assert isinstance(decode(reply, checksum, 0, 254), Block), reply.hex()
