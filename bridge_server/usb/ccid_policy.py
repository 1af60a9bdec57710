"""Pure decisions of the CCID host driver (sync, no I/O): parameters, voltages, chunking.

Split out of `bridge_server.usb.ccid_driver` (which re-exports these names) so the rules that come
straight from the reference (§1.8, §1.9, §1.10.4, §1.12) are tested without a device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

from bridge_server.errors import CardError, DeviceError
from bridge_server.usb.transport import DeviceInfo
from protocol import ccid
from protocol.atr import MAX_ATR_LENGTH, Atr, Checksum
from protocol.ccid import CcidClassDescriptor, CcidMessage, Feature, IccStatus, SlotError
from protocol.errors import MalformedAtrError

MAX_STALE_FRAMES: Final = 10  # libccid re-reads up to 10 frames with a foreign bSeq (reference §1.3)
MAX_RESPONSE_APDU: Final = 65536 + 2  # Ne ≤ 65536 plus SW1 SW2 (ISO 7816-4 §5.1)
MAX_T0_ROUNDS: Final = 256  # 61xx rounds: 256 * 256 bytes already exceeds MAX_RESPONSE_APDU
MAX_T1_IFS: Final = 254  # ISO 7816-3 §11.4.2: IFSD 0xFF is reserved
CHAIN_WHOLE, CHAIN_BEGIN, CHAIN_END, CHAIN_MIDDLE, CHAIN_MORE = 0x00, 0x01, 0x02, 0x03, 0x10
# bPowerSelect by bVoltageSupport bit, in libccid's fallback order (reference §1.8).
_VOLTAGES: Final = ((0x01, 1, "5.0 V"), (0x02, 2, "3.0 V"), (0x04, 3, "1.8 V"))
_AUTO_IFSD_QUIRK: Final = {(0x0529, 0x0620, 0x0012), (0x0529, 0x0620, 0x0013)}  # reference §5 quirks
# ISO 7816-3 Table 7 (Fi) and Table 8 (Di), indexed by the nibbles of TA1; 0 = RFU.
_FI: Final = (372, 372, 558, 744, 1116, 1488, 1860, 0, 0, 512, 768, 1024, 1536, 2048, 0, 0)
_DI: Final = (0, 1, 2, 4, 8, 16, 32, 64, 12, 20, 0, 0, 0, 0, 0, 0)
SLOT_BUSY_RETRY_S: Final = 0.05  # a command answered CMD_SLOT_BUSY is asked again after this
DEFAULT_FRAME_TIMEOUT_S: Final = 10.0  # until the ATR is known (power-on, slot status)
MIN_FRAME_TIMEOUT_S: Final = 3.0  # the floor under the ATR-derived wait (libccid's default read timeout)
NON_ISO_READ_TIMEOUT_MS: Final = 60_000  # libccid, when F, D or the clock is 0
T0_MIN_READ_TIMEOUT_MS: Final = 3_000  # libccid DEFAULT_COM_READ_TIMEOUT
# Readers that send no time extension while the card works, with the extra wait libccid grants
# them. SafeNet/Thales eToken Fusion (08E6:34D2): libccid commit e919724 (2025-10, after
# Debian 12's 1.5.2) adds 5 minutes to the ATR-derived read timeout, because the reader does
# not implement time extension requests and RSA on-board key generation takes up to 5 minutes
# while its ATR gives about 2.2 s.
SILENT_READER_EXTRA_S: Final = {(0x08E6, 0x34D2): 5 * 60.0}


def power_select_sequence(desc: CcidClassDescriptor, features: int) -> tuple[int, ...]:
    """bPowerSelect values to try, in order."""
    if features & (Feature.AUTO_VOLTAGE | Feature.AUTO_ACTIVATION):
        return (0,)
    chosen = tuple(select for bit, select, _ in _VOLTAGES if desc.voltage_support & bit)
    return chosen or (0,)


def choose_protocol(atr: Atr, desc: CcidClassDescriptor) -> int:
    """First protocol the card offers that the reader supports (T=1 before T=0 when both)."""
    offered = [p for p in atr.protocols if p in (0, 1) and p in desc.supported_protocols]
    if not offered:
        raise CardError(
            f"card offers protocols {list(atr.protocols)} but the reader supports "
            f"{sorted(desc.supported_protocols)}"
        )
    return 1 if 1 in offered else 0


def _findex_dindex(atr: Atr, pps1: int | None = None) -> int:
    # Without a PPS the card stays at Fd/Dd (0x11); in specific mode (TA2) TA1 already applies;
    # after a PPS, the PPS1 the card confirmed (libccid: param[0] = pps[2]).
    if pps1 is not None:
        return pps1
    return atr.ta1 if atr.specific_mode and atr.ta1 is not None else 0x11


def t1_parameters(atr: Atr, pps1: int | None = None) -> bytes:
    """The 7-byte T=1 SetParameters structure (reference §1.9); `pps1`: the negotiated Fi/Di."""
    tcckst = 0x10 | (0x01 if atr.checksum is Checksum.CRC else 0) | (0x02 if atr.ts == 0x3F else 0)
    return bytes(
        [
            _findex_dindex(atr, pps1),
            tcckst,
            atr.tc1 or 0,  # bGuardTimeT1 = TC1
            (atr.bwi << 4) | atr.cwi,
            0,  # bClockStop: not allowed
            min(atr.ifsc, MAX_T1_IFS),
            0,  # bNadValue
        ]
    )


def card_read_timeout_ms(atr: Atr, protocol: int, desc: CcidClassDescriptor) -> int:
    """How long to wait for one frame from this card, as libccid 1.5.2 computes it
    (ifdhandler.c T1_card_timeout / T0_card_timeout): ISO 7816-3 §7.2 EGT, §11.4.3 BWT and CWT
    (T=1) or §10.2 WWT (T=0) at dwDefaultClock with F/D from TA1, plus 1 s (T=1).

    Checked against libccid itself: pcscd's "Timeout: N ms" for the four simulated profiles
    (tests/bridge_server/test_ccid_timeouts.py). libccid's BWT term divides integers; so do we.
    """
    ta1 = atr.ta1 if atr.ta1 is not None else 0x11
    f, d, clock = _FI[ta1 >> 4], _DI[ta1 & 0x0F], desc.default_clock_khz
    if not (f and d and clock):
        return NON_ISO_READ_TIMEOUT_MS
    tc1 = atr.tc1 or 0
    egt = 12 * f / d / clock + (f / d) * tc1 / clock  # clock in kHz: milliseconds
    if protocol == 1:
        etu = f / d / clock
        bwt = 11 * etu + (1 << atr.bwi) * 960 * 372 // clock
        cwt = (11 + (1 << atr.cwi)) * etu
        return int(260 * egt + bwt + 260 * cwt) + 1000
    wi = atr.interface_bytes[1].get("TC", 10) if len(atr.interface_bytes) > 1 else 10
    wwt = 960 * wi * f / clock
    iso_in, iso_out = int(261 * egt + 6 * wwt), int(5 * egt + 260 * wwt)
    return max(T0_MIN_READ_TIMEOUT_MS, iso_in, iso_out)


def t0_parameters(atr: Atr, pps1: int | None = None) -> bytes:
    """The 5-byte T=0 SetParameters structure (reference §1.9; WI from TC2, default 10)."""
    wi = atr.interface_bytes[1].get("TC", 10) if len(atr.interface_bytes) > 1 else 10
    return bytes([_findex_dindex(atr, pps1), 0x02 if atr.ts == 0x3F else 0, atr.tc1 or 0, wi, 0])


def silent_reader_extra_s(info: DeviceInfo) -> float:
    """Extra seconds to wait for an XfrBlock answer from a reader that sends no time extension."""
    return SILENT_READER_EXTRA_S.get((info.vid, info.pid), 0.0)


def effective_features(desc: CcidClassDescriptor, info: DeviceInfo) -> int:
    """dwFeatures with libccid's per-device overrides applied (ccid_open_hack_post)."""
    features = desc.features
    if (info.vid, info.pid, info.bcd_device) in _AUTO_IFSD_QUIRK:
        # IFSD negotiation makes these firmwares return empty answers (Debian #993647).
        features |= Feature.AUTO_IFSD
    return features


