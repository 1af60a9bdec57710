"""ISO 7816-3 §11 T=1 block engine, card side (used by the simulated token). Import from `protocol.t1`.

Theory of operation: the mirror image of `T1Reader`. Modes::

    RECEIVING --last I-block of a command--> PROCESSING   (receive() returns ApduComplete)
    PROCESSING --request_wtx()--> PROCESSING --S(WTX response)--> (receive() returns Idle)
    PROCESSING --respond()--> SENDING (chained) or RECEIVING (single block)
    SENDING --R(N(R) != N(S)) ack--> next chunk ... last chunk --> RECEIVING

Rules:
* A host I-block is accepted only with N(S) == our N(R); a chained one is acknowledged with
  R(N(R)). An I-block with the other N(S) is the block we accepted last, sent again because our
  answer was lost: we repeat our last block.
* The response is chained in I-blocks of at most IFSD bytes (updated by S(IFS request)).
  R(N(R) == N(S) of our last I-block) asks for it again; R(N(R) != N(S)) acknowledges it.
* A block with a bad EDC, NAD or LEN earns R(N(R)) with the error bits, except while our
  S(WTX request) is unanswered: then the request is repeated.
* S(RESYNCH request) resets N(S) = N(R) = 0 and drops any partial command or response.
* A command longer than `max_command` is refused: the card stops accepting blocks (R-block
  with "other error") until a resynch or reset, so the host gives up instead of the card ever
  seeing a truncated command.
"""

from __future__ import annotations

from enum import Enum

from protocol._t1_blocks import (
    MAX_COMMAND_APDU,
    MAX_INF,
    MAX_RESPONSE_APDU,
    ApduComplete,
    Block,
    Idle,
    Kind,
    RError,
    SendBlock,
    SType,
    decode,
    i_block,
    r_block,
    s_block,
    swap_nibbles,
)
from protocol.atr import DEFAULT_IFSC, Checksum
from protocol.errors import LocalProtocolError


class _Mode(Enum):
    RECEIVING = "receiving"
    PROCESSING = "processing"
    SENDING = "sending"


