"""Test harness: a T1Reader wired back to back with a T1Card over a fake, faulty link.

Each step the reader's block crosses to the card (maybe dropped, corrupted, cut short or
delivered twice), the card answers (the card application transforms each APDU it completes,
optionally after asking for WTX), and the answer crosses back (maybe dropped, corrupted, cut
short or padded). A lost answer reaches the reader as `receive_error()` (a timeout).

Faults model what T=1 is designed to survive: detected corruption, loss, and an immediate
duplicate of a host block. Stale replays of old blocks are not modelled: a 1-bit sequence
number cannot tell them apart (ISO 7816-3 accepts that limit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from protocol._t1_blocks import SType, s_block
from protocol.atr import Checksum
from protocol.t1 import ApduComplete, SendBlock, T1Card, T1Reader

OUT_KINDS = ("drop_out", "corrupt_out", "cut_out", "dup_out")
# resynch_back: the card's answer is replaced by S(RESYNCH request), which the reader answers
# with a resynch of its own (only the reader may resynch, ISO 7816-3 §11.6.3.2 rule 6).
BACK_KINDS = ("drop_back", "corrupt_back", "cut_back", "pad_back", "resynch_back")
KINDS = OUT_KINDS + BACK_KINDS


@dataclass(frozen=True)
class Fault:
    step: int
    kind: str
    pos: int = 0
    mask: int = 0x01  # never 0: a corruption must change the byte


def transform(apdu: bytes, grow: int = 1) -> bytes:
    """The card application: reversed command repeated `grow` times, then 90 00."""
    return (apdu[::-1] * grow)[:65536] + b"\x90\x00"


def _damage(raw: bytes, fault: Fault) -> bytes | None:
    if fault.kind.startswith("drop"):
        return None
    if not raw:
        return raw  # an earlier fault at this step already cut everything
    if fault.kind.startswith("corrupt"):
        out = bytearray(raw)
        out[fault.pos % len(out)] ^= fault.mask
        return bytes(out)
    if fault.kind.startswith("cut"):
        return raw[: fault.pos % len(raw)]
    if fault.kind.startswith("pad"):
        return raw + bytes([fault.mask])
    if fault.kind == "resynch_back":
        # The card's own NAD and EDC kind: a CRC block is 2 bytes longer than its LEN says.
        crc = len(raw) >= 3 and len(raw) - 3 - raw[2] == 2
        return s_block(raw[0], SType.RESYNCH, False, b"", Checksum.CRC if crc else Checksum.LRC)
    return raw


@dataclass
class Link:
    reader: T1Reader
    card: T1Card
    app: Callable[[bytes], bytes] = transform
    wtx_per_command: int = 0
    faults: list[Fault] = field(default_factory=list)
    steps: int = 0  # global step counter; faults are keyed on it
    card_saw: list[bytes] = field(default_factory=list)  # every command the card completed
    wtx_seen: list[int] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # every block the reader produced
    received: list[bytes] = field(default_factory=list)  # every block that reached the reader
    _pending: bytes | None = None
    _wtx_left: int = 0

    def exchange(self, apdu: bytes, max_steps: int = 100_000) -> bytes:
        """Run one APDU exchange; return the response or let T1Error out."""
        result = self._run(self.reader.begin_apdu(apdu), max_steps)
        return result.apdu

    def negotiate_ifsd(self, ifsd: int, max_steps: int = 1000) -> None:
        result = self._run(self.reader.begin_ifs(ifsd), max_steps)
        assert result == ApduComplete(b"")

    def power_cycle(self) -> None:
        self.reader.reset()
        self.card.reset()
        self._pending = None
        self._wtx_left = 0

    def _faults_at(self, step: int, kinds: tuple[str, ...]) -> list[Fault]:
        return [f for f in self.faults if f.step == step and f.kind in kinds]

    def _run(self, block: bytes, max_steps: int) -> ApduComplete:
        for _ in range(max_steps):
            self.sent.append(block)
            step = self.steps
            self.steps += 1
            deliveries: list[bytes] = [block]
            for fault in self._faults_at(step, OUT_KINDS):
                if fault.kind == "dup_out":
                    deliveries = deliveries * 2
                else:
                    damaged = [_damage(d, fault) for d in deliveries]
                    deliveries = [d for d in damaged if d is not None]
            reply: bytes | None = None
            for raw in deliveries:
                reply = self._card_handle(raw)
            for fault in self._faults_at(step, BACK_KINDS):
                reply = None if reply is None else _damage(reply, fault)
            if reply is not None:
                self.received.append(reply)
            result = self.reader.receive_error() if reply is None else self.reader.receive(reply)
            if isinstance(result, ApduComplete):
                return result
            assert isinstance(result, SendBlock)
            if result.wtx:
                self.wtx_seen.append(result.wtx)
            block = result.block
        raise AssertionError(f"t=1 exchange still running after {max_steps} steps")

    def _card_handle(self, raw: bytes) -> bytes | None:
        result = self.card.receive(raw)
        if isinstance(result, SendBlock):
            return result.block
        if isinstance(result, ApduComplete):
            self.card_saw.append(result.apdu)
            self._pending = self.app(result.apdu)
            self._wtx_left = self.wtx_per_command
        elif self._pending is None:
            return None  # Idle with nothing to say: the reader times out
        if self._wtx_left:
            self._wtx_left -= 1
            return self.card.request_wtx(2)
        pending, self._pending = self._pending, None
        assert pending is not None
        return self.card.respond(pending)