def extended_chunks(apdu: bytes, max_message_length: int) -> list[tuple[bytes, int]]:
    """(abData, wLevelParameter) per XfrBlock for an extended-level command (reference §1.10.4)."""
    size = min(ccid.MAX_DATA_LENGTH, max_message_length - ccid.HEADER_LEN)
    if size <= 0:
        raise DeviceError(f"dwMaxCCIDMessageLength {max_message_length} leaves no room for data")
    pieces = [apdu[i : i + size] for i in range(0, len(apdu), size)] or [b""]
    if len(pieces) == 1:
        return [(pieces[0], CHAIN_WHOLE)]
    levels = [CHAIN_BEGIN] + [CHAIN_MIDDLE] * (len(pieces) - 2) + [CHAIN_END]
    return list(zip(pieces, levels, strict=True))


def slot_error_name(error: int) -> str:
    try:
        return SlotError(error).name
    except ValueError:
        return f"bad field at offset {error}" if 0 < error < 0x80 else f"vendor error 0x{error:02x}"


def slot_failure(what: str, resp: CcidMessage) -> CardError:
    icc = resp.b7 & 0x03
    where = "no card in the slot" if icc == IccStatus.ABSENT else f"icc status {icc}"
    return CardError(
        f"{what} failed: {slot_error_name(resp.error)} (bError 0x{resp.error:02x}, {where})", resp.error
    )


