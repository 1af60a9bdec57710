"""ISO 7816-3 §11 T=1 block engine, reader side; the card side is re-exported from `_t1_card`.

Theory of operation (reader, as libccid's openct proto-t1.c does it; reference §1.11).

The engine is sans-I/O: `begin_apdu()` returns the first block to send; every block that comes
back is fed to `receive()` (or `receive_error()` when the transport saw a timeout or parity
error), which returns the next block to send (`SendBlock`) or the whole response
(`ApduComplete`). States::

    IDLE --begin_apdu--> SENDING --I-block from card--> RECEIVING --last I-block--> IDLE
    IDLE --begin_ifs---> IFS --S(IFS response) echoing our IFSD--> IDLE
    any error beyond the retry budget --> RESYNCH --S(RESYNCH response)--> SENDING (restart)
    resynch budget spent --> DEAD (T1Error until reset())

Rules:
* The command is cut into I-blocks of at most IFSC bytes, M set on all but the last
  (§11.6.2.3). R(N(R) != N(S)) acknowledges a chained block; R(N(R) == N(S)) asks for it again.
* The card's first I-block acknowledges our last I-block. Its I-blocks are accepted only with
  N(S) == our N(R); each chained one is acknowledged with R(N(R)).
* A block with a bad EDC, NAD, LEN or an unexpected sequence number is answered with an R-block
  carrying the error bits, or with our previous R-block again if that is what we last sent
  (rule 7.2). After `max_retries` such recoveries without progress we send S(RESYNCH request)
  (rule 6); `max_resynchs` per exchange, then the link is DEAD until the next power-on.
* Deviation from libccid: after a resynch we restart the whole command (the card dropped any
  partial chain), never resume mid-chain, so a card can never see a spliced command.
* Except a PIN-class command (VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER, and ENVELOPE,
  which may wrap one): it is never sent again after a resynch; the exchange ends in T1Error
  (promise P2, docs/guardrails.md). Sending the same I-block again when the card asks for it with
  an R-block is not a repeat: see `_on_resynch_reply` for the reasoning.
* Card S-requests: S(WTX) is echoed and the multiplier returned in `SendBlock.wtx`; S(IFS)
  updates IFSC and is echoed; S(ABORT) is echoed and drops any partial response; S(RESYNCH)
  is not the card's to send (§11.6.3.2), so we resynch.
"""

from __future__ import annotations

from enum import Enum
from typing import Final, NoReturn

from protocol._t1_blocks import (
    MAX_COMMAND_APDU,
    MAX_INF,
    MAX_RESPONSE_APDU,
    PCB_R,
    ApduComplete,
    Block,
    Idle,
    Kind,
    RError,
    SendBlock,
    SType,
    crc16,
    decode,
    i_block,
    lrc,
    r_block,
    s_block,
    swap_nibbles,
)
from protocol._t1_blocks import (
    encode as encode_block,
)
from protocol._t1_card import T1Card
from protocol.apdu import PIN_INS
from protocol.atr import Checksum
from protocol.errors import LocalProtocolError, T1Error

__all__ = [
    "AT_MOST_ONCE_INS",
    "MAX_COMMAND_APDU",
    "MAX_INF",
    "MAX_RESPONSE_APDU",
    "ApduComplete",
    "Checksum",
    "Idle",
    "SType",
    "SendBlock",
    "T1Card",
    "T1Reader",
    "at_most_once",
    "crc16",
    "encode_block",
    "i_block",
    "lrc",
    "s_block",
]


# Commands the card application must see at most once: a second VERIFY with a wrong PIN spends a
# second retry. ENVELOPE (C2/C3) may carry any of them, so it counts as one.
AT_MOST_ONCE_INS: Final[frozenset[int]] = PIN_INS | {0xC2, 0xC3}


def at_most_once(apdu: bytes) -> bool:
    """Whether `apdu` must never be sent to the card twice (its INS is PIN-class or ENVELOPE)."""
    return len(apdu) >= 2 and apdu[1] in AT_MOST_ONCE_INS


