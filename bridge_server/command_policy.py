"""Command policy per token and identity (docs/guardrails.md): who may change the card.

A build machine needs to read certificates, log in and sign. It never needs to change or
unblock the PIN, generate keys, write data objects or delete anything, and a compromised build
VM that could would be able to lock the token (CHANGE REFERENCE DATA with a wrong old PIN),
replace the signing certificate (PUT DATA) or destroy the key (GENERATE over it). So by
default only admin identities (config `admins`) and the identities a token lists in
`policy.allow_management` may send these instructions; everybody else gets `REFUSAL_SW`
without the command reaching the card.

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

# ISO 7816-4 / SP 800-73-4 instructions a client may not send by default, with audit names.
MANAGEMENT_INS: Final[dict[int, str]] = {
    0x24: "CHANGE REFERENCE DATA",
    0x25: "CHANGE REFERENCE DATA",
    0x2C: "RESET RETRY COUNTER",
    0x2D: "RESET RETRY COUNTER",
    0x47: "GENERATE ASYMMETRIC KEY PAIR",
    0xDA: "PUT DATA",
    0xDB: "PUT DATA",
    0xE4: "DELETE",
}


@dataclass(frozen=True, slots=True)
class PolicyRefusal:
    ins: int
    command: str
    sw: int = REFUSAL_SW


def may_manage(names: Iterable[str], *, admin: bool, allow_management: tuple[str, ...]) -> bool:
    """Whether an identity (all its certificate names) may send management commands."""
    return admin or any(n in allow_management for n in names)


def check_command(ins: int, *, manager: bool) -> PolicyRefusal | None:
    """None if the instruction may reach the card for this identity, else the refusal."""
    command = MANAGEMENT_INS.get(ins)
    if command is None or manager:
        return None
    return PolicyRefusal(ins, command)
