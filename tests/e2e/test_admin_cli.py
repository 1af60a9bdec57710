"""`tokenbridge status` (table and JSON) against a real server: idle, leased with a waiter, absent."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from admin_stack import admin_stack, cli, expect, wire_client

from bridge_admin.client import Target, call
from protocol import wire


def _row(table: str, token: str = "codesign") -> str:
    return next(line for line in table.splitlines() if line.startswith(token))


async def test_status_in_each_token_state_as_table_and_json(tmp_path: Path) -> None:
    with admin_stack(tmp_path, ["build-vm-01", "build-vm-02"], ["build-vm-01", "build-vm-02"]) as stack:
        sock = str(stack.workdir / "control.sock")
        with trio.fail_after(60):
            code, table = await cli("status", "--socket", sock)
            assert code == 0, table
            assert " idle " in _row(table)
            assert "0529:0620" in _row(table)
            async with wire_client(stack, "build-vm-01") as a, wire_client(stack, "build-vm-02") as b:
                await a.send(wire.LeaseRequest(token_id=0))
                await expect(a, wire.LeaseGranted)
                await b.send(wire.LeaseRequest(token_id=0))
                await expect(b, wire.LeaseQueued)
                code, table = await cli("status", "--socket", sock)
                code_j, text = await cli("status", "--socket", sock, "--json")
                doc = json.loads(text)
                # the same document remotely, over mutual TLS with the admin bundle
                code_r, remote = await cli(
                    "status", "--server", f"127.0.0.1:{stack.server_port}", "--server-name", "localhost",
                    "--bundle", str(stack.pki.folder / "clients" / "ops"), "--json",
                )  # fmt: skip
                code_v, revoked = await cli("lease", "revoke", "codesign", "--socket", sock)
                await expect(b, wire.LeaseGranted)
            row = _row(table)
            assert code == 0 and " leased " in row and "build-vm-01 (" in row and "build-vm-02 (" in row
            (tok,) = doc["tokens"]
            assert (code_j, doc["schema"], tok["state"], tok["holder"]["identity"]) == (
                0,
                1,
                "leased",
                "build-vm-01",
            )
            assert [q["identity"] for q in tok["queue"]] == ["build-vm-02"]
            assert {c["identity"] for c in doc["clients"]} == {"build-vm-01", "build-vm-02"}
            assert code_r == 0, remote
            assert json.loads(remote)["tokens"][0]["holder"]["identity"] == "build-vm-01"
            assert code_v == 0 and "build-vm-01" in revoked
            assert (await call(Target(socket=Path(sock)), "simulator.unplug", {"token": "codesign"}))["ok"]
            while True:
                code, text = await cli("status", "--socket", sock, "--json")
                if json.loads(text)["tokens"][0]["state"] == "absent":
                    break
                await trio.sleep(0.2)
            code, table = await cli("status", "--socket", sock)
            assert " absent " in _row(table)
            assert json.loads(text)["tokens"][0]["present"] is False


async def test_admin_commands_explain_a_missing_server(tmp_path: Path) -> None:
    code, out = await cli("status", "--socket", str(tmp_path / "nope.sock"))
    assert code == 1
    assert "cannot reach control socket" in out and "is tokenbridge-server running?" in out
