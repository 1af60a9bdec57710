"""ISO 7816-3 Answer-To-Reset parsing (the parts a T=1 host needs).

Layout (ISO 7816-3 §8.2, reference §1.12)::

    TS T0 [TA1 TB1 TC1 TD1] [TA2 TB2 TC2 TD2] ... historical-bytes [TCK]

T0 and every TDi carry, in their high nibble, which of TA(i+1)..TD(i+1) follow; the low nibble
of T0 is the number of historical bytes and the low nibble of TDi is a protocol number T.
The parser is strict: every byte must be accounted for, so a truncated, over-long or
checksum-damaged ATR is rejected with `MalformedAtrError` instead of being half-understood.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from protocol.errors import MalformedAtrError

MAX_ATR_LENGTH: Final = 33  # ISO 7816-3 §8.2.1: TS plus at most 32 characters

TS_DIRECT: Final = 0x3B
TS_INVERSE: Final = 0x3F

# ISO 7816-3 §11.4 defaults for T=1 when the ATR does not say otherwise.
DEFAULT_IFSC: Final = 32
DEFAULT_BWI: Final = 4
DEFAULT_CWI: Final = 13
MAX_IFS: Final = 254  # 0xFF is reserved; libccid reads it as 254

_PRESENCE_BITS: Final = (("TA", 0x1), ("TB", 0x2), ("TC", 0x4), ("TD", 0x8))
_T_GLOBAL: Final = 15  # TDi with T=15 introduces global interface bytes, not a protocol


class Checksum(Enum):
    """T=1 error detection code, chosen by the first TCi (i >= 3) bit 0 (§11.4.4)."""

    LRC = "lrc"
    CRC = "crc"


@dataclass(frozen=True, slots=True)
class Atr:
    """A parsed ATR. `interface_bytes[i-1]` is group i (group 1 always exists, maybe empty)."""

    raw: bytes
    ts: int
    t0: int
    interface_bytes: tuple[dict[str, int], ...]
    historical: bytes
    tck: int | None
    protocols: tuple[int, ...]
    ta1: int | None
    tc1: int | None
    specific_mode: bool
    ifsc: int
    bwi: int
    cwi: int
    checksum: Checksum

    @classmethod
    def parse(cls, raw: bytes) -> Atr:
        """Parse `raw`; raise `MalformedAtrError` on anything that is not a well-formed ATR."""
        raw = bytes(raw)
        _check_envelope(raw)
        groups, pos = _parse_groups(raw)
        t0 = raw[1]
        hist_len = t0 & 0x0F
        if pos + hist_len > len(raw):
            raise MalformedAtrError(
                f"atr truncated: {len(raw)} bytes, historical bytes need {pos + hist_len}: {raw.hex()}"
            )
        historical = raw[pos : pos + hist_len]
        pos += hist_len
        td_protocols = [g["TD"] & 0x0F for g in groups if "TD" in g]
        tck = _check_tck(raw, pos, td_protocols)
        protocols = tuple(dict.fromkeys(t for t in td_protocols if t != _T_GLOBAL)) or (0,)
        t1 = _t1_parameters(groups)
        return cls(
            raw=raw,
            ts=raw[0],
            t0=t0,
            interface_bytes=tuple(groups),
            historical=historical,
            tck=tck,
            protocols=protocols,
            ta1=groups[0].get("TA"),
            tc1=groups[0].get("TC"),
            specific_mode=len(groups) > 1 and "TA" in groups[1],
            ifsc=t1[0],
            bwi=t1[1],
            cwi=t1[2],
            checksum=t1[3],
        )


def _check_envelope(raw: bytes) -> None:
    if not raw:
        raise MalformedAtrError("atr is empty")
    if len(raw) > MAX_ATR_LENGTH:
        raise MalformedAtrError(f"atr is {len(raw)} bytes, more than the {MAX_ATR_LENGTH} allowed")
    if raw[0] not in (TS_DIRECT, TS_INVERSE):
        raise MalformedAtrError(f"atr TS is 0x{raw[0]:02X}, expected 0x3B or 0x3F")
    if len(raw) < 2:
        raise MalformedAtrError(f"atr truncated after TS: {raw.hex()}")


def _parse_groups(raw: bytes) -> tuple[list[dict[str, int]], int]:
    """Walk the TA/TB/TC/TD chain; return the groups and the offset of the historical bytes."""
    groups: list[dict[str, int]] = []
    presence = raw[1] >> 4
    pos = 2
    while True:
        group: dict[str, int] = {}
        for name, bit in _PRESENCE_BITS:
            if presence & bit:
                if pos >= len(raw):
                    raise MalformedAtrError(
                        f"atr truncated in interface group {len(groups) + 1} at {name}: {raw.hex()}"
                    )
                group[name] = raw[pos]
                pos += 1
        groups.append(group)
        if "TD" not in group:
            return groups, pos
        presence = group["TD"] >> 4


def _check_tck(raw: bytes, pos: int, td_protocols: list[int]) -> int | None:
    # ISO 7816-3 §8.2.5: TCK is absent when only T=0 is indicated, present otherwise, and the
    # XOR of T0..TCK is zero.
    if all(t == 0 for t in td_protocols):
        if pos != len(raw):
            raise MalformedAtrError(f"atr has {len(raw) - pos} trailing bytes after the historical bytes")
        return None
    if pos >= len(raw):
        raise MalformedAtrError(f"atr truncated: TCK missing: {raw.hex()}")
    if pos + 1 != len(raw):
        raise MalformedAtrError(f"atr has {len(raw) - pos - 1} trailing bytes after TCK")
    check = 0
    for byte in raw[1:]:
        check ^= byte
    if check != 0:
        raise MalformedAtrError(f"atr TCK 0x{raw[pos]:02X} is wrong (xor of T0..TCK is 0x{check:02X})")
    return raw[pos]


def _t1_parameters(groups: list[dict[str, int]]) -> tuple[int, int, int, Checksum]:
    """IFSC, BWI, CWI and checksum from the first TAi/TBi/TCi (i >= 3) following a TD with T=1."""
    ta: int | None = None
    tb: int | None = None
    tc: int | None = None
    # groups[i - 1] is group i; group i's bytes are qualified by TD(i-1) = groups[i - 2]["TD"].
    for i in range(3, len(groups) + 1):
        if groups[i - 2]["TD"] & 0x0F != 1:
            continue
        group = groups[i - 1]
        ta = group.get("TA") if ta is None else ta
        tb = group.get("TB") if tb is None else tb
        tc = group.get("TC") if tc is None else tc
    ifsc = DEFAULT_IFSC
    if ta is not None:
        # 0x00 is reserved (§11.4.2): fall back to the default rather than divide by zero later.
        ifsc = min(ta, MAX_IFS) if ta else DEFAULT_IFSC
    bwi, cwi = (DEFAULT_BWI, DEFAULT_CWI) if tb is None else (tb >> 4, tb & 0x0F)
    checksum = Checksum.CRC if tc is not None and tc & 0x01 else Checksum.LRC
    return ifsc, bwi, cwi, checksum
