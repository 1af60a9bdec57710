"""What a refused build machine sees: every instruction that would change the token is refused by name.

An operator reads the refused instruction's name in the client's notice and the audit log
("PUT DATA is not allowed for 'vm1'"); a wrong or missing name hides what a build machine tried.
The names below are written from the standards, listed the way each standard lists them (name,
then its instruction bytes), not from the product's table:
- ISO/IEC 7816-4:2020 §11 (interindustry commands; Table 4 "INS codes"),
- ISO/IEC 7816-9:2017 §8 (file and card lifecycle commands),
- NIST SP 800-73-4 Part 2 §3 (PIV card commands),
- Yubico's PIV extensions (developers.yubico.com, "PIV commands": GET SERIAL F8, SET PIN
  RETRIES FA, RESET FB, GET VERSION FD, IMPORT KEY FE, SET MANAGEMENT KEY FF).
"""

from __future__ import annotations

import pytest

from bridge_server.guard.command_policy import (
    FAMILIES,
    allowed_instructions,
    check_command,
    default_family,
    may_manage,
)

# Instructions that write, erase, create, delete, end a file's or the card's life, change a PIN
# or its retry counter, switch verification off, or make or replace a key. No family lists them.
CHANGES_THE_TOKEN: list[tuple[str, tuple[int, ...]]] = [
    # ISO 7816-4 §11.2 (data units), §11.3 (records), §11.4 (data objects)
    ("ERASE BINARY", (0x0E, 0x0F)),
    ("WRITE BINARY", (0xD0, 0xD1)),
    ("UPDATE BINARY", (0xD6, 0xD7)),
    ("WRITE RECORD", (0xD2,)),
    ("UPDATE RECORD", (0xDC, 0xDD)),
    ("APPEND RECORD", (0xE2,)),
    ("PUT DATA", (0xDA, 0xDB)),
    # ISO 7816-4 §11.5 (security)
    ("CHANGE REFERENCE DATA", (0x24, 0x25)),
    ("ENABLE VERIFICATION REQUIREMENT", (0x28,)),
    ("DISABLE VERIFICATION REQUIREMENT", (0x26,)),
    ("RESET RETRY COUNTER", (0x2C, 0x2D)),
    ("GENERATE ASYMMETRIC KEY PAIR", (0x46, 0x47)),
    ("EXTERNAL AUTHENTICATE", (0x82,)),
    # ISO 7816-4 §11.6.2: hides another command in its data
    ("ENVELOPE", (0xC2, 0xC3)),
    # ISO 7816-9 §8
    ("CREATE FILE", (0xE0,)),
    ("DELETE FILE", (0xE4,)),
    ("DEACTIVATE FILE", (0x04,)),
    ("ACTIVATE FILE", (0x44,)),
    ("TERMINATE DF", (0xE6,)),
    ("TERMINATE EF", (0xE8,)),
    # Yubico PIV extensions (FE is also ISO 7816-9's TERMINATE CARD USAGE)
    ("SET PIN RETRIES (YubiKey)", (0xFA,)),
    ("RESET (YubiKey)", (0xFB,)),
    ("TERMINATE CARD USAGE / IMPORT KEY (YubiKey)", (0xFE,)),
    ("SET MANAGEMENT KEY (YubiKey)", (0xFF,)),
]

# Instructions one family's signing middleware sends and another's never does.
ONE_FAMILYS_SIGNING: list[tuple[str, tuple[int, ...], str]] = [
    ("MANAGE SECURITY ENVIRONMENT", (0x22,), "piv"),  # ISO 7816-4 §11.5.11: PKCS#15 picks its key
    ("PERFORM SECURITY OPERATION", (0x2A,), "piv"),  # ISO 7816-8 §5: PKCS#15 and OpenPGP sign
    ("GENERAL AUTHENTICATE", (0x86,), "yubikey"),  # ISO 7816-4 §11.5.5, odd-INS form 87 is PIV's
    ("INTERNAL AUTHENTICATE", (0x88,), "piv"),  # ISO 7816-4 §11.5.3
    ("GET SERIAL (YubiKey)", (0xF8,), "pkcs15"),
    ("GET VERSION (YubiKey)", (0xFD,), "pkcs15"),
]

