"""T=1 block encoding, decoding and error detection codes (ISO 7816-3 §11.3, reference §1.11).

Shared by the reader engine (`protocol.t1.T1Reader`) and the card engine
(`protocol._t1_card.T1Card`). Import the public names from `protocol.t1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final

from protocol.atr import Checksum

MAX_INF: Final = 254  # ISO 7816-3 §11.3.2.3: LEN 0xFF is reserved
MAX_COMMAND_APDU: Final = 65544  # extended C-APDU: 4 header + 3 Lc + 65535 data + 2 Le
MAX_RESPONSE_APDU: Final = 65538  # 65536 data + SW1 SW2

PCB_I_NS: Final = 0x40  # I-block N(S)
PCB_I_MORE: Final = 0x20  # I-block M bit (chaining)
PCB_R: Final = 0x80
PCB_R_NR: Final = 0x10  # R-block N(R)
PCB_S: Final = 0xC0
PCB_S_RESPONSE: Final = 0x20


class RError(IntEnum):
    """R-block error bits (§11.3.2.2)."""

    NONE = 0x00
    EDC = 0x01  # EDC or parity error
    OTHER = 0x02


class SType(IntEnum):
    """S-block types (low bits of the PCB)."""

    RESYNCH = 0x00
    IFS = 0x01
    ABORT = 0x02
    WTX = 0x03


class Kind(Enum):
    I = "I"  # noqa: E741 - the spec's name
    R = "R"
    S = "S"


@dataclass(frozen=True, slots=True)
class SendBlock:
    """Send `block`. `wtx` is the multiplier the host must use as bBWI for this send (0 = none)."""

    block: bytes
    wtx: int = 0


@dataclass(frozen=True, slots=True)
class ApduComplete:
    """Reader: the whole response APDU arrived. Card: the whole command APDU arrived."""

    apdu: bytes


@dataclass(frozen=True, slots=True)
class Idle:
    """Card side: nothing to send right now."""


@dataclass(frozen=True, slots=True)
class Block:
    """A decoded block whose framing and EDC are valid."""

    kind: Kind
    pcb: int
    inf: bytes

    @property
    def seq(self) -> int:
        """N(S) of an I-block, N(R) of an R-block."""
        if self.kind is Kind.I:
            return (self.pcb >> 6) & 1
        return (self.pcb >> 4) & 1

    @property
    def more(self) -> bool:
        return self.kind is Kind.I and bool(self.pcb & PCB_I_MORE)

    @property
    def stype(self) -> int:
        return self.pcb & 0x1F

    @property
    def is_response(self) -> bool:
        return self.kind is Kind.S and bool(self.pcb & PCB_S_RESPONSE)


def lrc(data: bytes) -> int:
    """Longitudinal redundancy check: XOR of every byte (§11.3.3.1)."""
    value = 0
    for byte in data:
        value ^= byte
    return value


def _make_crc_table() -> tuple[int, ...]:
    # Reflected CCITT polynomial (0x1021 -> 0x8408); entry 1 is 0x1189 as in libccid's table.
    table = []
    for n in range(256):
        value = n
        for _ in range(8):
            value = (value >> 1) ^ 0x8408 if value & 1 else value >> 1
        table.append(value)
    return tuple(table)


_CRC_TABLE: Final = _make_crc_table()


def crc16(data: bytes) -> int:
    """CRC as libccid computes it (openct checksum.c): reflected CCITT, init 0xFFFF, no final XOR."""
    value = 0xFFFF
    for byte in data:
        value = (value >> 8) ^ _CRC_TABLE[(value ^ byte) & 0xFF]
    return value


def edc(data: bytes, checksum: Checksum) -> bytes:
    """The EDC field for `data` (NAD..INF); CRC is sent high byte first (reference §1.11)."""
    if checksum is Checksum.LRC:
        return bytes([lrc(data)])
    return crc16(data).to_bytes(2, "big")


def edc_len(checksum: Checksum) -> int:
    return 1 if checksum is Checksum.LRC else 2


def encode(nad: int, pcb: int, inf: bytes, checksum: Checksum) -> bytes:
    if len(inf) > MAX_INF:
        raise ValueError(f"t=1 inf is {len(inf)} bytes, more than {MAX_INF}")
    prologue = bytes([nad, pcb, len(inf)]) + inf
    return prologue + edc(prologue, checksum)


def i_block(nad: int, ns: int, more: bool, inf: bytes, checksum: Checksum) -> bytes:
    pcb = (PCB_I_NS if ns else 0) | (PCB_I_MORE if more else 0)
    return encode(nad, pcb, inf, checksum)


def r_block(nad: int, nr: int, error: RError, checksum: Checksum) -> bytes:
    return encode(nad, PCB_R | (PCB_R_NR if nr else 0) | error, b"", checksum)


def s_block(nad: int, stype: SType, response: bool, inf: bytes, checksum: Checksum) -> bytes:
    return encode(nad, PCB_S | (PCB_S_RESPONSE if response else 0) | stype, inf, checksum)


def swap_nibbles(nad: int) -> int:
    """The NAD of a reply: SAD and DAD exchanged (libccid checks this)."""
    return ((nad << 4) | (nad >> 4)) & 0xFF


_S_INF_LEN: Final[dict[int, int]] = {SType.RESYNCH: 0, SType.IFS: 1, SType.ABORT: 0, SType.WTX: 1}


def decode(raw: bytes, checksum: Checksum, nad: int, max_inf: int) -> Block | RError:
    """Decode `raw`, or say which R-block error it deserves (§11.6.3.2 rule 7.1)."""
    overhead = 3 + edc_len(checksum)
    if len(raw) < overhead:
        return RError.EDC  # lost characters look like a transmission error
    length = raw[2]
    if length == 0xFF:
        return RError.OTHER  # §11.3.2.3: LEN 0xFF is reserved
    if len(raw) != overhead + length:
        return RError.EDC
    if raw[3 + length :] != edc(raw[: 3 + length], checksum):
        return RError.EDC
    if raw[0] != nad:
        return RError.OTHER
    pcb, inf = raw[1], bytes(raw[3 : 3 + length])
    if not pcb & 0x80:
        return Block(Kind.I, pcb, inf) if len(inf) <= max_inf else RError.OTHER
    if pcb & 0xC0 == PCB_R:
        # libccid: an R-block must have LEN 0 and b6 clear.
        return Block(Kind.R, pcb, inf) if not inf and not pcb & 0x20 else RError.OTHER
    expected = _S_INF_LEN.get(pcb & 0x1F)
    if expected is not None and len(inf) != expected:
        return RError.OTHER
    return Block(Kind.S, pcb, inf)