class _State(Enum):
    IDLE = "idle"
    SENDING = "sending"
    RECEIVING = "receiving"
    RESYNCH = "resynch"
    IFS = "ifs"
    DEAD = "dead"


def _check_ifs(name: str, value: int) -> None:
    if not 1 <= value <= MAX_INF:
        raise ValueError(f"{name} must be 1..{MAX_INF}, got {value}")


class T1Reader:
    """Host/reader side of T=1 (the server's CCID driver at TPDU exchange level)."""

    def __init__(
        self,
        *,
        ifsc: int = 32,
        ifsd: int = 32,
        checksum: Checksum = Checksum.LRC,
        nad: int = 0,
        max_retries: int = 3,
        max_resynchs: int = 3,
        max_response: int = MAX_RESPONSE_APDU,
    ) -> None:
        _check_ifs("ifsc", ifsc)
        _check_ifs("ifsd", ifsd)
        if not 0 <= nad < 0xFF:  # NAD 0xFF is reserved (ISO 7816-3 §11.3.2.1)
            raise ValueError(f"nad must be 0x00..0xFE, got {nad}")
        self._initial_ifsc = ifsc
        self._initial_ifsd = ifsd
        self._checksum = checksum
        self._nad = nad
        self._max_retries = max_retries
        self._max_resynchs = max_resynchs
        self._max_response = max_response
        self.ifsc = ifsc
        self.ifsd = ifsd
        self.reset()

    def reset(self) -> None:
        """Forget everything after a power-on: N(S) = N(R) = 0, IFSC/IFSD from the constructor."""
        self.ifsc = self._initial_ifsc
        self.ifsd = self._initial_ifsd
        self._ns = 0
        self._nr = 0
        self._state = _State.IDLE
        self._apdu = b""
        self._once = False  # the command in flight is PIN-class: never restarted after a resynch
        self._offset = 0  # bytes of the command the card has acknowledged
        self._chunk = 0  # length of the I-block in flight
        self._more = False  # M bit of the I-block in flight
        self._response = bytearray()
        self._last = b""  # the last block we sent (rule 7.2 needs it)
        self._retries = self._max_retries
        self._resynchs = self._max_resynchs
        self._ifs_request = 0

    # -- starting an exchange -------------------------------------------------------------

    def begin_ifs(self, ifsd: int) -> bytes:
        """S(IFS request) offering `ifsd`; its reply goes to receive(), done = ApduComplete(b"").

        If the card never echoes the value, receive() raises T1Error but the link stays usable
        with the old IFSD (libccid treats a failed negotiation as non-fatal for T=1 state).
        """
        self._check_idle()
        if not 1 <= ifsd <= MAX_INF:
            raise LocalProtocolError(f"ifsd must be 1..{MAX_INF}, got {ifsd}")
        self._state = _State.IFS
        self._ifs_request = ifsd
        self._retries = self._max_retries
        return self._send(s_block(self._nad, SType.IFS, False, bytes([ifsd]), self._checksum))

    def begin_apdu(self, apdu: bytes) -> bytes:
        """The first I-block of `apdu` (chained by IFSC)."""
        self._check_idle()
        if not apdu:
            raise LocalProtocolError("cannot send an empty apdu over t=1")
        if len(apdu) > MAX_COMMAND_APDU:
            raise LocalProtocolError(f"apdu is {len(apdu)} bytes, more than {MAX_COMMAND_APDU}")
        self._apdu = bytes(apdu)
        self._once = at_most_once(self._apdu)
        self._retries = self._max_retries
        self._resynchs = self._max_resynchs
        self._restart()
        return self._last

    # -- feeding blocks -------------------------------------------------------------------

    def receive(self, raw: bytes) -> SendBlock | ApduComplete:
        """Handle one block from the card; raises T1Error when the link is dead."""
        self._check_active()
        block = decode(bytes(raw), self._checksum, swap_nibbles(self._nad), self.ifsd)
        if isinstance(block, RError):
            return self._recover(block)
        if self._state is _State.RESYNCH:
            return self._on_resynch_reply(block)
        if self._state is _State.IFS:
            return self._on_ifs_reply(block)
        if block.kind is Kind.S:
            return self._on_s_block(block)
        if block.kind is Kind.R:
            return self._on_r_block(block)
        return self._on_i_block(block)

    def receive_error(self) -> SendBlock:
        """The transport saw a parity/EDC error or a timeout instead of a block."""
        self._check_active()
        return self._recover(RError.EDC)

    # -- internals ------------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self._state is _State.DEAD:
            raise T1Error("t=1 link is dead after failed resynchs; power-cycle the card")
        if self._state is not _State.IDLE:
            raise LocalProtocolError(f"t=1 exchange already in progress (state {self._state.value})")

    def _check_active(self) -> None:
        if self._state is _State.DEAD:
            raise T1Error("t=1 link is dead after failed resynchs; power-cycle the card")
        if self._state is _State.IDLE:
            raise LocalProtocolError("no t=1 exchange in progress")

    def _send(self, block: bytes) -> bytes:
        self._last = block
        return block

    def _send_chunk(self) -> SendBlock:
        chunk = self._apdu[self._offset : self._offset + self.ifsc]
        self._chunk = len(chunk)
        self._more = self._offset + len(chunk) < len(self._apdu)
        return SendBlock(self._send(i_block(self._nad, self._ns, self._more, chunk, self._checksum)))

    def _restart(self) -> None:
        self._state = _State.SENDING
        self._offset = 0
        self._response.clear()
        self._send_chunk()

    def _progress(self) -> None:
        self._retries = self._max_retries

    def _die(self, reason: str) -> NoReturn:
        self._state = _State.DEAD
        self._response.clear()
        raise T1Error(f"t=1 link is dead: {reason}; power-cycle the card")

    def _recover(self, error: RError) -> SendBlock:
        """§11.6.3.2 rule 7: ask again; resynch once the retry budget is spent."""
        if self._state is _State.RESYNCH:
            return self._resynch()
        if self._state is _State.IFS:
            return self._retry_ifs()
        if self._retries <= 0:
            return self._resynch()
        self._retries -= 1
        if self._last[1] & 0xC0 == PCB_R:
            return SendBlock(self._last)  # rule 7.2: repeat our R-block
        return SendBlock(self._send(r_block(self._nad, self._nr, error, self._checksum)))

    def _resynch(self) -> SendBlock:
        if self._resynchs <= 0:
            self._die(f"no answer after {self._max_resynchs} resynchs")
        self._resynchs -= 1
        self._state = _State.RESYNCH
        return SendBlock(self._send(s_block(self._nad, SType.RESYNCH, False, b"", self._checksum)))

    def _retry_ifs(self) -> SendBlock:
        if self._retries <= 0:
            self._state = _State.IDLE
            raise T1Error(f"card did not accept ifsd {self._ifs_request} after {self._max_retries} retries")
        self._retries -= 1
        return SendBlock(self._last)

    def _on_resynch_reply(self, block: Block) -> SendBlock:
        if block.is_response and block.stype == SType.RESYNCH:
            # Rule 6.3: both ends start again from N(S) = N(R) = 0; resend the whole command.
            self._ns = 0
            self._nr = 0
            self._progress()
            if self._once:
                self._refuse_repeat()
            self._restart()
            return SendBlock(self._last)
        return self._resynch()

    def _refuse_repeat(self) -> NoReturn:
        """A PIN-class command is not restarted after a resynch (promise P2).

        ISO 7816-3 §11.6.3.2: the card accepts an I-block only when it arrives intact with
        N(S) equal to the card's N(R); it then hands the command on once its last block is in
        and answers with an I-block (or acknowledges a chained block with R(N(R) != N(S))).
        An R-block whose N(R) equals the N(S) of our block in flight (rule 7.1) is the card
        saying it did not accept that block, so its application never saw the command: sending
        that same I-block again (`_on_r_block`) is the first delivery, not a repeat. A
        duplicated block is harmless too: the card sees the old N(S) and repeats its last block.
        A resynch (rules 6.x, 7.4) follows lost or garbled answers, so we cannot know whether
        the card accepted the last block and compared the PIN (a correct VERIFY whose answer
        was lost and a wrong one both look the same from here). Restarting would spend a
        second retry for one presentation, so we stop: the caller reports a reader error.
        We stop even when the resynch came mid-chain (the card cannot have run the command
        yet): the rule stays simple and a client can always send its PIN again itself.
        """
        self._state = _State.IDLE
        self._response.clear()
        raise T1Error(
            f"pin-class command (ins {self._apdu[1]:02X}) not sent again after a t=1 resynch: "
            "the card may already have counted it; present the pin again"
        )

    def _on_ifs_reply(self, block: Block) -> SendBlock | ApduComplete:
        # libccid: negotiation succeeds only on exactly NAD E1 01 <IFSD> EDC.
        if block.is_response and block.stype == SType.IFS and block.inf == bytes([self._ifs_request]):
            self.ifsd = self._ifs_request
            self._state = _State.IDLE
            return ApduComplete(b"")
        return self._retry_ifs()

    def _on_s_block(self, block: Block) -> SendBlock:
        if block.is_response:
            return self._recover(RError.OTHER)  # we asked nothing
        stype = block.stype
        if stype == SType.IFS and 1 <= block.inf[0] <= MAX_INF:
            self.ifsc = block.inf[0]
            return self._answer(block)
        if stype == SType.WTX and block.inf[0]:
            return SendBlock(self._answer(block).block, wtx=block.inf[0])
        if stype == SType.ABORT:
            # Rule 9: the card abandons its chain. Drop what it sent; a card that keeps
            # aborting spends our retry budget and ends in a resynch.
            if self._retries <= 0:
                return self._resynch()
            self._retries -= 1
            self._response.clear()
            return self._answer(block)
        if stype == SType.WTX:
            return self._recover(RError.OTHER)  # WTX 0 is meaningless
        # Card RESYNCH request, IFS 0/255, unknown S type: libccid resynchs.
        return self._resynch()

    def _answer(self, block: Block) -> SendBlock:
        return SendBlock(self._send(s_block(self._nad, SType(block.stype), True, block.inf, self._checksum)))

    def _on_r_block(self, block: Block) -> SendBlock:
        if self._state is _State.RECEIVING:
            return self._recover(RError.OTHER)  # the card missed our R-block
        if block.seq != self._ns:
            if not self._more:
                return self._recover(RError.OTHER)  # an R-block cannot acknowledge the last block
            self._offset += self._chunk
            self._ns ^= 1
            self._progress()
            return self._send_chunk()
        # The card asks for the block in flight again (rule 7.1); it counts as a retry.
        if self._retries <= 0:
            return self._resynch()
        self._retries -= 1
        return self._send_chunk()

    def _on_i_block(self, block: Block) -> SendBlock | ApduComplete:
        if self._state is _State.SENDING:
            if self._more:
                return self._recover(RError.OTHER)  # the card must acknowledge our chain first
            # Rule 2.2: the card's I-block acknowledges our last I-block.
            self._offset += self._chunk
            self._ns ^= 1
            self._state = _State.RECEIVING
        if block.seq != self._nr:
            return self._recover(RError.OTHER)
        if len(self._response) + len(block.inf) > self._max_response:
            self._die(f"response exceeds {self._max_response} bytes")
        self._response += block.inf
        self._nr ^= 1
        self._progress()
        if block.more:
            return SendBlock(self._send(r_block(self._nad, self._nr, RError.NONE, self._checksum)))
        response = bytes(self._response)
        self._response.clear()
        self._state = _State.IDLE
        return ApduComplete(response)