def parse_card_atr(raw: bytes) -> tuple[Atr, str | None]:
    """The card's ATR as libccid reads it, and what was wrong with it (None when nothing).

    libccid's parser (towitoko ATR_InitFromArray) never checks the TCK value and stops at the
    computed end, ignoring bytes after it; cards that get either wrong work under pcscd, so they
    are accepted here too, with the problem returned for a warning. `Atr.raw` stays the card's
    own bytes: that is the ATR applications see under libccid as well. Anything else that
    `Atr.parse` refuses (truncated, over-long, bad TS) stays an error."""
    try:
        return Atr.parse(raw), None
    except MalformedAtrError as exc:
        problem = str(exc)
    end, has_tck = _atr_structure(raw)
    # Never beyond 33 bytes (ISO 7816-3 §8.2.1): an ATR buffer that long is refused whole.
    if end is None or end > len(raw) or len(raw) > MAX_ATR_LENGTH:
        raise MalformedAtrError(problem)
    head = raw[:end]
    candidates = (head, head[:-1] + bytes([_xor(head[1:-1])])) if has_tck else (head,)
    for candidate in candidates:
        try:
            atr = Atr.parse(candidate)
        except MalformedAtrError:
            continue
        return dataclasses.replace(atr, raw=bytes(raw)), problem
    raise MalformedAtrError(problem)


def _atr_structure(raw: bytes) -> tuple[int | None, bool]:
    """(length the ATR's own structure gives, whether it ends in TCK); None if cut short.

    ISO 7816-3 §8.2: T0/TDi high nibbles say which interface bytes follow, T0's low nibble
    counts the historical bytes, and TCK follows when any TDi names a protocol other than T=0."""
    if len(raw) < 2:
        return None, False
    pos, indicator, protocols = 2, raw[1] >> 4, []
    while True:
        pos += bin(indicator).count("1")
        if not indicator & 0x8:
            break
        if pos > len(raw):
            return None, False
        td = raw[pos - 1]
        protocols.append(td & 0x0F)
        indicator = td >> 4
    has_tck = any(t != 0 for t in protocols)
    return pos + (raw[1] & 0x0F) + int(has_tck), has_tck


def _xor(data: bytes) -> int:
    check = 0
    for byte in data:
        check ^= byte
    return check


