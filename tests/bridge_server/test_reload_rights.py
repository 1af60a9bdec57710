"""A SIGHUP takes rights away from open sessions too (issue 13 item 6).

The review kept an admin connection open, removed the identity from `admins` and reloaded: it
could still revoke leases and reset the PIN guard, because the admin flag was fixed at connect.
Removing an identity from `policy.allow_management` was silently ignored, and the reload log
listed neither.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog
import trio
import trio.testing
from rails_fakes import SELECT_PIV, PivDevice, apdu, lease, make_manager, make_rails, verify_apdu
from server_fakes import LEASE, Client

from bridge_server.config import PolicyConfig, ServerConfig, TlsConfig, TokenConfig, TokenMatch
from bridge_server.net.hub import Hub
from bridge_server.service import apply_plan, plan_reload, reload_config
from bridge_server.simulator.piv import PivCard
from bridge_server.tokens.manager import TokenManager
from protocol import wire
from protocol.errors import CloseCode

CHANGE_PIN = bytes.fromhex("0024008010") + b"123456\xff\xff" + b"654321\xff\xff"


def _config(manager: TokenManager, *, admins: tuple[str, ...] = ("ops",)) -> ServerConfig:
    tls = TlsConfig(ca=Path("ca.pem"), cert=Path("s.pem"), key=Path("s.key"))
    return ServerConfig(
        path=Path("/etc/tokenbridge/server.yaml"), host="127.0.0.1", port=7447, tls=tls,
        tokens=(manager.config,), admins=admins,
    )  # fmt: skip


def _server(hub: Hub, manager: TokenManager, config: ServerConfig) -> Any:
    return SimpleNamespace(hub=hub, tokens=[manager], config=config)


def _with_token(config: ServerConfig, **changes: Any) -> ServerConfig:
    return replace(config, tokens=(replace(config.tokens[0], **changes),))


async def test_an_admin_removed_from_admins_loses_the_session_at_the_reload(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), make_rails(tmp_path))
    await nursery.start(manager.run)
    admin, client = Client(hub, "ops", admin=True), Client(hub, "vm1")
    old = _config(manager)
    server = _server(hub, manager, old)
    with structlog.testing.capture_logs() as logs:
        plan = plan_reload(old, replace(old, admins=()))
        apply_plan(server, plan)
    assert admin.sub.closed and admin.sub.close_reason == "rights_changed"
    goodbye = admin.of_type(wire.Goodbye)
    assert [(g.code, "admins" in g.reason) for g in goodbye] == [(CloseCode.NOT_AUTHORIZED, True)]
    assert not client.sub.closed
    assert plan.applied == ["admins"]
    assert plan.sessions_dropped == ["ops (conn 1): no longer in admins"]
    assert [e["event"] for e in logs if e["event"] == "session.rights_revoked"] == ["session.rights_revoked"]


async def test_an_identity_added_to_admins_gets_the_right_on_its_open_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), make_rails(tmp_path))
    await nursery.start(manager.run)
    client = Client(hub, "vm1")
    old = _config(manager)
    apply_plan(_server(hub, manager, old), plan_reload(old, replace(old, admins=("ops", "vm1"))))
    assert client.sub.admin and not client.sub.closed


async def test_removing_allow_management_applies_to_the_running_lease(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), make_rails(tmp_path, allow_management=("vm2",)))
    await nursery.start(manager.run)
    client = Client(hub, "vm2")
    old = _config(manager)
    server = _server(hub, manager, old)
    epoch = await lease(manager, client)
    await apdu(manager, client, epoch, SELECT_PIV)
    await apdu(manager, client, epoch, verify_apdu("123456"))
    new = _with_token(old, policy=PolicyConfig(allow_management=(), family="piv"))
    plan = plan_reload(old, new)
    apply_plan(server, plan)
    assert plan.applied == ["tokens: codesign.policy"]
    assert (await apdu(manager, client, epoch, CHANGE_PIN))[0] == b"\x69\x85"
    assert manager.rails.policy.allow_management == ()


async def test_a_holder_removed_from_one_allow_list_loses_that_lease_and_keeps_its_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), make_rails(tmp_path))
    spare_config = TokenConfig(name="spare", match=TokenMatch(vid=0x0529, pid=0x0621), allow=("vm1",))
    spare = TokenManager(1, spare_config, LEASE, hub, PivDevice(PivCard()).open, first_epoch=2000)
    await nursery.start(manager.run)
    await nursery.start(spare.run)
    vm1, vm2 = Client(hub, "vm1"), Client(hub, "vm2")
    old = replace(_config(manager), tokens=(manager.config, spare_config))
    await lease(manager, vm1)
    await manager.request_lease(vm2.sub)  # vm2 waits behind vm1
    await trio.testing.wait_all_tasks_blocked()
    new = replace(old, tokens=(replace(manager.config, allow=("vm2",)), spare_config))
    server = SimpleNamespace(hub=hub, tokens=[manager, spare], config=old)
    plan = plan_reload(old, new)
    apply_plan(server, plan)
    await trio.testing.wait_all_tasks_blocked()
    assert [e.reason for e in vm1.of_type(wire.LeaseEnded)] == [wire.LeaseEndReason.REVOKED]
    assert not vm1.sub.closed  # still allowed on `spare`
    assert plan.leases_ended == ["codesign: vm1 (conn 1)"]
    assert [g.token_id for g in vm2.of_type(wire.LeaseGranted)] == [0]  # the next waiter gets it


async def test_a_session_on_no_allow_list_any_more_is_dropped(nursery: trio.Nursery, tmp_path: Path) -> None:
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), make_rails(tmp_path))
    await nursery.start(manager.run)
    vm1, vm2 = Client(hub, "vm1"), Client(hub, "vm2")
    old = _config(manager)
    plan = plan_reload(old, _with_token(old, allow=("vm2",)))
    apply_plan(_server(hub, manager, old), plan)
    assert vm1.sub.closed and vm1.sub.close_reason == "rights_changed"
    assert not vm2.sub.closed
    assert plan.sessions_dropped == ["vm1 (conn 1): on no token's allow list any more"]


async def test_the_reload_log_lists_what_changed_live_and_what_needs_a_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hub = Hub()
    manager = make_manager(hub, PivDevice(PivCard()), make_rails(tmp_path, allow_management=("vm2",)))
    await nursery.start(manager.run)
    Client(hub, "ops", admin=True)
    config_file = tmp_path / "server.yaml"
    config_file.write_text(
        "listen: 127.0.0.1:7447\n"
        "tls: {ca: ca.pem, cert: s.pem, key: s.key}\n"
        "admins: []\n"
        "heartbeat_s: 3\n"
        "tokens:\n"
        "  - {name: codesign, match: {vid: 0x0529, pid: 0x0620}, allow: [vm1, vm2, ops]}\n"
    )
    tls = TlsConfig(ca=tmp_path / "ca.pem", cert=tmp_path / "s.pem", key=tmp_path / "s.key")
    old = replace(_config(manager), path=config_file, tls=tls)
    server = _server(hub, manager, old)
    with structlog.testing.capture_logs() as logs:
        reload_config(server)
    applied = next(e for e in logs if e["event"] == "reload.applied")
    assert applied["changed"] == ["tokens: codesign.policy", "admins"]
    assert applied["sessions_dropped"] == ["ops (conn 1): no longer in admins"]
    restart = next(e for e in logs if e["event"] == "reload.needs_restart")
    assert restart["changed"] == ["heartbeat_s"]
