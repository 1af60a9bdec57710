"""ISO/IEC 7816-4 command and response APDUs: parse, encode, classify, redact.

Theory of operation: a command APDU is a 4-byte header (CLA INS P1 P2) plus an optional
body. ISO 7816-4 §5.1 defines four cases (no data / Le only / Lc+data / Lc+data+Le), each
in a short form (one-byte Lc and Le) and an extended form (a 00 marker byte, then two-byte
Lc and Le). `CommandApdu` normalises itself so that `extended` is True whenever the values
cannot be encoded short, which makes `parse(encode(x)) == x` hold for every valid value.

`classify()` is what the server's policy, PIN guard and audit rely on; `redact()` is the only
way an APDU may reach a log: it shows the header and length of every command, and the data only
of the few reading commands in `SHOWN_DATA_INS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from protocol.errors import LocalProtocolError, MalformedApduError

HEADER_LEN: Final = 4
MAX_SHORT_LC: Final = 255
MAX_SHORT_NE: Final = 256  # ISO 7816-4 §5.1: short Le 00 means 256
MAX_EXTENDED_LC: Final = 65535
MAX_EXTENDED_NE: Final = 65536  # ISO 7816-4 §5.1: extended Le 0000 means 65536
MAX_APDU_LENGTH: Final = HEADER_LEN + 3 + MAX_EXTENDED_LC + 2
# redact() shows at most this many data bytes of an allow-listed command, so a log line stays short.
REDACT_SHOWN_BYTES: Final = 16

SW_OK: Final = 0x9000
SW_WARNING_NO_INFO: Final = 0x6300
SW_WRONG_LENGTH: Final = 0x6700
SW_LOGICAL_CHANNEL_NOT_SUPPORTED: Final = 0x6881
SW_LAST_COMMAND_EXPECTED: Final = 0x6883
SW_CHAINING_NOT_SUPPORTED: Final = 0x6884
SW_SECURITY_NOT_SATISFIED: Final = 0x6982
SW_AUTH_BLOCKED: Final = 0x6983
SW_CONDITIONS_NOT_SATISFIED: Final = 0x6985
SW_WRONG_DATA: Final = 0x6A80
SW_FUNC_NOT_SUPPORTED: Final = 0x6A81
SW_FILE_NOT_FOUND: Final = 0x6A82
SW_NOT_ENOUGH_MEMORY: Final = 0x6A84
SW_INCORRECT_P1P2: Final = 0x6A86
SW_REF_NOT_FOUND: Final = 0x6A88
SW_WRONG_P1P2: Final = 0x6B00
SW_INS_NOT_SUPPORTED: Final = 0x6D00
SW_CLA_NOT_SUPPORTED: Final = 0x6E00
SW_UNKNOWN: Final = 0x6F00


class ApduClass(Enum):
    PIN = "pin"
    PRIVATE_KEY = "private_key"
    MANAGEMENT = "management"
    OTHER = "other"


# ISO 7816-4 §11.5.6-11.5.10: VERIFY 20/21, CHANGE REFERENCE DATA 24/25, RESET RETRY COUNTER 2C/2D.
PIN_INS: Final[frozenset[int]] = frozenset({0x20, 0x21, 0x24, 0x25, 0x2C, 0x2D})
# ISO 7816-4 §11.5.11-13 INTERNAL/GENERAL AUTHENTICATE (86/87 both name GENERAL AUTHENTICATE;
# PIV signs with 87, SP 800-73-4 §3.2.4).
PRIVATE_KEY_INS: Final[frozenset[int]] = frozenset({0x86, 0x87, 0x88})
INS_PSO: Final = 0x2A
# ISO 7816-8 §11: PSO COMPUTE DIGITAL SIGNATURE (P1P2 9E9A) and DECIPHER (8086) use a private key.
PSO_PRIVATE_KEY_P1P2: Final[frozenset[int]] = frozenset({0x9E9A, 0x8086})
# GENERATE ASYMMETRIC KEY PAIR 46/47, PUT DATA DA/DB, DELETE FILE E4, CREATE FILE E0.
MANAGEMENT_INS: Final[frozenset[int]] = frozenset({0x46, 0x47, 0xDA, 0xDB, 0xE0, 0xE4})
# ISO 7816-4 §5.4.1: CLA bit b5 means "command chaining: more to come".
CLA_CHAINING: Final = 0x10


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"apdu {name} must be 0..255, got {value}")


@dataclass(frozen=True, slots=True)
class CommandApdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int | None = None  # None = no Le field; otherwise 1..65536
    extended: bool = False

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            _check_byte(name, getattr(self, name))
        if len(self.data) > MAX_EXTENDED_LC:
            raise LocalProtocolError(f"apdu data too long: {len(self.data)} > {MAX_EXTENDED_LC}")
        if self.ne is not None and not 1 <= self.ne <= MAX_EXTENDED_NE:
            raise LocalProtocolError(f"apdu ne must be 1..{MAX_EXTENDED_NE}, got {self.ne}")
        needs_extended = len(self.data) > MAX_SHORT_LC or (self.ne or 0) > MAX_SHORT_NE
        # Normalise so that equality means "same bytes on the wire": values that do not fit the
        # short form are extended, and case 1 has no extended form (ISO 7816-4 §5.1).
        if needs_extended and not self.extended:
            object.__setattr__(self, "extended", True)
        elif self.extended and not self.data and self.ne is None:
            object.__setattr__(self, "extended", False)

    @property
    def case(self) -> int:
        if not self.data:
            return 1 if self.ne is None else 2
        return 3 if self.ne is None else 4

    @classmethod
    def parse(cls, raw: bytes) -> CommandApdu:
        """Parse cases 1-4, short and extended (ISO 7816-4 §5.1). MalformedApduError otherwise."""
        raw = bytes(raw)
        if len(raw) < HEADER_LEN:
            raise MalformedApduError(f"apdu shorter than its 4-byte header: {len(raw)} bytes")
        if len(raw) > MAX_APDU_LENGTH:
            raise MalformedApduError(f"apdu too long: {len(raw)} > {MAX_APDU_LENGTH} bytes")
        cla, ins, p1, p2 = raw[:HEADER_LEN]
        body = raw[HEADER_LEN:]
        if not body:
            return cls(cla, ins, p1, p2)
        if len(body) == 1:
            return cls(cla, ins, p1, p2, ne=body[0] or MAX_SHORT_NE)
        if body[0] != 0:
            return cls._parse_short(cla, ins, p1, p2, body)
        return cls._parse_extended(cla, ins, p1, p2, body)

    @classmethod
    def _parse_short(cls, cla: int, ins: int, p1: int, p2: int, body: bytes) -> CommandApdu:
        lc = body[0]
        if len(body) == 1 + lc:
            return cls(cla, ins, p1, p2, data=body[1:])
        if len(body) == 2 + lc:
            return cls(cla, ins, p1, p2, data=body[1:-1], ne=body[-1] or MAX_SHORT_NE)
        raise MalformedApduError(f"short apdu body of {len(body)} bytes does not match lc={lc}")

    @classmethod
    def _parse_extended(cls, cla: int, ins: int, p1: int, p2: int, body: bytes) -> CommandApdu:
        if len(body) < 3:
            raise MalformedApduError(f"extended apdu body too short: {len(body)} bytes")
        value = int.from_bytes(body[1:3], "big")
        if len(body) == 3:  # case 2E: 00 Le1 Le2
            return cls(cla, ins, p1, p2, ne=value or MAX_EXTENDED_NE, extended=True)
        if value == 0:
            raise MalformedApduError("extended apdu with lc=0 and trailing bytes")
        if len(body) == 3 + value:
            return cls(cla, ins, p1, p2, data=body[3:], extended=True)
        if len(body) == 5 + value:
            ne = int.from_bytes(body[-2:], "big") or MAX_EXTENDED_NE
            return cls(cla, ins, p1, p2, data=body[3:-2], ne=ne, extended=True)
        raise MalformedApduError(f"extended apdu body of {len(body)} bytes does not match lc={value}")

    def encode(self) -> bytes:
        header = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.extended:
            return header + self._encode_extended_body()
        body = b""
        if self.data:
            body = bytes((len(self.data),)) + self.data
        if self.ne is not None:
            body += bytes((self.ne % MAX_SHORT_NE,))
        return header + body

    def _encode_extended_body(self) -> bytes:
        body = b"\x00"
        if self.data:
            body += len(self.data).to_bytes(2, "big") + self.data
        if self.ne is not None:
            body += (self.ne % MAX_EXTENDED_NE).to_bytes(2, "big")
        return body


def is_chained(cla: int) -> bool:
    """Whether a command is a link of a chain that is not the last one (ISO 7816-4 §5.4.1).

    b5 (0x10) marks chaining in the first interindustry classes (0x00-0x1F, whatever their
    secure-messaging and channel bits) and in the further ones (0x40-0x7F). Classes 0x20-0x3F
    (reserved) and the proprietary 0x80-0xFF are read the same way on purpose: most proprietary
    classes copy the layout, and taking a link for a whole command is the unsafe mistake.
    """
    return bool(cla & CLA_CHAINING)


def classify(apdu: CommandApdu) -> ApduClass:
    """Which policy class a command belongs to; the CLA (chaining, channel, proprietary) is ignored."""
    if apdu.ins in PIN_INS:
        return ApduClass.PIN
    if apdu.ins in PRIVATE_KEY_INS:
        return ApduClass.PRIVATE_KEY
    if apdu.ins == INS_PSO and (apdu.p1 << 8 | apdu.p2) in PSO_PRIVATE_KEY_P1P2:
        return ApduClass.PRIVATE_KEY
    if apdu.ins in MANAGEMENT_INS:
        return ApduClass.MANAGEMENT
    return ApduClass.OTHER


# The commands whose data a log may show (docs/guardrails.md "No secrets anywhere"): enough to
# follow a session, nothing that can carry a secret. SELECT A4 (an AID, file id or path), READ
# BINARY B0/B1 (B1: an offset object), READ RECORD B2/B3 (a record reference), GET DATA CA/CB (a
# tag list). Everything else is redacted: VERIFY-class commands, ENVELOPE C2/C3 (it may wrap any
# of them), PUT DATA, keys imported or set by vendor instructions (YubiKey FE/FF), authentication
# cryptograms (86/87/88), the data to sign (2A) and whatever a card defines beyond ISO.
SHOWN_DATA_INS: Final[frozenset[int]] = frozenset({0xA4, 0xB0, 0xB1, 0xB2, 0xB3, 0xCA, 0xCB})


def _plain_interindustry(cla: int) -> bool:
    """ISO 7816-4 §5.4.1: an interindustry class without secure messaging.

    Proprietary classes (0x80-0xFF) may give the same INS another meaning (GlobalPlatform's
    80 D8 PUT KEY sits among them), and secure-messaging data (bits 0x0C of 0x00-0x1F, bit 0x20
    of 0x40-0x7F) is cryptograms: neither is shown.
    """
    if cla < 0x20:
        return not cla & 0x0C
    return 0x40 <= cla < 0x80 and not cla & 0x20


def redact(raw: bytes) -> str:
    """Log-safe rendering of a command APDU: data only for `SHOWN_DATA_INS`; never raises."""
    try:
        raw = bytes(raw)
        try:
            apdu = CommandApdu.parse(raw)
        except MalformedApduError:
            if len(raw) < HEADER_LEN:
                return f"<malformed apdu, {len(raw)} bytes>"
            header = raw[:HEADER_LEN].hex(" ").upper()
            return f"{header} <malformed, {len(raw) - HEADER_LEN} bytes redacted>"
        return _render(apdu, show=apdu.ins in SHOWN_DATA_INS and _plain_interindustry(apdu.cla))
    except Exception:  # pragma: no cover - defensive: a logging helper must not raise
        return "<unrenderable apdu>"


def _render(apdu: CommandApdu, *, show: bool) -> str:
    text = bytes((apdu.cla, apdu.ins, apdu.p1, apdu.p2)).hex(" ").upper()
    if apdu.data and show:
        shown = apdu.data[:REDACT_SHOWN_BYTES].hex(" ").upper()
        more = "" if len(apdu.data) <= REDACT_SHOWN_BYTES else f" ...(+{len(apdu.data) - REDACT_SHOWN_BYTES})"
        text += f" Lc={len(apdu.data):02X} {shown}{more}"
    elif apdu.data:
        text += f" Lc={len(apdu.data):02X} <{len(apdu.data)} bytes redacted>"
    if apdu.ne is not None:
        text += f" Le={apdu.ne}"
    return text


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    data: bytes
    sw1: int
    sw2: int

    def __post_init__(self) -> None:
        _check_byte("sw1", self.sw1)
        _check_byte("sw2", self.sw2)

    @property
    def sw(self) -> int:
        return self.sw1 << 8 | self.sw2

    @classmethod
    def parse(cls, raw: bytes) -> ResponseApdu:
        raw = bytes(raw)
        if len(raw) < 2:
            raise MalformedApduError(f"response apdu shorter than its status word: {len(raw)} bytes")
        if len(raw) > MAX_EXTENDED_NE + 2:
            raise MalformedApduError(f"response apdu too long: {len(raw)} bytes")
        return cls(raw[:-2], raw[-2], raw[-1])

    def encode(self) -> bytes:
        return self.data + bytes((self.sw1, self.sw2))


def retries_left(sw: int) -> int | None:
    """ISO 7816-4 §5.6: 63Cx after VERIFY means x tries remain."""
    if sw & 0xFFF0 == 0x63C0:
        return sw & 0x0F
    return None


_SW_TEXT: Final[dict[int, str]] = {
    SW_OK: "success",
    SW_WRONG_LENGTH: "wrong length",
    SW_LAST_COMMAND_EXPECTED: "last command of the chain expected",
    SW_CHAINING_NOT_SUPPORTED: "command chaining not supported",
    SW_SECURITY_NOT_SATISFIED: "security status not satisfied",
    SW_AUTH_BLOCKED: "authentication method blocked",
    SW_CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW_WRONG_DATA: "incorrect data",
    SW_FUNC_NOT_SUPPORTED: "function not supported",
    SW_FILE_NOT_FOUND: "file or application not found",
    SW_NOT_ENOUGH_MEMORY: "not enough memory",
    SW_INCORRECT_P1P2: "incorrect p1/p2",
    SW_REF_NOT_FOUND: "referenced data not found",
    SW_WRONG_P1P2: "wrong p1/p2",
    SW_INS_NOT_SUPPORTED: "instruction not supported",
    SW_CLA_NOT_SUPPORTED: "class not supported",
    SW_UNKNOWN: "no precise diagnosis",
}


def describe_sw(sw: int) -> str:
    """Short human text for a status word, e.g. for audit lines and CLI output."""
    left = retries_left(sw)
    if left is not None:
        return f"{sw:04X}: verification failed, {left} tries left"
    if sw >> 8 == 0x61:
        return f"{sw:04X}: {sw & 0xFF or 256} more bytes available"
    if sw >> 8 == 0x6C:
        return f"{sw:04X}: wrong le, exact length is {sw & 0xFF or 256}"
    return f"{sw:04X}: {_SW_TEXT.get(sw, 'unknown status')}"