def t1_block_length(data: bytes, checksum: Checksum) -> int | None:
    """The length of the T=1 block at the start of `data` when bytes trail it, else None.

    libccid (openct proto-t1.c t1_xcv) cuts a received block to NAD PCB LEN + LEN + EDC bytes
    and ignores the rest; readers that pad their DataBlock work under pcscd."""
    if len(data) < 3:
        return None
    length = 3 + data[2] + (2 if checksum is Checksum.CRC else 1)
    return length if length < len(data) else None


def _baud(ta1: int, clock_khz: int) -> int:
    f, d = _FI[ta1 >> 4], _DI[ta1 & 0x0F]
    if not (f and d):  # non-ISO values: libccid takes TA1 0x11's
        f, d = 372, 1
    return int(1000 * clock_khz * d / f)


def _rate_supported(baud: int, rates: Sequence[int]) -> bool:
    # libccid find_baud_rate: the card's rate is a rounded quotient, so within +-2 bps.
    return any(rate - 2 < baud < rate + 2 for rate in rates)


def pps_fidi(atr: Atr, desc: CcidClassDescriptor, rates: Sequence[int] | None) -> int | None:
    """The Fi/Di (PPS1) to ask the card for, as libccid chooses it (ifdhandler.c
    IFDHSetProtocolParameters), or None to stay at the default rate.

    TA1 when it is faster than the default rate, within dwMaxDataRate and, when the reader
    answered GET_DATA_RATES, in that list; a card too fast for the reader (TA1 up to 0x97) gets
    the fastest of TA1-1 .. 0x95 the reader can do. Raises CardError for a card in specific mode
    (TA2) whose only rate the reader cannot do (libccid refuses it too)."""
    ta1, clock, max_rate = atr.ta1, desc.default_clock_khz, desc.max_data_rate_bps
    if ta1 is None or not clock:
        return None
    card, default = _baud(ta1, clock), int(1000 * clock / 372)
    if default < card <= max_rate:
        if not rates or _rate_supported(card, rates):
            return ta1
        if atr.specific_mode:
            raise CardError(f"the card runs only at {card} bps (TA1 0x{ta1:02X}, TA2) and the reader cannot")
        return None
    if card > max_rate + 2 and ta1 <= 0x97:
        for lower in range(ta1 - 1, 0x94, -1):
            baud = _baud(lower, clock)
            if _rate_supported(baud, rates) if rates else baud <= max_rate:
                return lower
    return None


def pps_request(atr: Atr, desc: CcidClassDescriptor, protocol: int, fidi: int | None) -> bytes | None:
    """The PPS request (ISO 7816-3 §9.2: PPSS FF, PPS0, [PPS1], PCK) libccid would send, or None.

    libccid sends one unless the reader negotiates itself (AUTO_PPS_PROP / AUTO_PPS_CUR) or the
    card is in specific mode (TA2), and only when it asks for a rate (PPS1) or a protocol other
    than the card's first one."""
    if desc.features & (Feature.AUTO_PPS_PROP | Feature.AUTO_PPS_CUR) or atr.specific_mode:
        return None
    if fidi is None and protocol == atr.protocols[0]:
        return None
    body = bytes([0xFF, protocol | (0x10 if fidi is not None else 0)]) + (
        bytes([fidi]) if fidi is not None else b""
    )
    return body + bytes([_xor(body)])


def pps_confirmed(request: bytes, confirm: bytes) -> int | None:
    """The Fi/Di the card confirmed, None when it kept the default (ISO 7816-3 §9.3, libccid
    PPS_Match); CardError when the answer is no valid confirmation."""
    pps1_in = len(confirm) > 3 and bool(confirm[1] & 0x10)
    ok = not (len(confirm) == len(request) and confirm != request) and len(confirm) <= len(request)
    if not ok or len(confirm) < 3 or (pps1_in and confirm[2] != request[2]):
        raise CardError(f"PPS {request.hex(' ')} refused: the card answered {confirm.hex(' ') or 'nothing'}")
    return confirm[2] if pps1_in and request[1] & 0x10 else None
