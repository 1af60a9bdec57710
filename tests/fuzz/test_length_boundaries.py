"""Every length field at max-1, max and max+1 (reliability §7.2 B2), and ATRs of length
0, 1, 33, 34, 255 at every layer that carries one (B4).

Each row of the table names a field, its maximum, and a probe `accepts(n) -> bool` that feeds a
value of length `n` to the real code: True when accepted, False when rejected with the layer's
own error (anything else fails the test). Frame headers are rejected from the header alone,
before any payload is buffered.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from protocol import NEED_DATA, apdu, ccid, t1, vpcd, wire
from protocol.atr import MAX_ATR_LENGTH, Atr, Checksum
from protocol.errors import LocalProtocolError, MalformedFrameError, ProtocolError
from protocol.t1 import MAX_INF, SendBlock
from protocol.wire import max_payload


def _rejects(fn: Callable[[], object], *errors: type[BaseException]) -> bool:
    try:
        fn()
    except errors or (ProtocolError,):  # noqa: B030 - a tuple of classes either way
        return False
    return True


def _wire_header(ftype: wire.FrameType) -> Callable[[int], bool]:
    def accepts(n: int) -> bool:
        dec = wire.FrameDecoder()
        dec.receive_data(wire.frame_header(ftype, n))  # the header only: no payload is sent
        try:
            assert dec.next_frame() is NEED_DATA
        except MalformedFrameError as exc:
            assert exc.close_code is wire.CloseCode.FRAME_TOO_LARGE
            assert dec.buffered == wire.HEADER_LEN
            return False
        return True

    return accepts


def _frame_limit(ftype: wire.FrameType) -> int:
    return max_payload(ftype, max_control=wire.MAX_CONTROL_PAYLOAD, max_ccid=wire.MAX_CCID_PAYLOAD)


def _ccid_dwlength(limit: int) -> Callable[[int], bool]:
    def accepts(n: int) -> bool:
        header = bytes([0x80]) + n.to_bytes(4, "little") + bytes(5)
        # Only the header is given for the over-long case: the check must not need the data.
        data = bytes(n) if n <= limit - ccid.HEADER_LEN else b""
        return _rejects(lambda: ccid.decode_message(header + data, max_message_length=limit))

    return accepts


def _wire_ccid_message(n: int) -> bool:
    msg = b"\x6f" + (n - 10).to_bytes(4, "little") + bytes(5) + bytes(n - 10)
    return _rejects(lambda: wire.encode_message(wire.CcidFrame(token_id=0, epoch=1, message=msg)))


def _vpcd_length(n: int) -> bool:
    return _rejects(lambda: vpcd.frame(bytes(n)))


def _apdu_lc(n: int) -> bool:
    return _rejects(lambda: apdu.CommandApdu(0, 0xA4, 0, 0, bytes(n)).encode())


def _apdu_short_lc(n: int) -> bool:
    """The short form holds Lc up to 255 (one byte); one more switches to the extended form."""
    encoded = apdu.CommandApdu(0, 0xD6, 0, 0, bytes(n)).encode()
    assert apdu.CommandApdu.parse(encoded).data == bytes(n)
    return encoded[4] != 0


def _apdu_ne(n: int) -> bool:
    return _rejects(lambda: apdu.CommandApdu(0, 0xB0, 0, 0, ne=n).encode())


def _apdu_short_ne(n: int) -> bool:
    return not apdu.CommandApdu(0, 0xB0, 0, 0, ne=n).extended


def _apdu_parse_length(n: int) -> bool:
    lc = min(n - 9, apdu.MAX_EXTENDED_LC)
    raw = bytes([0, 0xD6, 0, 0, 0]) + lc.to_bytes(2, "big") + bytes(lc) + b"\0\0" + bytes(n - 9 - lc)
    return _rejects(lambda: apdu.CommandApdu.parse(raw))


def _t1_len(n: int) -> bool:
    """An I-block of LEN n from the card: accepted (acknowledged / completed) or answered with an
    R-block error; LEN 0xFF is reserved and the block encoder refuses INF > 254."""
    if n > MAX_INF:
        return _rejects(lambda: t1.encode_block(0, 0, bytes(n), Checksum.LRC), ValueError)
    reader = t1.T1Reader(ifsd=MAX_INF)
    reader.begin_apdu(b"\x00\xb0\x00\x00")
    step = reader.receive(t1.encode_block(0, 0, bytes(n - 2) + b"\x90\x00", Checksum.LRC))
    return not isinstance(step, SendBlock)


def _json_string(n: int) -> bool:
    hello = b'{"version":1,"software":"' + b"x" * n + b'"}'
    frame = wire.frame_header(wire.FrameType.CLIENT_HELLO, len(hello)) + hello
    return _rejects(lambda: wire.decode_message(wire.FrameType.CLIENT_HELLO, frame[wire.HEADER_LEN :]))


def _wire_atr(n: int) -> bool:
    return _rejects(lambda: wire.encode_message(wire.LeaseGranted(token_id=0, epoch=1, atr=bytes(n))))


def _vpcd_atr(n: int) -> bool:
    return _rejects(lambda: vpcd.VpcdCardSide().send_atr(b"\x3b" * n))


def _atr_of_length(n: int) -> bytes:
    """TS 3B, T0 with 15 historical bytes, a chain of TD bytes (T=1), the historical bytes, TCK."""
    hist = min(15, max(0, n - 4))
    tds = n - 3 - hist
    body = bytes([0x3B, 0x80 | hist]) + b"\x81" * (tds - 1) + b"\x01" + bytes(hist)
    tck = 0
    for b in body[1:]:
        tck ^= b
    return body + bytes([tck])


def _atr_parse(n: int) -> bool:
    raw = _atr_of_length(n)
    assert len(raw) == n
    return _rejects(lambda: Atr.parse(raw))


TABLE: list[tuple[str, int, Callable[[int], bool]]] = [
    *[(f"wire header length ({t.name})", _frame_limit(t), _wire_header(t)) for t in wire.FrameType],
    ("wire CcidFrame message", wire.MAX_CCID_MESSAGE, _wire_ccid_message),
    ("ccid dwLength vs libccid max", ccid.MAX_DATA_LENGTH, _ccid_dwlength(ccid.MAX_MESSAGE_LENGTH)),
    ("ccid dwLength vs dwMaxCCIDMessageLength 271", 261, _ccid_dwlength(271)),
    ("vpcd 2-byte length", vpcd.MAX_PAYLOAD, _vpcd_length),
    ("apdu short Lc (stays short)", apdu.MAX_SHORT_LC, _apdu_short_lc),
    ("apdu extended Lc", apdu.MAX_EXTENDED_LC, _apdu_lc),
    ("apdu short Le (stays short)", apdu.MAX_SHORT_NE, _apdu_short_ne),
    ("apdu extended Le", apdu.MAX_EXTENDED_NE, _apdu_ne),
    ("apdu total length", apdu.MAX_APDU_LENGTH, _apdu_parse_length),
    ("t=1 LEN", MAX_INF, _t1_len),
    ("json string", wire.MAX_STRING_CHARS if hasattr(wire, "MAX_STRING_CHARS") else 1024, _json_string),
    ("wire atr bytes", 33, _wire_atr),
    ("vpcd atr", vpcd.MAX_ATR_LENGTH, _vpcd_atr),
    ("atr length", MAX_ATR_LENGTH, _atr_parse),
]


@pytest.mark.parametrize("delta", [-1, 0, 1], ids=["max-1", "max", "max+1"])
@pytest.mark.parametrize(("field", "maximum", "accepts"), TABLE, ids=[row[0] for row in TABLE])
def test_length_field_accepts_up_to_its_maximum_and_rejects_one_more(
    field: str, maximum: int, accepts: Callable[[int], bool], delta: int
) -> None:
    assert accepts(maximum + delta) is (delta <= 0), f"{field} at {maximum + delta}"


# ---- ATRs of length 0, 1, 33, 34, 255 (reliability §7.2 B4, cf. CVE-2010-4531) ----

ATR_LENGTHS = [0, 1, 33, 34, 255]


def _some_atr(n: int) -> bytes:
    return _atr_of_length(n) if 4 <= n <= 40 else b"\x3b" * n


@pytest.mark.parametrize("n", ATR_LENGTHS)
def test_only_well_formed_atrs_of_at_most_33_bytes_parse(n: int) -> None:
    assert _rejects(lambda: Atr.parse(_some_atr(n))) is (n == 33)


@pytest.mark.parametrize("n", ATR_LENGTHS)
def test_vpcd_never_sends_an_empty_or_oversized_atr(n: int) -> None:
    assert _rejects(lambda: vpcd.VpcdCardSide().send_atr(_some_atr(n)), LocalProtocolError) is (1 <= n <= 33)


@pytest.mark.parametrize("n", ATR_LENGTHS)
def test_wire_carries_atrs_of_at_most_33_bytes_both_ways(n: int) -> None:
    msg = wire.TokenStatus(token_id=0, name="t", present=n > 0, allowed=True, atr=_some_atr(n), state="free")
    ok = _rejects(lambda: wire.encode_message(msg))
    assert ok is (n <= 33)
    # A peer that sends one anyway (hex in the JSON) is rejected by the decoder.
    payload = (
        '{"token_id":0,"name":"t","present":true,"allowed":true,"atr":"'
        + _some_atr(n).hex()
        + '","state":"free"}'
    ).encode()
    assert _rejects(lambda: wire.decode_message(wire.FrameType.TOKEN_STATUS, payload)) is (n <= 33)


@pytest.mark.parametrize("n", ATR_LENGTHS)
def test_driver_marks_a_token_with_a_bad_atr_faulty_and_forwards_only_a_good_one(n: int) -> None:
    from test_ccid_driver_fuzz import READERS, HostileDevice

    from bridge_server.errors import CardError

    class _Healthy(HostileDevice):
        async def write(self, data: bytes) -> None:
            self.queue = [self._healthy(ccid.decode_message(data)).encode()]

    async def power_on() -> bytes | None:
        from bridge_server.usb.ccid_driver import CcidDriver

        driver = CcidDriver(_Healthy(READERS["short"][0], _some_atr(n), None))  # type: ignore[arg-type]
        try:
            return await driver.power_on()
        except CardError:
            return None

    got = trio.run(power_on, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == (_some_atr(n) if n == 33 else None)
