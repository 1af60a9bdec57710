"""A simulated PIV card (NIST SP 800-73-4), shaped after what OpenSC 0.23's PIV driver sends.

Theory of operation: `execute()` takes one whole command APDU and returns one whole response
APDU, never raising. Three pieces of transient state sit around the command handlers:

* chaining (ISO 7816-4 §5.1.1): chunks with CLA 0x10 are buffered (bounded by MAX_CHAINED)
  and answered 9000; the chunk without the bit runs the command on the concatenation.
* response pending (ISO 7816-4 §5.3.4): a response never carries more than Ne data bytes,
  and at most 256 to a short-form command; the rest waits for GET RESPONSE behind `61 xx`. An
  extended-form Le (up to 65536) gets the whole object in one answer, as a YubiKey 5 gives it.
  OpenSC's 8-byte length probe never fetches the rest, so any other command drops what is
  pending.
* security status: PIN verified / admin. Volatile: power_on() and power_off() clear it. The
  PIN/PUK retry counters are persistent and are saved to `state_path` on every change.

The PIV application is selected implicitly at power-on (OpenSC 0.23 sends GET DATA 7E before
any SELECT). Simplification: there is no 9B card-management key; GENERATE ASYMMETRIC KEY PAIR
and PUT DATA require the PIN instead of 9B admin authentication.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bridge_server.simulator import piv_crypto
from bridge_server.simulator.piv_state import KEY_OBJECTS, PIV_AID, TAG_DISCOVERY, PivState
from bridge_server.simulator.tlv import TlvError, find, tlv
from protocol import apdu as sw
from protocol.apdu import CommandApdu
from protocol.errors import MalformedApduError

MAX_CHAINED: Final = 16384  # a PUT DATA of a 4096-bit certificate fits
MAX_SHORT_RESPONSE: Final = 256
PIN_REF: Final = 0x80
PUK_REF: Final = 0x81
PIN_PAD: Final = 0xFF
PIN_LENGTH: Final = 8  # SP 800-73-4 Part 2 §3.2.1: PIN field is 8 bytes, FF-padded
CLA_CHAIN: Final = 0x10

INS_SELECT: Final = 0xA4
INS_GET_DATA: Final = 0xCB
INS_GET_RESPONSE: Final = 0xC0
INS_VERIFY: Final = 0x20
INS_CHANGE_REFERENCE_DATA: Final = 0x24
INS_RESET_RETRY_COUNTER: Final = 0x2C
INS_GENERAL_AUTHENTICATE: Final = 0x87
INS_GENERATE_ASYMMETRIC: Final = 0x47
INS_PUT_DATA: Final = 0xDB
# YubiKey 5 PIV extension (ykman's PivSession.get_serial): the device serial, 4 bytes big-endian.
INS_YUBIKEY_GET_SERIAL: Final = 0xF8

# SP 800-73-4 Part 2 §3.1.1 application property template: PIX, coexistent tag allocation
# authority, label, supported algorithms (RSA-2048, P-256).
SELECT_RESPONSE: Final = tlv(
    b"\x61",
    tlv(b"\x4f", PIV_AID[5:])
    + tlv(b"\x79", tlv(b"\x4f", PIV_AID[:5]))
    + tlv(b"\x50", b"tokenbridge simulated PIV")
    + tlv(b"\xac", bytes.fromhex("800107800111060100")),
)


@dataclass
class PivCounters:
    pin_attempts: int = 0  # PIN presentations (VERIFY with data, CHANGE REFERENCE DATA on the PIN)
    signatures: int = 0  # private-key operations
    resets: int = 0  # power-ons
    apdus: int = 0
    unblocks: int = 0  # successful RESET RETRY COUNTER


class PivCard:
    def __init__(
        self,
        *,
        state_path: Path | None = None,
        pin: str = "123456",
        puk: str = "12345678",
        pin_retries: int = 3,
        puk_retries: int = 3,
        rng: random.Random | None = None,
        yubikey_serial: int | None = None,
    ) -> None:
        self._path = state_path
        self.yubikey_serial = yubikey_serial  # answers 00 F8 00 00 as a YubiKey 5 does, when set
        self._rng = rng or random.Random()
        if state_path is not None and state_path.exists():
            self._state = PivState.from_json(state_path.read_text(encoding="utf-8"))
        else:
            self._state = PivState.fresh(
                pin=pin,
                puk=puk,
                pin_retries=pin_retries,
                puk_retries=puk_retries,
                use_cache=state_path is None,
            )
            self._save()
        self.counters = PivCounters()
        self._pin_verified = False
        self._pending = b""
        self._pending_sw = sw.SW_OK
        self._chain: tuple[tuple[int, int, int], bytearray] | None = None

    # -- power and evidence ------------------------------------------------------------------

    def power_on(self) -> None:
        self._clear_volatile()
        self.counters.resets += 1

    def power_off(self) -> None:
        self._clear_volatile()

    def _clear_volatile(self) -> None:
        self._pin_verified = False
        self._pending = b""
        self._chain = None

    @property
    def pin_retries_left(self) -> int:
        return self._state.pin_left

    @property
    def puk_retries_left(self) -> int:
        return self._state.puk_left

    @property
    def pin_verified(self) -> bool:
        return self._pin_verified

    def certificate(self, slot: int) -> bytes | None:
        """DER certificate currently stored for a key slot (for tests and the demo)."""
        obj = self._state.objects.get(KEY_OBJECTS[slot])
        inner = find(obj, b"\x53") if obj else None
        return find(inner, b"\x70") if inner else None

    def _save(self) -> None:
        if self._path is not None:
            self._state.save(self._path)

    # -- dispatch ----------------------------------------------------------------------------

    def execute(self, apdu: bytes) -> bytes:
        """Whole C-APDU in, whole R-APDU out. Never raises."""
        self.counters.apdus += 1
        try:
            cmd = CommandApdu.parse(apdu)
        except MalformedApduError:
            self._pending = b""
            return _sw(sw.SW_WRONG_LENGTH)
        try:
            return self._execute(cmd)
        except (TlvError, ValueError):
            return _sw(sw.SW_WRONG_DATA)
        except Exception:  # a card never crashes the reader; 6F00 is "no precise diagnosis"
            return _sw(sw.SW_UNKNOWN)

    def _execute(self, cmd: CommandApdu) -> bytes:
        if cmd.ins == INS_GET_RESPONSE and cmd.cla == 0x00:
            return self._get_response(cmd)
        self._pending = b""  # ISO 7816-4 §5.3.4: any other command abandons the pending data
        if cmd.cla & ~CLA_CHAIN:
            self._chain = None
            return _sw(sw.SW_CLA_NOT_SUPPORTED)
        full = self._chaining(cmd)
        if full is None:
            return _sw(sw.SW_OK)
        data, status = self._dispatch(full)
        return self._respond(data, status, full.ne, extended=cmd.extended)

    def _chaining(self, cmd: CommandApdu) -> CommandApdu | None:
        header = (cmd.ins, cmd.p1, cmd.p2)
        if self._chain is not None and self._chain[0] != header:
            self._chain = None  # a different command abandons the chain
        if cmd.cla & CLA_CHAIN:
            if self._chain is None:
                self._chain = (header, bytearray())
            if len(self._chain[1]) + len(cmd.data) > MAX_CHAINED:
                self._chain = None
                raise ValueError(f"chained command longer than {MAX_CHAINED} bytes")
            self._chain[1].extend(cmd.data)
            return None
        if self._chain is None:
            return cmd
        data = bytes(self._chain[1]) + cmd.data
        self._chain = None
        if len(data) > MAX_CHAINED:
            raise ValueError(f"chained command longer than {MAX_CHAINED} bytes")
        return CommandApdu(0x00, cmd.ins, cmd.p1, cmd.p2, data, cmd.ne)

    def _dispatch(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if cmd.ins == INS_YUBIKEY_GET_SERIAL and self.yubikey_serial is not None:
            return self.yubikey_serial.to_bytes(4, "big"), sw.SW_OK
        handler = _HANDLERS.get(cmd.ins)
        if handler is None:
            return b"", sw.SW_INS_NOT_SUPPORTED
        return handler(self, cmd)

    # -- response chunking -------------------------------------------------------------------

    def _respond(self, data: bytes, status: int, ne: int | None, *, extended: bool = False) -> bytes:
        # ISO 7816-4 §5.1: extended Le asks for up to 65536 bytes at once; short Le for 256.
        limit = ne if extended and ne else min(ne or MAX_SHORT_RESPONSE, MAX_SHORT_RESPONSE)
        if len(data) <= limit:
            return data + _sw(status)
        self._pending, self._pending_sw = data[limit:], status
        return data[:limit] + _sw(0x6100 | (min(len(self._pending), 256) & 0xFF))

    def _get_response(self, cmd: CommandApdu) -> bytes:
        if not self._pending:
            return _sw(sw.SW_CONDITIONS_NOT_SATISFIED)
        data, self._pending = self._pending, b""
        return self._respond(data, self._pending_sw, cmd.ne, extended=cmd.extended)

    # -- command handlers (return data, status word) -----------------------------------------

    def _select(self, cmd: CommandApdu) -> tuple[bytes, int]:
        # ISO 7816-4 §11.2.2 / SP 800-73-4 Part 2 §3.1.1: right-truncated AID selection.
        if cmd.p1 != 0x04 or len(cmd.data) < 5 or not PIV_AID.startswith(cmd.data):
            return b"", sw.SW_FILE_NOT_FOUND
        return SELECT_RESPONSE, sw.SW_OK

    def _get_data(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            return b"", sw.SW_INCORRECT_P1P2
        tag = find(cmd.data, b"\x5c")
        if tag is None:
            return b"", sw.SW_WRONG_DATA
        obj = self._state.objects.get(tag)
        if obj is None:
            return b"", sw.SW_FILE_NOT_FOUND
        return obj, sw.SW_OK

    def _put_data(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if not self._pin_verified:  # simplification: PIN instead of 9B admin authentication
            return b"", sw.SW_SECURITY_NOT_SATISFIED
        if cmd.data[:1] == TAG_DISCOVERY:
            tag, value = TAG_DISCOVERY, cmd.data
        else:
            tag = find(cmd.data, b"\x5c") or b""
            body = find(cmd.data, b"\x53")
            if not tag or body is None:
                return b"", sw.SW_WRONG_DATA
            value = tlv(b"\x53", body)
        self._state.objects[tag] = value
        self._save()
        return b"", sw.SW_OK

    def _verify(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if cmd.p2 != PIN_REF:
            return b"", sw.SW_REF_NOT_FOUND
        if cmd.p1 == 0xFF and not cmd.data:  # SP 800-73-4 Part 2 §3.2.1: reset security status
            self._pin_verified = False
            return b"", sw.SW_OK
        if cmd.p1 != 0x00:
            return b"", sw.SW_INCORRECT_P1P2
        if not cmd.data:  # status query
            if self._pin_verified:
                return b"", sw.SW_OK
            return b"", self._tries_status(self._state.pin_left)
        self.counters.pin_attempts += 1
        status = self._check_pin(cmd.data)
        self._pin_verified = status == sw.SW_OK
        return b"", status

    def _check_pin(self, presented: bytes) -> int:
        """Compare against the PIN and update its persistent counter."""
        if len(presented) != PIN_LENGTH:
            return sw.SW_WRONG_DATA
        st = self._state
        if st.pin_left == 0:
            return sw.SW_AUTH_BLOCKED
        if presented == _pad(st.pin):
            st.pin_left = st.pin_max
            self._save()
            return sw.SW_OK
        st.pin_left -= 1
        self._save()
        return 0x63C0 | st.pin_left

    def _check_puk(self, presented: bytes) -> int:
        st = self._state
        if st.puk_left == 0:
            return sw.SW_AUTH_BLOCKED
        if presented == _pad(st.puk):
            st.puk_left = st.puk_max
            self._save()
            return sw.SW_OK
        st.puk_left -= 1
        self._save()
        return 0x63C0 | st.puk_left

    @staticmethod
    def _tries_status(left: int) -> int:
        return sw.SW_AUTH_BLOCKED if left == 0 else 0x63C0 | left

    def _change_reference_data(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if cmd.p1 != 0x00 or cmd.p2 not in (PIN_REF, PUK_REF):
            return b"", sw.SW_REF_NOT_FOUND
        if len(cmd.data) != 2 * PIN_LENGTH:
            return b"", sw.SW_WRONG_DATA
        old, new = cmd.data[:PIN_LENGTH], cmd.data[PIN_LENGTH:]
        new_value = _unpad(new)
        if new_value is None:
            return b"", sw.SW_WRONG_DATA
        if cmd.p2 == PIN_REF:
            self.counters.pin_attempts += 1
            status = self._check_pin(old)
            if status == sw.SW_OK:
                self._state.pin, self._pin_verified = new_value, True
        else:
            status = self._check_puk(old)
            if status == sw.SW_OK:
                self._state.puk = new_value
        self._save()
        return b"", status

    def _reset_retry_counter(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if cmd.p1 != 0x00 or cmd.p2 != PIN_REF:
            return b"", sw.SW_REF_NOT_FOUND
        if len(cmd.data) != 2 * PIN_LENGTH:
            return b"", sw.SW_WRONG_DATA
        new_value = _unpad(cmd.data[PIN_LENGTH:])
        if new_value is None:
            return b"", sw.SW_WRONG_DATA
        status = self._check_puk(cmd.data[:PIN_LENGTH])
        if status == sw.SW_OK:
            self._state.pin, self._state.pin_left = new_value, self._state.pin_max
            self.counters.unblocks += 1
            self._save()
        return b"", status

    def _general_authenticate(self, cmd: CommandApdu) -> tuple[bytes, int]:
        template = find(cmd.data, b"\x7c")
        if template is None:
            return b"", sw.SW_WRONG_DATA
        if cmd.p2 == 0x9B:  # challenge only (OpenSC's GET CHALLENGE emulation); no admin key
            if find(template, b"\x81") == b"":
                challenge = bytes(self._rng.getrandbits(8) for _ in range(8))
                return tlv(b"\x7c", tlv(b"\x81", challenge)), sw.SW_OK
            return b"", sw.SW_FUNC_NOT_SUPPORTED
        key = self._state.keys.get(cmd.p2)
        if key is None:
            return b"", sw.SW_REF_NOT_FOUND
        if piv_crypto.algorithm_of(key) != cmd.p1:
            return b"", sw.SW_INCORRECT_P1P2
        if cmd.p2 != 0x9E and not self._pin_verified:  # SP 800-73-4 Part 1 Table 4b: 9E needs no PIN
            return b"", sw.SW_SECURITY_NOT_SATISFIED
        result, status = piv_crypto.private_key_operation(key, template)
        if status == sw.SW_OK:
            self.counters.signatures += 1
            return tlv(b"\x7c", tlv(b"\x82", result)), status
        return b"", status

    def _generate(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if not self._pin_verified:  # simplification: PIN instead of 9B admin authentication
            return b"", sw.SW_SECURITY_NOT_SATISFIED
        if cmd.p1 != 0x00 or cmd.p2 not in KEY_OBJECTS:
            return b"", sw.SW_REF_NOT_FOUND
        control = find(cmd.data, b"\xac")
        alg = find(control, b"\x80") if control is not None else None
        if alg is None or len(alg) != 1 or alg[0] not in piv_crypto.SUPPORTED_ALGORITHMS:
            return b"", sw.SW_WRONG_DATA
        key = piv_crypto.generate_key(alg[0])
        self._state.keys[cmd.p2] = key
        self._save()
        return piv_crypto.public_key_template(key), sw.SW_OK


_HANDLERS = {
    INS_SELECT: PivCard._select,
    INS_GET_DATA: PivCard._get_data,
    INS_PUT_DATA: PivCard._put_data,
    INS_VERIFY: PivCard._verify,
    INS_CHANGE_REFERENCE_DATA: PivCard._change_reference_data,
    INS_RESET_RETRY_COUNTER: PivCard._reset_retry_counter,
    INS_GENERAL_AUTHENTICATE: PivCard._general_authenticate,
    INS_GENERATE_ASYMMETRIC: PivCard._generate,
}


def _sw(status: int) -> bytes:
    return status.to_bytes(2, "big")


def _pad(value: bytes) -> bytes:
    return value.ljust(PIN_LENGTH, bytes((PIN_PAD,)))


def _unpad(field: bytes) -> bytes | None:
    """A new PIN/PUK: 6-8 ASCII digits, FF-padded to 8 (SP 800-73-4 Part 2 §3.2.2)."""
    value = field.rstrip(bytes((PIN_PAD,)))
    if not 6 <= len(value) <= PIN_LENGTH or not value.isdigit():
        return None
    return value
