"""The command policy's vocabulary: each family's allow list as documented, each instruction by its name.

An operator reads the name in the audit line and in the client's notice ("PUT DATA is not
allowed for 'vm1'"): a wrong name would hide what a build machine tried. The allow lists are the
table in docs/guardrails.md; this test reads that table, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge_server.guard.command_policy import (
    DEFAULT_FAMILY,
    FAMILIES,
    allowed_instructions,
    check_command,
    command_name,
    default_family,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guardrails.md"

# Spot checks from the standards themselves, not from our table: ISO 7816-4 §11 (Table 4), ISO
# 7816-9 (file management), SP 800-73-4 Part 2 (PIV), Yubico's PIV extensions.
STANDARD_NAMES = {
    0x20: "VERIFY", 0x22: "MANAGE SECURITY ENVIRONMENT", 0x24: "CHANGE REFERENCE DATA",
    0x2A: "PERFORM SECURITY OPERATION", 0x2C: "RESET RETRY COUNTER", 0x47: "GENERATE ASYMMETRIC KEY PAIR",
    0x87: "GENERAL AUTHENTICATE", 0xA4: "SELECT", 0xB0: "READ BINARY", 0xC0: "GET RESPONSE",
    0xC2: "ENVELOPE", 0xCB: "GET DATA", 0xD6: "UPDATE BINARY", 0xDB: "PUT DATA", 0xE0: "CREATE FILE",
    0xE6: "TERMINATE DF", 0xFB: "RESET (YubiKey)", 0xFF: "SET MANAGEMENT KEY (YubiKey)",
}  # fmt: skip


@pytest.mark.parametrize(
    ("ins", "name"), sorted(STANDARD_NAMES.items()), ids=lambda v: f"{v:02X}" if isinstance(v, int) else v
)
def test_a_refused_instruction_is_called_by_its_standard_name(ins: int, name: str) -> None:
    refusal = check_command(ins, manager=False, allowed=frozenset())
    assert refusal is not None
    assert (refusal.ins, refusal.command, refusal.sw) == (ins, name, 0x6985)
    assert command_name(ins) == name


@pytest.mark.parametrize("ins", [0x00, 0x30, 0x50, 0x60, 0x90])  # no ISO 7816-4 or PIV command
def test_an_instruction_without_a_standard_name_is_called_by_its_byte(ins: int) -> None:
    assert command_name(ins) == f"instruction {ins:02X}"


def _documented_families() -> dict[str, set[int]]:
    """family -> instructions, from the allow-list table of docs/guardrails.md."""
    rows: dict[str, set[int]] = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) != 3 or not re.match(r"^(every one|`\w+`)$", cells[0]):
            continue
        family = cells[0].strip("`")
        # "B0/B1 READ BINARY" -> B0, B1; "`piv` + 87 ..." -> what `piv` has, plus 87.
        groups = re.findall(r"(?<![\w/])([0-9A-F]{2}(?:/[0-9A-F]{2})*)(?= [A-Z])", cells[1])
        codes = {int(code, 16) for group in groups for code in group.split("/")}
        base = re.match(r"`(\w+)` \+", cells[1])
        rows[family] = codes | (rows[base.group(1)] if base else set())
    return {family: codes | rows["every one"] for family, codes in rows.items() if family != "every one"}


def test_each_familys_allow_list_is_the_one_docs_guardrails_md_shows() -> None:
    documented = _documented_families()
    assert set(documented) == set(FAMILIES)
    for family, codes in documented.items():
        assert set(allowed_instructions(family)) == codes, family


def test_a_token_not_known_to_be_piv_or_a_yubikey_gets_the_pkcs15_list() -> None:
    assert DEFAULT_FAMILY == default_family(simulate=None, vid=0x096E) == "pkcs15"
    assert check_command(0x22, manager=False) is None  # the default `allowed` is pkcs15's
    assert check_command(0xFD, manager=False) is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_envelope_is_refused_in_every_family_even_if_listed(family: str) -> None:
    allowed = allowed_instructions(family, (0xC2, 0xC3, 0xD6))
    assert 0xD6 in allowed
    assert {0xC2, 0xC3}.isdisjoint(allowed)
    for ins in (0xC2, 0xC3):
        assert check_command(ins, manager=False, allowed=frozenset({ins})) is not None


def test_a_command_without_a_whole_header_is_refused_as_such() -> None:
    refusal = check_command(None, manager=False)
    assert refusal is not None
    assert (refusal.ins, refusal.command, refusal.sw) == (
        0,
        "a command shorter than its 4-byte header",
        0x6985,
    )
