"""The card in pcscd follows what the client may use: tunnel up, token offered, client allowed.

pcscd + vpcd + OpenSC + both daemons as real processes on loopback with real TLS; what pcscd
sees is read with `opensc-tool -l`, what the client knows with `tokenbridge-client status --json`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import VpcdSlot, card_present, wait_for

from bridge_admin.local_stack import BridgeStack
from protocol.runtime.config import dump_yaml, load_yaml

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[BridgeStack]:
    s = BridgeStack(tmp_path / "stack")
    try:
        yield s
    finally:
        s.stop()


def client_status(stack: BridgeStack, name: str) -> dict[str, Any]:
    config = stack.workdir / f"client-{name}.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "bridge_client", "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if not proc.stdout.strip():
        return {}
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_the_card_leaves_pcscd_when_the_server_stops_and_returns_when_it_is_back(
    stack: BridgeStack, vpcd_slot: VpcdSlot
) -> None:
    stack.make_pki(["build-vm-01"])
    stack.write_server_config(allow=["build-vm-01"])
    stack.start_server()
    client = stack.start_client("build-vm-01", [vpcd_slot.index])
    stack.wait_card(vpcd_slot.index, client)
    up = client_status(stack, "build-vm-01")
    assert up["tunnel"]["state"] == "connected"
    assert up["readers"][0]["card"] == "inserted"

    assert stack.server is not None
    stack.server.stop()
    stack.wait_card(vpcd_slot.index, client, present=False, timeout=10)
    down = wait_for(
        lambda: (s := client_status(stack, "build-vm-01")) and s["tunnel"]["state"] == "retrying" and s,
        timeout=10,
        what="the client to report the tunnel down",
    )
    assert down["tunnel"]["reason"].startswith("connection refused by 127.0.0.1:")
    assert down["readers"][0]["card"] == "waiting"
    assert down["readers"][0]["reason"].startswith("tunnel down: ")

    stack.start_server()
    stack.wait_card(vpcd_slot.index, client, present=True, timeout=20)


def test_no_card_appears_for_a_client_on_no_allow_list_and_status_says_why(
    stack: BridgeStack, vpcd_slot: VpcdSlot
) -> None:
    stack.make_pki(["build-vm-01", "build-vm-02"])
    stack.write_server_config(allow=["build-vm-02"])
    stack.start_server()
    client = stack.start_client("build-vm-01", [vpcd_slot.index])
    refused = wait_for(
        lambda: (s := client_status(stack, "build-vm-01")) and s["tunnel"]["state"] == "refused" and s,
        timeout=20,
        what="the client to report the refusal",
    )
    assert "not_allowed" in refused["tunnel"]["reason"]
    assert "build-vm-01" in refused["tunnel"]["reason"]
    assert refused["readers"][0]["card"] == "waiting"
    assert client.proc.poll() is None  # it keeps retrying, with backoff
    assert not card_present(vpcd_slot.index)


def test_no_card_appears_for_a_token_this_client_may_not_use(stack: BridgeStack, vpcd_slot: VpcdSlot) -> None:
    """Allowed on another token of the server, not on this one: connected, and no card."""
    stack.profiles = ["safenet-5110", "yubikey5"]  # tokens "codesign" and "token1"
    stack.make_pki(["build-vm-01", "build-vm-02"])
    config = stack.write_server_config(allow=["build-vm-02"])
    document = load_yaml(config)
    # token1 also allows build-vm-01; codesign (the reader's token) does not.
    assert document["tokens"][1]["name"] == "token1"
    document["tokens"][1]["allow"].append("build-vm-01")
    config.write_text(dump_yaml(document))
    stack.start_server()
    client = stack.start_client("build-vm-01", [vpcd_slot.index])  # one reader: codesign
    status = wait_for(
        lambda: (s := client_status(stack, "build-vm-01")) and s["tunnel"]["state"] == "connected" and s,
        timeout=20,
        what="the client to connect",
    )
    reader = status["readers"][0]
    assert (reader["token"], reader["card"], reader["token_present"]) == ("codesign", "waiting", False)
    assert reader["reason"].startswith("the server offers no token named 'codesign' to this client")
    assert client.proc.poll() is None
    assert not card_present(vpcd_slot.index)