class T1Card:
    """Card side of T=1: reassembles commands, chains responses, answers S-blocks."""

    def __init__(
        self,
        *,
        ifsc: int = MAX_INF,
        checksum: Checksum = Checksum.LRC,
        nad: int = 0,
        max_command: int = MAX_COMMAND_APDU,
    ) -> None:
        if not 1 <= ifsc <= MAX_INF:
            raise ValueError(f"ifsc must be 1..{MAX_INF}, got {ifsc}")
        if not 0 <= nad < 0xFF:  # NAD 0xFF is reserved (ISO 7816-3 §11.3.2.1)
            raise ValueError(f"nad must be 0x00..0xFE, got {nad}")
        self.ifsc = ifsc  # the most the card accepts per block (announced in its ATR)
        self._checksum = checksum
        self._nad = nad
        self._reply_nad = swap_nibbles(nad)
        self._max_command = max_command
        self.ifsd = DEFAULT_IFSC
        self.reset()

    def reset(self) -> None:
        """Power-on: N(S) = N(R) = 0, IFSD back to the default 32, nothing pending."""
        self.ifsd = DEFAULT_IFSC
        self._resynch_state()
        self._last_sent: bytes | None = None

    def _resynch_state(self) -> None:
        self._ns = 0
        self._nr = 0
        self._mode = _Mode.RECEIVING
        self._command = bytearray()
        self._rejecting = False  # a command overflowed max_command
        self._response = b""
        self._offset = 0  # start of the chunk in flight
        self._chunk = 0
        self._last_i: bytes | None = None  # our last I-block, until the host acknowledges it
        self._wtx_request: bytes | None = None

    # -- public API -----------------------------------------------------------------------

    def receive(self, raw: bytes) -> SendBlock | ApduComplete | Idle:
        """Handle one block from the host."""
        if self._mode is _Mode.PROCESSING and self._wtx_request is None:
            raise LocalProtocolError("t=1 card must respond() or request_wtx() before receiving again")
        block = decode(bytes(raw), self._checksum, self._nad, self.ifsc)
        if isinstance(block, RError):
            if self._wtx_request is not None:
                return self._reply(self._wtx_request)
            return self._reply(r_block(self._reply_nad, self._nr, block, self._checksum))
        if block.kind is Kind.I:
            return self._on_i_block(block)
        if block.kind is Kind.R:
            return self._on_r_block(block)
        return self._on_s_block(block)

    def respond(self, rapdu: bytes) -> bytes:
        """The first block of the (possibly chained) response to the command just received."""
        if self._mode is not _Mode.PROCESSING:
            raise LocalProtocolError(f"t=1 card has no command to answer (mode {self._mode.value})")
        if len(rapdu) > MAX_RESPONSE_APDU:
            raise LocalProtocolError(f"response is {len(rapdu)} bytes, more than {MAX_RESPONSE_APDU}")
        self._wtx_request = None
        self._response = bytes(rapdu)
        self._offset = 0
        self._chunk = 0
        return self._send_chunk().block

    def request_wtx(self, multiplier: int) -> bytes:
        """S(WTX request) asking the host for `multiplier` x BWT; send it before respond()."""
        if self._mode is not _Mode.PROCESSING:
            raise LocalProtocolError(
                f"t=1 card can only ask for wtx while processing (mode {self._mode.value})"
            )
        if not 1 <= multiplier <= 0xFF:
            raise LocalProtocolError(f"wtx multiplier must be 1..255, got {multiplier}")
        self._wtx_request = s_block(self._reply_nad, SType.WTX, False, bytes([multiplier]), self._checksum)
        return self._reply(self._wtx_request).block

    # -- internals ------------------------------------------------------------------------

    def _reply(self, block: bytes) -> SendBlock:
        self._last_sent = block
        return SendBlock(block)

    def _error(self, error: RError = RError.OTHER) -> SendBlock:
        return self._reply(r_block(self._reply_nad, self._nr, error, self._checksum))

    def _repeat_last(self) -> SendBlock:
        if self._wtx_request is not None:
            return self._reply(self._wtx_request)
        if self._last_sent is None:
            return self._error()
        return self._reply(self._last_sent)

    def _send_chunk(self) -> SendBlock:
        self._offset += self._chunk
        chunk = self._response[self._offset : self._offset + self.ifsd]
        self._chunk = len(chunk)
        more = self._offset + len(chunk) < len(self._response)
        self._last_i = i_block(self._reply_nad, self._ns, more, chunk, self._checksum)
        self._ns ^= 1
        # Our last block needs no acknowledgement: the host's next command is one (rule 2.2).
        self._mode = _Mode.SENDING if more else _Mode.RECEIVING
        return self._reply(self._last_i)

    def _on_i_block(self, block: Block) -> SendBlock | ApduComplete:
        if block.seq != self._nr:
            return self._repeat_last()
        if self._mode is not _Mode.RECEIVING or self._rejecting:
            return self._error()  # the host may not send while we own the chain
        if len(self._command) + len(block.inf) > self._max_command:
            self._command.clear()
            self._rejecting = True
            return self._error()
        self._command += block.inf
        self._nr ^= 1
        self._last_i = None  # the host's I-block acknowledges ours
        if block.more:
            return self._reply(r_block(self._reply_nad, self._nr, RError.NONE, self._checksum))
        command = bytes(self._command)
        self._command.clear()
        self._mode = _Mode.PROCESSING
        return ApduComplete(command)

    def _on_r_block(self, block: Block) -> SendBlock:
        last_ns = None if self._last_i is None else (self._last_i[1] >> 6) & 1
        if self._mode is _Mode.SENDING and block.seq != last_ns:
            return self._send_chunk()  # acknowledged: next chunk
        if self._wtx_request is not None:
            return self._reply(self._wtx_request)
        if self._last_i is not None and block.seq == last_ns:
            return self._reply(self._last_i)  # rule 7.1: the host wants it again
        # The host lost our R-block (or never got one): tell it which I-block we expect.
        return self._reply(r_block(self._reply_nad, self._nr, RError.NONE, self._checksum))

    def _on_s_block(self, block: Block) -> SendBlock | Idle:
        if block.is_response:
            wtx = self._wtx_request
            if wtx is not None and block.stype == SType.WTX and block.inf == wtx[3:4]:
                self._wtx_request = None
                return Idle()
            return self._repeat_last()  # a stray or duplicated response
        stype = block.stype
        if stype == SType.RESYNCH:
            self._resynch_state()
        elif stype == SType.IFS and 1 <= block.inf[0] <= MAX_INF:
            self.ifsd = block.inf[0]
        elif stype == SType.ABORT:
            self._command.clear()
            if self._mode is _Mode.SENDING:
                self._mode = _Mode.RECEIVING
                self._last_i = None
        else:
            return self._error()  # S(WTX request) is the card's to send; unknown types
        return self._reply(s_block(self._reply_nad, SType(stype), True, block.inf, self._checksum))
