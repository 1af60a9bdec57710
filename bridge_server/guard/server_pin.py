"""The server-held PIN (issue 16): recognise a build VM's placeholder VERIFY and put the real PIN in.

Theory of operation
-------------------
For the identities a token lists in `server_pin.for`, the application on the build VM logs in
with the fixed placeholder `PLACEHOLDER` ("000000"); the server, which sees whole APDUs, swaps
the placeholder for the PIN it holds just before the command goes to the card. This module is
the pure part: `decide` says what to do with one command APDU, `fill` builds the APDU that goes
to the card. The token task calls them through `Guardrails` after the command policy and the
PIN guard have let the command through (`screen`), so a chained PIN command was already refused
and an engaged guard already answered.

`decide(raw, listed=..., references=..., pin_length=...)`:

- not a PIN-class command (INS 20/21, 24/25, 2C/2D), or a PIN command without data (the status
  query that asks for the retry counter and spends nothing): `FORWARD`, for everybody;
- from an identity that is *not* listed: `FORWARD`, except a VERIFY whose data is the placeholder,
  which is `REFUSE`d so it never reaches the card (an identity taken off the list while its VM
  still sends the placeholder would otherwise spend one of the card's retries with it);
- from a listed identity: `SUBSTITUTE` only for a plain VERIFY (INS 20, P1 00, no chaining, no
  secure messaging) of one of the token's PIN `references` (P2) whose data is the placeholder,
  padded or not, and whose padding leaves room for the real PIN; every other data-carrying PIN
  command is `REFUSE`d: the listed VM holds no PIN, so whatever else it sends can only spend a
  retry (CHANGE REFERENCE DATA, RESET RETRY COUNTER, VERIFY of the PUK, a VERIFY carrying
  something other than the placeholder).

Why a fixed placeholder rather than "any PIN" (docs/guardrails.md): a listed VM that still sends
a real PIN (a CI secret nobody removed) is refused and told so, instead of silently working and
keeping the PIN on the VM; and the server can recognise the placeholder from anyone else.

`fill(raw, pin)`: the same command with the placeholder replaced by the PIN. Padding follows the
application's own: middleware pads the PIN field as the card expects (OpenSC's PIV driver pads
to 8 bytes with 0xFF, SP 800-73-4 Part 2 §3.2.1), so when the placeholder came padded with 0xFF
the PIN is padded with 0xFF to the same length; when it came bare, the PIN goes bare. The Lc
form (short or extended) and any Le are kept. The result is a `bytearray` the caller wipes once
the card has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from protocol.apdu import PIN_INS, CommandApdu, is_chained
from protocol.errors import MalformedApduError

PLACEHOLDER: Final = b"000000"
PAD_BYTE: Final = 0xFF
VERIFY_INS: Final = 0x20
# PIV (SP 800-73-4 Part 2 §3.2.1): 80 is the PIV Card Application PIN, what OpenSC presents.
DEFAULT_PIV_REFERENCES: Final = frozenset({0x80})
_SECURE_MESSAGING: Final = 0x0C  # ISO 7816-4 §5.4.1, CLA b4-b3 of the first interindustry classes


class Verdict(Enum):
    FORWARD = "forward"  # nothing to do with the server PIN: the command goes on unchanged
    SUBSTITUTE = "substitute"  # the placeholder VERIFY of a listed identity: `fill` it
    REFUSE = "refuse"  # answered without reaching the card (`Decision.detail` says why)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    detail: str = ""


_FORWARD: Final = Decision(Verdict.FORWARD)


def unpadded(data: bytes) -> bytes:
    """The PIN field without its trailing 0xFF padding."""
    return data.rstrip(bytes((PAD_BYTE,)))


def is_placeholder(data: bytes) -> bool:
    return unpadded(data) == PLACEHOLDER


def _secure_messaging(cla: int) -> bool:
    """Whether the data may be cryptograms (ISO 7816-4 §5.4.1), which nobody can rewrite."""
    if cla < 0x40:
        return bool(cla & _SECURE_MESSAGING)
    return cla >= 0x80 or bool(cla & 0x20)


def decide(raw: bytes, *, listed: bool, references: frozenset[int], pin_length: int) -> Decision:
    """What to do with command APDU `raw` from an identity that is (not) `listed`. See the docstring."""
    if len(raw) < 4 or raw[1] not in PIN_INS:
        return _FORWARD
    try:
        apdu = CommandApdu.parse(raw)
    except MalformedApduError:
        # Unreadable: a listed VM has no PIN to spend, anyone else is the PIN guard's business.
        return Decision(Verdict.REFUSE, "a malformed PIN command") if listed else _FORWARD
    if not apdu.data:
        return _FORWARD  # the status query: spends no retry, answered by the card
    if not listed:
        if apdu.ins == VERIFY_INS and is_placeholder(apdu.data):
            return Decision(
                Verdict.REFUSE, "the server-PIN placeholder from an identity not in server_pin.for"
            )
        return _FORWARD
    return _listed(apdu, references, pin_length)


def _listed(apdu: CommandApdu, references: frozenset[int], pin_length: int) -> Decision:
    if apdu.ins != VERIFY_INS:
        return Decision(Verdict.REFUSE, f"instruction {apdu.ins:02X} cannot use the server-held PIN")
    if is_chained(apdu.cla) or _secure_messaging(apdu.cla) or apdu.p1 != 0:
        return Decision(
            Verdict.REFUSE, f"a VERIFY with CLA {apdu.cla:02X} P1 {apdu.p1:02X} cannot be rewritten"
        )
    if apdu.p2 not in references:
        return Decision(Verdict.REFUSE, f"PIN reference {apdu.p2:02X} is not in server_pin.references")
    if not is_placeholder(apdu.data):
        return Decision(Verdict.REFUSE, "a VERIFY that does not carry the placeholder 000000")
    if len(apdu.data) > len(PLACEHOLDER) and pin_length > len(apdu.data):
        return Decision(Verdict.REFUSE, "the server-held PIN is longer than the card's padded PIN field")
    return Decision(Verdict.SUBSTITUTE)


def fill(raw: bytes, pin: bytes | bytearray) -> bytearray:
    """`raw` (a VERIFY `decide` said to SUBSTITUTE) carrying `pin` instead of the placeholder.

    Raises MalformedApduError if `raw` does not parse (the caller checked it with `decide`).
    """
    apdu = CommandApdu.parse(raw)
    padded = len(apdu.data) > len(PLACEHOLDER)
    length = len(apdu.data) if padded else len(pin)  # `decide` checked that the PIN fits
    out = bytearray(raw[:4])
    if apdu.extended:
        out += b"\x00" + length.to_bytes(2, "big")
    else:
        out.append(length)
    out += pin
    out += bytes((PAD_BYTE,)) * (length - len(pin))
    if apdu.ne is not None:
        out += (apdu.ne % 65536).to_bytes(2, "big") if apdu.extended else bytes((apdu.ne % 256,))
    return out


def wipe(buffer: bytearray | None) -> None:
    """Overwrite a buffer that held the PIN (what Python lets us do; docs/guardrails.md)."""
    if buffer is not None:
        buffer[:] = bytes(len(buffer))


class ServerPin:
    """The PIN a token's server holds, kept in a bytearray that never prints.

    repr/str say nothing, pickling is refused, and `wipe` overwrites it when it is replaced.
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytearray) -> None:
        self._value = value

    @property
    def value(self) -> bytearray:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "ServerPin(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a server PIN is not serialisable")

    def wipe(self) -> None:
        wipe(self._value)