# What every family's middleware sends to read and log in (ISO 7816-4 §11.1-11.5, SP 800-73-4).
READS_AND_LOGS_IN: list[tuple[str, tuple[int, ...]]] = [
    ("SELECT", (0xA4,)),
    ("READ BINARY", (0xB0, 0xB1)),
    ("READ RECORD", (0xB2, 0xB3)),
    ("GET DATA", (0xCA, 0xCB)),
    ("GET RESPONSE", (0xC0,)),
    ("VERIFY", (0x20, 0x21)),
    ("MANAGE CHANNEL", (0x70,)),
    ("GET CHALLENGE", (0x84,)),
    ("GENERAL AUTHENTICATE", (0x87,)),
]


def _each(table: list[tuple[str, tuple[int, ...]]]) -> list[tuple[int, str]]:
    return [(ins, name) for name, codes in table for ins in codes]


def _hex_ids(value: object) -> str:
    return f"{value:02X}" if isinstance(value, int) else str(value)


@pytest.mark.parametrize(("ins", "name"), _each(CHANGES_THE_TOKEN), ids=_hex_ids)
def test_an_instruction_that_changes_the_token_is_refused_in_every_family_by_its_name(
    ins: int, name: str
) -> None:
    for family in FAMILIES:
        refusal = check_command(ins, manager=False, allowed=allowed_instructions(family))
        assert refusal is not None, family
        assert (refusal.ins, refusal.command, refusal.sw) == (ins, name, 0x6985)


@pytest.mark.parametrize(
    ("ins", "name", "family"),
    [(ins, name, family) for name, codes, family in ONE_FAMILYS_SIGNING for ins in codes],
    ids=_hex_ids,
)
def test_another_familys_signing_instruction_is_refused_by_its_name(ins: int, name: str, family: str) -> None:
    refusal = check_command(ins, manager=False, allowed=allowed_instructions(family))
    assert refusal is not None
    assert (refusal.ins, refusal.command) == (ins, name)
    others = [f for f in FAMILIES if f != family]
    assert any(check_command(ins, manager=False, allowed=allowed_instructions(f)) is None for f in others)


@pytest.mark.parametrize(("ins", "name"), _each(READS_AND_LOGS_IN), ids=_hex_ids)
def test_a_reading_instruction_is_allowed_everywhere_and_named_where_a_narrower_list_refuses_it(
    ins: int, name: str
) -> None:
    for family in FAMILIES:
        assert check_command(ins, manager=False, allowed=allowed_instructions(family)) is None
    refusal = check_command(ins, manager=False, allowed=frozenset())
    assert refusal is not None
    assert refusal.command == name


@pytest.mark.parametrize("ins", [0x00, 0x0A, 0x30, 0x45, 0xA0, 0xE1, 0xFC])
def test_an_instruction_no_standard_names_is_refused_as_an_instruction_byte(ins: int) -> None:
    refusal = check_command(ins, manager=False, allowed=frozenset())
    assert refusal is not None
    assert refusal.command == f"instruction {ins:02X}"


def test_a_manager_may_send_anything_even_envelope_and_a_headerless_command() -> None:
    for ins in (0xC2, 0xDB, 0xFB, None):
        assert check_command(ins, manager=True, allowed=frozenset()) is None


def test_only_an_admin_or_a_listed_name_may_manage() -> None:
    assert may_manage((), admin=True, allow_management=())
    assert not may_manage((), admin=False, allow_management=("vm1",))
    assert not may_manage(("vm1", "vm2"), admin=False, allow_management=())
    assert may_manage(("vm1", "vm2"), admin=False, allow_management=("vm2",))


@pytest.mark.parametrize(
    ("simulate", "vid", "family"),
    [
        ("yubikey5", None, "yubikey"),
        ("yubikey-neo", 0x1050, "yubikey"),
        ("piv", 0x1050, "piv"),  # a simulated PIV card, whatever the USB id says
        ("safenet5110", None, "piv"),  # every simulated card runs the PIV applet
        ("my-yubikey", None, "piv"),  # only a profile that starts with "yubikey" is one
        (None, 0x1050, "yubikey"),  # Yubico's USB vendor id
        (None, 0x1051, "pkcs15"),
        (None, 0x104F, "pkcs15"),
        (None, None, "pkcs15"),
    ],
)
def test_a_tokens_family_follows_its_simulated_profile_or_its_usb_vendor(
    simulate: str | None, vid: int | None, family: str
) -> None:
    assert default_family(simulate=simulate, vid=vid) == family
