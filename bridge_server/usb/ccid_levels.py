"""The exchange levels of a CCID reader (reference §1.10.2), over `CcidLink`; split out of
ccid_driver: T=1 TPDU (one block per XfrBlock, bBWI = WTX multiplier), T=0 TPDU (61xx/6Cxx),
and extended APDU (wLevelParameter chaining both ways, §1.10.4). Short APDU is one XfrBlock.
"""

from __future__ import annotations

import structlog

from bridge_server.errors import CardError
from bridge_server.usb.ccid_link import CcidLink
from bridge_server.usb.ccid_policy import (
    CHAIN_BEGIN,
    CHAIN_MIDDLE,
    CHAIN_MORE,
    MAX_RESPONSE_APDU,
    MAX_T0_ROUNDS,
    extended_chunks,
    slot_failure,
    t1_block_length,
)
from protocol.atr import Checksum
from protocol.ccid import CommandStatus, IccStatus, SlotError
from protocol.t1 import ApduComplete, SendBlock, T1Reader, at_most_once

log = structlog.get_logger(__name__)


async def run_t1(link: CcidLink, t1: T1Reader, checksum: Checksum, block: bytes) -> bytes:
    """Drive the T1Reader: one T=1 block per XfrBlock until it reports completion."""
    bwi = 0
    step: SendBlock | ApduComplete
    while True:
        resp = await link.xfr(block, bwi=bwi)
        if resp.command_status is CommandStatus.FAILED:
            recoverable = (SlotError.XFR_PARITY_ERROR, SlotError.ICC_MUTE)
            if resp.error not in recoverable or resp.icc_status is IccStatus.ABSENT:
                raise slot_failure("XfrBlock", resp)
            # Parity (0xFD): an R-block, as libccid (proto-t1.c). Mute (0xFE, card present):
            # libccid gives up at once (IFD_COMMUNICATION_ERROR, T=1 DEAD); we ask again with an
            # R-block, as ISO 7816-3's T=1 error handling (§11.6.3) lets the interface device after a
            # block waiting time without answer; T1Reader's
            # retry limit and resynch bound it, and the cold reset follows if that fails.
            step = t1.receive_error()
        else:
            step = t1.receive(_t1_block(resp.data, checksum))
        if isinstance(step, ApduComplete):
            return step.apdu
        block, bwi = step.block, step.wtx


def _t1_block(data: bytes, checksum: Checksum) -> bytes:
    end = t1_block_length(data, checksum)
    if end is None:
        return data
    log.warning(
        "t1.trailing_bytes_ignored", length=len(data), block_length=end, reason="libccid ignores them"
    )
    return data[:end]


async def transmit_t0(link: CcidLink, apdu: bytes) -> bytes:
    """T=0 TPDU: 6Cxx → resend with Le=xx; 61xx → GET RESPONSE until the card is done."""
    if len(apdu) > 5 and len(apdu) == 6 + apdu[4]:
        apdu = apdu[:-1]  # ISO 7816-3 §12.2.1: case 4 goes as case 3; the card answers 61xx
    resp = await link.xfr_ok(apdu)
    # 6Cxx asks for the same header again; a PIN-class command is never sent twice (P2),
    # so its 6Cxx goes back to the client, which decides itself whether to send it again.
    if len(resp) >= 2 and resp[-2] == 0x6C and len(apdu) == 5 and not at_most_once(apdu):
        resp = await link.xfr_ok(apdu[:4] + resp[-1:])
    body = bytearray()
    for _ in range(MAX_T0_ROUNDS):
        if len(resp) < 2 or resp[-2] != 0x61:
            return bytes(body + resp)
        body += resp[:-2]
        if len(body) > MAX_RESPONSE_APDU:
            raise CardError(f"T=0 response exceeds {MAX_RESPONSE_APDU} bytes")
        resp = await link.xfr_ok(bytes([apdu[0] & ~0x10 & 0xFF, 0xC0, 0x00, 0x00, resp[-1]]))
    raise CardError(f"card kept answering 61xx for {MAX_T0_ROUNDS} rounds")


async def transmit_extended(link: CcidLink, max_message_length: int, apdu: bytes) -> bytes:
    chunks = extended_chunks(apdu, max_message_length)
    for data, level in chunks[:-1]:
        await link.xfr_ok(data, level=level)  # an empty DataBlock acknowledges each chunk
    data, level = chunks[-1]
    resp = await link.xfr_checked(data, level=level)
    body = bytearray(resp.data)
    while resp.chain_parameter in (CHAIN_BEGIN, CHAIN_MIDDLE, CHAIN_MORE):
        resp = await link.xfr_checked(b"", level=CHAIN_MORE)
        body += resp.data
        if len(body) > MAX_RESPONSE_APDU:
            raise CardError(f"chained response exceeds {MAX_RESPONSE_APDU} bytes")
    return bytes(body)


__all__ = ["run_t1", "transmit_extended", "transmit_t0"]
