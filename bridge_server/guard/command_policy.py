"""Command policy per token and identity (docs/guardrails.md): an allow list of what signing needs.

A build machine needs to select applications, read certificates and data objects, log in and
sign (or decipher). It never needs to change or unblock the PIN, generate or import keys, write
files, records or data objects, or delete, deactivate or terminate anything; a compromised
build VM that could would lock the token, replace the signing certificate or destroy the key.
A deny list cannot keep up with that (ISO 7816-4 alone has a dozen writing instructions, and
every vendor adds its own: YubiKey FA-FF, PKCS#15 tokens writing certificates with UPDATE
BINARY), so the policy is an allow list: per card family (`FAMILIES`), the instructions the
family's signing middleware sends, plus what a token's `policy.allow_ins` adds. Everything else
is answered `REFUSAL_SW` without reaching the card, unless the identity is an admin (config
`admins`) or on the token's `policy.allow_management`: those may send anything.

ENVELOPE (C2/C3) is never on a list and cannot be added: it carries another command inside its
data, hidden from this policy, the PIN guard and log redaction.

The instruction byte is judged whatever the CLA says (chaining, logical channel, secure
messaging, proprietary class): the card dispatches on INS, so the policy does too.

6985 ("conditions of use not satisfied") rather than 6982 ("security status not
satisfied"): 6982 tells middleware "log in first", and OpenSC may then present a cached PIN
again; 6985 says "not allowed here" and middleware gives up (OpenSC: SC_ERROR_NOT_ALLOWED,
CKR_FUNCTION_NOT_PERMITTED... depending on the call; see docs/guardrails.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from protocol.apdu import SW_CONDITIONS_NOT_SATISFIED

REFUSAL_SW: Final = SW_CONDITIONS_NOT_SATISFIED

# ISO 7816-4 §11 / 7816-8 / SP 800-73-4 names, for the audit line and the client's notice.
COMMAND_NAMES: Final[dict[int, str]] = {
    0x04: "DEACTIVATE FILE", 0x0E: "ERASE BINARY", 0x0F: "ERASE BINARY",
    0x20: "VERIFY", 0x21: "VERIFY", 0x22: "MANAGE SECURITY ENVIRONMENT",
    0x24: "CHANGE REFERENCE DATA", 0x25: "CHANGE REFERENCE DATA", 0x26: "DISABLE VERIFICATION REQUIREMENT",
    0x28: "ENABLE VERIFICATION REQUIREMENT", 0x2A: "PERFORM SECURITY OPERATION",
    0x2C: "RESET RETRY COUNTER", 0x2D: "RESET RETRY COUNTER", 0x44: "ACTIVATE FILE",
    0x46: "GENERATE ASYMMETRIC KEY PAIR", 0x47: "GENERATE ASYMMETRIC KEY PAIR",
    0x70: "MANAGE CHANNEL", 0x82: "EXTERNAL AUTHENTICATE", 0x84: "GET CHALLENGE",
    0x86: "GENERAL AUTHENTICATE", 0x87: "GENERAL AUTHENTICATE", 0x88: "INTERNAL AUTHENTICATE",
    0xA4: "SELECT", 0xB0: "READ BINARY", 0xB1: "READ BINARY", 0xB2: "READ RECORD", 0xB3: "READ RECORD",
    0xC0: "GET RESPONSE", 0xC2: "ENVELOPE", 0xC3: "ENVELOPE", 0xCA: "GET DATA", 0xCB: "GET DATA",
    0xD0: "WRITE BINARY", 0xD1: "WRITE BINARY", 0xD2: "WRITE RECORD", 0xD6: "UPDATE BINARY",
    0xD7: "UPDATE BINARY", 0xDA: "PUT DATA", 0xDB: "PUT DATA", 0xDC: "UPDATE RECORD",
    0xDD: "UPDATE RECORD", 0xE0: "CREATE FILE", 0xE2: "APPEND RECORD", 0xE4: "DELETE FILE",
    0xE6: "TERMINATE DF", 0xE8: "TERMINATE EF", 0xF8: "GET SERIAL (YubiKey)",
    0xFA: "SET PIN RETRIES (YubiKey)", 0xFB: "RESET (YubiKey)", 0xFD: "GET VERSION (YubiKey)",
    0xFE: "TERMINATE CARD USAGE / IMPORT KEY (YubiKey)", 0xFF: "SET MANAGEMENT KEY (YubiKey)",
}  # fmt: skip

# ENVELOPE (ISO 7816-4 §11.6.2) wraps a command in its data: never allowed to a plain client.
ENVELOPE_INS: Final = frozenset({0xC2, 0xC3})

# Reading and logging in, common to every family: SELECT, READ BINARY/RECORD (both encodings),
# GET DATA (CA, and CB as PIV uses it), GET RESPONSE, VERIFY (with data: log in; without: ask the
# retry counter), MANAGE CHANNEL, GET CHALLENGE.
_READ_AND_LOGIN: Final = frozenset({0xA4, 0xB0, 0xB1, 0xB2, 0xB3, 0xCA, 0xCB, 0xC0, 0x20, 0x21, 0x70, 0x84})
# SP 800-73-4 §3.2.4: PIV signs, deciphers and answers challenges with GENERAL AUTHENTICATE 87.
_PIV: Final = _READ_AND_LOGIN | {0x87}

FAMILIES: Final[dict[str, frozenset[int]]] = {
    # The PIV application (all four simulated profiles; OpenSC's PIV driver).
    "piv": _PIV,
    # YubiKey: PIV, plus its read-only GET VERSION (FD, which OpenSC's PIV driver sends to a
    # YubiKey) and GET SERIAL (F8), plus the OpenPGP application's signing (PSO 2A for a
    # signature or decipher, INTERNAL AUTHENTICATE 88). Not FA/FB/FE/FF, which change the key.
    "yubikey": _PIV | {0xFD, 0xF8, 0x2A, 0x88},
    # ISO 7816-8 / PKCS#15 tokens (SafeNet IDPrime, ePass2003, Certum, CardOS): MSE 22 to pick
    # the key and algorithm, PSO 2A to sign or decipher, INTERNAL AUTHENTICATE 88 for the older
    # raw-RSA path, GENERAL AUTHENTICATE 86/87 where a card signs that way.
    "pkcs15": _READ_AND_LOGIN | {0x22, 0x2A, 0x86, 0x87, 0x88},
}
DEFAULT_FAMILY: Final = "pkcs15"
YUBICO_VID: Final = 0x1050


def default_family(*, simulate: str | None, vid: int | None) -> str:
    """The family a token's match implies when its `policy.family` is not set."""
    if simulate is not None:
        # Every simulated profile runs the simulator's PIV card; the YubiKey one looks like one.
        return "yubikey" if simulate.startswith("yubikey") else "piv"
    return "yubikey" if vid == YUBICO_VID else DEFAULT_FAMILY


