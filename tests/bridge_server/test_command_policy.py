"""Command policy: clients may not change the card; admins and listed identities may."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from rails_fakes import SELECT_PIV, PivDevice, apdu, lease, make_manager, make_rails, verify_apdu
from server_fakes import Client

from bridge_server.config import parse_server_config
from bridge_server.guard.command_policy import check_command, may_manage
from bridge_server.net.hub import Hub
from bridge_server.simulator.piv import PivCard
from protocol import wire
from protocol.errors import ConfigError

# PUT DATA of the printed-information object, and CHANGE REFERENCE DATA of the PIN (old||new).
# CHANGE REFERENCE DATA, RESET RETRY COUNTER, GENERATE, PUT DATA, DELETE (the old deny list).
MANAGEMENT_INS = (0x24, 0x25, 0x2C, 0x2D, 0x47, 0xDA, 0xDB, 0xE4)
PUT_DATA = bytes.fromhex("00DB3FFF0A5C035FC10953034142 43".replace(" ", ""))
CHANGE_PIN = bytes.fromhex("0024008010") + b"123456\xff\xff" + b"654321\xff\xff"


@pytest.mark.parametrize("ins", sorted(MANAGEMENT_INS))
def test_every_management_instruction_is_refused_for_a_client_with_6985(ins: int) -> None:
    refusal = check_command(ins, manager=False)
    assert refusal is not None
    assert refusal.sw == 0x6985
    assert check_command(ins, manager=True) is None


@pytest.mark.parametrize("ins", [0x20, 0x87, 0xCB, 0xA4, 0xC0])
def test_reading_logging_in_and_signing_are_not_management(ins: int) -> None:
    assert check_command(ins, manager=False) is None


def test_admins_and_listed_identities_may_manage() -> None:
    assert may_manage(("vm1",), admin=True, allow_management=())
    assert may_manage(("host", "ops-laptop"), admin=False, allow_management=("ops-laptop",))
    assert not may_manage(("vm1",), admin=False, allow_management=("ops-laptop",))


def _token_doc(policy: object) -> dict[str, object]:
    return {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [
            {"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": ["vm1"], "policy": policy}
        ],
    }


def test_policy_allow_management_is_read_from_the_token_config(tmp_path: Path) -> None:
    config = parse_server_config(_token_doc({"allow_management": ["ops-laptop"]}), tmp_path / "s.yaml")
    assert config.tokens[0].policy.allow_management == ("ops-laptop",)
    with pytest.raises(ConfigError, match="allow_management"):
        parse_server_config(_token_doc({"allow_managment": ["x"]}), tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="identity names"):
        parse_server_config(_token_doc({"allow_management": "ops"}), tmp_path / "s.yaml")


async def test_a_clients_put_data_and_change_reference_data_are_refused_audited_and_never_reach_the_card(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    card = PivCard()
    device, hub = PivDevice(card), Hub()
    rails = make_rails(tmp_path)
    manager = make_manager(hub, device, rails)
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    epoch = await lease(manager, client)
    assert (await apdu(manager, client, epoch, SELECT_PIV))[0][-2:] == b"\x90\x00"
    assert (await apdu(manager, client, epoch, verify_apdu("123456")))[0] == b"\x90\x00"
    for command in (PUT_DATA, CHANGE_PIN):
        answer, notes = await apdu(manager, client, epoch, command)
        assert answer == b"\x69\x85"
        assert [n.code for n in notes if isinstance(n, wire.ErrorMessage)] == ["command_refused"]
    assert all(c[1] not in (0xDB, 0x24) for c in device.card.commands)
    refused = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    refused = [d for d in refused if d["event"] == "command.refused"]
    assert [(d["ins"], d["sw"], d["reason"], d["client_id"]) for d in refused] == [
        ("DB", "6985", "policy", "vm1"),
        ("24", "6985", "policy", "vm1"),
    ]
    assert "654321" not in (tmp_path / "audit.jsonl").read_text()


async def test_an_admins_put_data_and_change_reference_data_reach_the_card(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    card = PivCard()
    device, hub = PivDevice(card), Hub()
    manager = make_manager(hub, device, make_rails(tmp_path))
    await nursery.start(manager.run)
    admin = Client(hub, "ops", admin=True)
    epoch = await lease(manager, admin)
    await apdu(manager, admin, epoch, SELECT_PIV)
    assert (await apdu(manager, admin, epoch, verify_apdu("123456")))[0] == b"\x90\x00"
    assert (await apdu(manager, admin, epoch, CHANGE_PIN))[0] == b"\x90\x00"
    assert (await apdu(manager, admin, epoch, PUT_DATA))[0][-2:] != b"\x69\x85"
    assert [c[1] for c in device.card.commands if c[1] in (0xDB, 0x24)] == [0x24, 0xDB]
    assert (await apdu(manager, admin, epoch, verify_apdu("654321")))[0] == b"\x90\x00"  # the PIN changed


async def test_allow_management_lets_a_listed_non_admin_through(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    device, hub = PivDevice(PivCard()), Hub()
    manager = make_manager(hub, device, make_rails(tmp_path, allow_management=("vm2",)))
    await nursery.start(manager.run)
    client = Client(hub, "vm2")
    epoch = await lease(manager, client)
    await apdu(manager, client, epoch, SELECT_PIV)
    await apdu(manager, client, epoch, verify_apdu("123456"))
    assert (await apdu(manager, client, epoch, CHANGE_PIN))[0] == b"\x90\x00"
