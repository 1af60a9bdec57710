"""The admin dispatcher, over the wire (admin identities) and the control socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import trio
from admin_fixtures import Certs, connect, expect, running
from server_fakes import FakeDevice

from bridge_admin.client import Target, call
from protocol import ccid, wire

SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")


async def _admin(client: Any, action: str, args: dict[str, Any] | None = None) -> wire.AdminResponse:
    await client.send(wire.AdminRequest(request_id=7, action=action, args=args or {}))
    return await expect(client, wire.AdminResponse)


async def test_admin_identity_gets_status_over_the_wire(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    with trio.fail_after(20):
        async with running(tmp_path) as (_srv, port), connect(certs, port, "ops") as ops:
            resp = await _admin(ops, "status")
    assert resp.ok
    result = resp.result
    assert [t["state"] for t in result["tokens"]] == ["idle"]
    assert [c["identity"] for c in result["clients"]] == ["ops"]


async def test_non_admin_identity_is_refused(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    with trio.fail_after(20):
        async with running(tmp_path) as (_srv, port), connect(certs, port, "build-vm-01") as vm:
            resp = await _admin(vm, "lease.revoke", {"token": "codesign"})
    assert not resp.ok
    assert "not an admin" in resp.error


async def test_lease_revoke_hands_the_token_to_the_waiter(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    sock = Target(socket=tmp_path / "control.sock")
    with trio.fail_after(30), structlog.testing.capture_logs() as logs:
        async with (
            running(tmp_path) as (_srv, port),
            connect(certs, port, "build-vm-01") as a,
            connect(certs, port, "build-vm-02") as b,
        ):
            await a.send(wire.LeaseRequest(token_id=0))
            first = await expect(a, wire.LeaseGranted)
            await b.send(wire.LeaseRequest(token_id=0))
            for _ in range(200):
                if (await call(sock, "status"))["result"]["tokens"][0]["queue"]:
                    break
                await trio.sleep(0.05)
            answer = await call(sock, "lease.revoke", {"token": "codesign"})
            ended = await expect(a, wire.LeaseEnded)
            second = await expect(b, wire.LeaseGranted)
    assert answer["ok"] and answer["result"]["revoked"]["identity"] == "build-vm-01"
    assert (ended.epoch, ended.reason) == (first.epoch, "revoked")
    assert second.epoch != first.epoch
    done = [e for e in logs if e["event"] == "admin.action_done"]
    assert done and done[0]["actor"].startswith("local:")


async def test_simulator_hooks_unplug_replug_and_show_evidence(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    sock = Target(socket=tmp_path / "control.sock")
    with trio.fail_after(30):
        async with running(tmp_path) as (_srv, port):
            for name in ("build-vm-01", "build-vm-02"):
                async with connect(certs, port, name) as c:
                    await c.send(wire.LeaseRequest(token_id=0))
                    granted = await expect(c, wire.LeaseGranted)
                    msg = ccid.xfr_block(1, SELECT_PIV).encode()
                    await c.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=msg))
                    await expect(c, wire.CcidFrame)
            evidence = (await call(sock, "simulator.evidence", {"token": "codesign"}))["result"]
            assert (await call(sock, "simulator.unplug", {"token": "codesign"}))["ok"]
            for _ in range(100):
                if (await call(sock, "status"))["result"]["tokens"][0]["state"] == "absent":
                    break
                await trio.sleep(0.1)
            assert (await call(sock, "simulator.replug", {"token": "codesign"}))["ok"]
    epochs = [e for kind, e, _ in evidence["events"] if kind == "apdu"]
    assert len(set(epochs)) == 2
    # between the two holders' APDUs the card was powered on afresh
    kinds = [k for k, *_ in evidence["events"]]
    first_b = next(i for i, ev in enumerate(evidence["events"]) if ev[0] == "apdu" and ev[1] == epochs[-1])
    assert "power_on" in kinds[kinds.index("apdu") + 1 : first_b]
    assert evidence["counters"]["apdus"] == 2


async def test_simulator_hooks_refuse_a_real_token(tmp_path: Path) -> None:
    Certs(tmp_path)
    device = FakeDevice()
    with trio.fail_after(20):
        async with running(tmp_path, openers={"codesign": (device.open, None)}):
            answer = await call(
                Target(socket=tmp_path / "control.sock"), "simulator.unplug", {"token": "codesign"}
            )
    assert not answer["ok"]
    assert "real device" in answer["error"]


async def test_pin_guard_reset_and_unknown_tokens_say_what_is_wrong(tmp_path: Path) -> None:
    Certs(tmp_path)
    sock = Target(socket=tmp_path / "control.sock")
    with trio.fail_after(20):
        async with running(tmp_path) as (srv, _port):
            unknown = await call(sock, "token.reset", {"token": "nope"})
            guard = await call(sock, "pin-guard.reset", {"token": "codesign"})
            has_guard = hasattr(srv, "reset_pin_guard")
    assert "configured tokens: codesign" in unknown["error"]
    if not has_guard:
        assert "pin guard not available" in guard["error"]
    else:
        assert guard["ok"]
