"""The command policy is an allow list per card family (issue 13 item 5).

The review sent these from a non-admin and every one reached the card under the old PIV-only
deny list: ISO GENERATE 46, CREATE FILE E0, UPDATE/WRITE BINARY D6/D0, UPDATE RECORD DC, ERASE 0E,
TERMINATE E6/FE, DEACTIVATE/ACTIVATE 04/44, YubiKey FA/FB/FE/FF and an ENVELOPE (C2) wrapping
PUT DATA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from rails_fakes import SELECT_PIV, PivDevice, apdu, lease, make_manager, make_rails, verify_apdu
from server_fakes import Client

from bridge_server.config import PolicyConfig, parse_server_config
from bridge_server.guard.command_policy import FAMILIES, allowed_instructions, check_command, default_family
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from protocol.errors import ConfigError

# Every writing/lifecycle instruction the review got through, plus ENVELOPE both ways.
REVIEW_INS = [0x46, 0xE0, 0xD6, 0xD0, 0xDC, 0x0E, 0xE6, 0xFE, 0x04, 0x44, 0xFA, 0xFB, 0xFF, 0xC2, 0xC3]
# What the signing middleware of each family sends (OpenSC's PIV and PKCS#15 drivers).
SIGNING_INS = {
    "piv": [0xA4, 0xC0, 0xCB, 0x20, 0x87],
    "yubikey": [0xA4, 0xC0, 0xCB, 0x20, 0x87, 0xFD, 0xF8, 0x2A, 0x88],
    "pkcs15": [0xA4, 0xB0, 0xB2, 0xCA, 0xC0, 0x20, 0x21, 0x22, 0x2A, 0x84, 0x88, 0x70],
}
# ENVELOPE (CLA 00, INS C2) whose data is PUT DATA of the printed-information object.
ENVELOPE_PUT_DATA = bytes.fromhex("00C200000E" + "00DB3FFF09" + "5C035FC109" + "53024142")
UPDATE_BINARY = bytes.fromhex("00D6000004" + "0102030A")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("ins", REVIEW_INS)
def test_every_writing_instruction_the_review_sent_is_refused_for_a_client(family: str, ins: int) -> None:
    allowed = allowed_instructions(family)
    refusal = check_command(ins, manager=False, allowed=allowed)
    assert refusal is not None
    assert refusal.sw == 0x6985
    assert check_command(ins, manager=True, allowed=allowed) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_allows_what_its_signing_middleware_sends(family: str) -> None:
    allowed = allowed_instructions(family)
    assert [i for i in SIGNING_INS[family] if check_command(i, manager=False, allowed=allowed)] == []


def test_an_unknown_instruction_is_refused_and_named_by_its_byte() -> None:
    refusal = check_command(0x99, manager=False, allowed=allowed_instructions("piv"))
    assert refusal is not None
    assert refusal.command == "instruction 99"


def test_a_command_too_short_to_have_a_header_is_refused() -> None:
    assert check_command(None, manager=False) is not None
    assert check_command(None, manager=True) is None


def test_allow_ins_extends_the_family_but_never_with_envelope() -> None:
    policy = PolicyConfig(family="piv", allow_ins=(0xD6, 0xC2))
    assert 0xD6 in policy.allowed
    assert 0xC2 not in policy.allowed
    assert check_command(0xC2, manager=False, allowed=frozenset({0xC2})) is not None


@pytest.mark.parametrize(
    ("match", "family"),
    [
        ({"simulate": "safenet-5110"}, "piv"),
        ({"simulate": "yubikey5"}, "yubikey"),
        ({"vid": 0x1050, "pid": 0x0407}, "yubikey"),
        ({"vid": 0x096E, "pid": 0x0807}, "pkcs15"),
    ],
)
def test_the_family_follows_the_tokens_match_unless_configured(match: dict[str, object], family: str) -> None:
    config = parse_server_config(_token_doc({}, match), Path("/etc/tokenbridge/server.yaml"))
    assert config.tokens[0].policy.family == family
    assert default_family(simulate=match.get("simulate"), vid=match.get("vid")) == family  # type: ignore[arg-type]


def _token_doc(policy: object, match: object = None) -> dict[str, object]:
    return {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [
            {
                "name": "codesign",
                "match": match or {"vid": 0x0529, "pid": 0x0620},
                "allow": ["vm1"],
                "policy": policy,
            }
        ],
    }


def test_policy_family_and_allow_ins_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    config = parse_server_config(_token_doc({"family": "piv", "allow_ins": [0xD6, "dc", "0x0E"]}), path)
    assert config.tokens[0].policy.family == "piv"
    assert config.tokens[0].policy.allow_ins == (0xD6, 0xDC, 0x0E)
    assert {0xD6, 0xDC, 0x0E} <= config.tokens[0].policy.allowed
    with pytest.raises(ConfigError, match=r"policy\.family.*one of: piv, yubikey, pkcs15"):
        parse_server_config(_token_doc({"family": "opengpg"}), path)
    with pytest.raises(ConfigError, match=r"allow_ins\[1\].*instruction byte"):
        parse_server_config(_token_doc({"allow_ins": [0xD6, 300]}), path)
    with pytest.raises(ConfigError, match=r"allow_ins\[0\].*ENVELOPE"):
        parse_server_config(_token_doc({"allow_ins": [0xC2]}), path)
    with pytest.raises(ConfigError, match=r"allow_ins.*list"):
        parse_server_config(_token_doc({"allow_ins": "D6"}), path)


async def test_a_clients_envelope_and_update_binary_are_refused_audited_and_never_reach_the_card(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    device, hub = PivDevice(PivCard()), Hub()
    manager = make_manager(hub, device, make_rails(tmp_path))
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    epoch = await lease(manager, client)
    assert (await apdu(manager, client, epoch, SELECT_PIV))[0][-2:] == b"\x90\x00"
    assert (await apdu(manager, client, epoch, verify_apdu("123456")))[0] == b"\x90\x00"
    for command in (ENVELOPE_PUT_DATA, UPDATE_BINARY, bytes.fromhex("00FB0000"), b"\x00\xc2"):
        assert (await apdu(manager, client, epoch, command))[0] == b"\x69\x85"
    assert [c[1] for c in device.card.commands] == [0xA4, 0x20]
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [(d["ins"], d["reason"]) for d in lines if d["event"] == "command.refused"]
    assert refused == [("C2", "policy"), ("D6", "policy"), ("FB", "policy"), ("00", "policy")]


async def test_an_admins_envelope_reaches_the_card(nursery: trio.Nursery, tmp_path: Path) -> None:
    device, hub = PivDevice(PivCard()), Hub()
    manager = make_manager(hub, device, make_rails(tmp_path))
    await nursery.start(manager.run)
    admin = Client(hub, "ops", admin=True)
    epoch = await lease(manager, admin)
    await apdu(manager, admin, epoch, ENVELOPE_PUT_DATA)
    assert [c[1] for c in device.card.commands] == [0xC2]


def test_simulating_a_token_moves_a_derived_family_and_keeps_a_configured_one() -> None:
    path = Path("/etc/tokenbridge/server.yaml")
    derived = parse_server_config(_token_doc({}), path).with_simulated_tokens("yubikey5")
    assert derived.tokens[0].policy.family == "yubikey"
    configured = parse_server_config(_token_doc({"family": "piv"}, {"vid": 0x1050, "pid": 0x0407}), path)
    assert configured.with_simulated_tokens("safenet-5110").tokens[0].policy.family == "piv"