def allowed_instructions(family: str, allow_ins: Iterable[int] = ()) -> frozenset[int]:
    """The family's list plus a token's `policy.allow_ins` (never ENVELOPE)."""
    return (FAMILIES[family] | frozenset(allow_ins)) - ENVELOPE_INS


def command_name(ins: int) -> str:
    return COMMAND_NAMES.get(ins, f"instruction {ins:02X}")


@dataclass(frozen=True, slots=True)
class PolicyRefusal:
    ins: int
    command: str
    sw: int = REFUSAL_SW


def may_manage(names: Iterable[str], *, admin: bool, allow_management: tuple[str, ...]) -> bool:
    """Whether an identity (all its certificate names) may send any command."""
    return admin or any(n in allow_management for n in names)


def check_command(
    ins: int | None, *, manager: bool, allowed: frozenset[int] = FAMILIES[DEFAULT_FAMILY]
) -> PolicyRefusal | None:
    """None if the instruction may reach the card for this identity, else the refusal.

    `ins` None is a command too short to have one (fewer than 4 bytes): refused, fail closed.
    """
    if manager:
        return None
    if ins is None:
        return PolicyRefusal(0, "a command shorter than its 4-byte header")
    if ins in allowed and ins not in ENVELOPE_INS:
        return None
    return PolicyRefusal(ins, command_name(ins))
