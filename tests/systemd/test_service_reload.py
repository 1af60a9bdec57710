"""systemctl reload (SIGHUP): new certificates and live config, broken files rejected."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import structlog
from cryptography import x509
from systemd_support import make_stack, served_serial, server_cmd, spawn

from bridge_client import service as client_service
from bridge_server.config import LeaseConfig, load_server_config
from bridge_server.service import plan_reload, status_line
from protocol.runtime.config import dump_yaml, load_yaml


def _serial(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


def _keep_mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def _restore_mtimes(saved: dict[Path, int]) -> None:
    """Hide the change from the server's file watcher, so only SIGHUP can trigger the reload."""
    for p, ns in saved.items():
        os.utime(p, ns=(ns, ns))


def test_sighup_keeps_the_old_certificate_when_the_new_one_is_broken_and_uses_a_good_one(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path / "stack")
    cert, key = stack.pki.folder / "localhost.pem", stack.pki.folder / "localhost.key"
    original = _serial(cert)
    proc = spawn(server_cmd(stack), tmp_path / "server.log", None)
    try:
        proc.wait_log('"server.ready"', timeout=30)
        assert served_serial(stack) == original

        saved = _keep_mtimes([cert, key])
        good_cert, good_key = cert.read_bytes(), key.read_bytes()
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        _restore_mtimes(saved)
        mark = len(proc.log())
        proc.signal(signal.SIGHUP)
        proc.wait_log('"tls.reload_failed"', after=mark)
        assert served_serial(stack) == original  # still serving, with the old certificate
        assert proc.proc.poll() is None

        cert.write_bytes(good_cert)
        key.write_bytes(good_key)
        stack.pki.issue_server(["localhost", "127.0.0.1"], out=stack.pki.folder)
        renewed = _serial(cert)
        assert renewed != original
        _restore_mtimes(saved)
        mark = len(proc.log())
        proc.signal(signal.SIGHUP)
        proc.wait_log('"tls.reloaded"', after=mark)
        assert served_serial(stack) == renewed
    finally:
        proc.stop()


def test_sighup_applies_a_new_allow_list_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "stack")
    proc = spawn(server_cmd(stack), tmp_path / "server.log", None)
    try:
        proc.wait_log('"server.ready"', timeout=30)
        config = stack.workdir / "server.yaml"
        document = load_yaml(config)
        document["tokens"][0]["allow"].append("build-vm-02")
        document["listen"] = "127.0.0.1:1"
        config.write_text(dump_yaml(document))
        mark = len(proc.log())
        proc.signal(signal.SIGHUP)
        after = proc.wait_log('"reload.applied"', after=mark)
        assert "tokens: codesign.allow" in after
        assert '"reload.needs_restart"' in after and '"listen"' in after
        assert served_serial(stack) > 0  # the old listener still serves

        config.write_text("tokens: [")  # not YAML: nothing changes
        mark = len(proc.log())
        proc.signal(signal.SIGHUP)
        proc.wait_log('"reload.failed"', after=mark)
        assert served_serial(stack) > 0
    finally:
        proc.stop()


def test_reload_plan_applies_allow_admins_and_lease_but_defers_token_match(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "stack")
    old = load_server_config(stack.workdir / "server.yaml")
    token = old.tokens[0]
    new = replace(
        old,
        admins=("ops-laptop",),
        lease=LeaseConfig(linger_s=5.0),
        tokens=(replace(token, allow=("build-vm-09",), match=replace(token.match, simulate="yubikey5")),),
        heartbeat_s=old.heartbeat_s + 1,
    )
    plan = plan_reload(old, new)
    assert plan.applied == ["tokens: codesign.allow", "admins", "lease"]
    assert plan.needs_restart == ["tokens: codesign.match", "heartbeat_s"]
    assert plan.config.tokens[0].allow == ("build-vm-09",)
    assert plan.config.tokens[0].match == token.match  # the device stays the one that is open
    assert plan.config.heartbeat_s == old.heartbeat_s
    assert plan.config.lease.linger_s == 5.0


def test_status_line_names_each_token_state_and_the_connections() -> None:
    line = status_line([("codesign", True, "build-vm-01"), ("spare", False, None), ("ev", True, None)], 3)
    assert line == "codesign leased by build-vm-01; spare absent; ev idle; 3 connection(s)"
    assert len(status_line([(f"token-{i}", True, None) for i in range(40)], 0)) == 200


def test_status_line_says_guarded_and_locked_like_tokenbridge_status() -> None:
    tokens = [
        ("a", True, "build-vm-01", True, False),
        ("b", True, None, True, True),
        ("c", False, "x", True, True),
    ]
    assert status_line(tokens, 1) == "a guarded, leased by build-vm-01; b locked; c absent; 1 connection(s)"


def test_client_reload_keeps_the_old_context_on_a_broken_key_and_swaps_on_a_good_one(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "stack")
    config = stack.write_client_config("build-vm-01", [0])
    old_ctx = object()
    app = SimpleNamespace(config=SimpleNamespace(path=config), tunnel=SimpleNamespace(ssl_context=old_ctx))
    key = stack.pki.folder / "clients" / "build-vm-01" / "build-vm-01.key"
    good = key.read_bytes()
    key.write_text("garbage")
    with structlog.testing.capture_logs() as logs:
        assert client_service.reload_tls(app) is False
    assert app.tunnel.ssl_context is old_ctx
    assert [e["event"] for e in logs] == ["reload.failed"]
    assert logs[0]["log_level"] == "error"

    key.write_bytes(good)
    with structlog.testing.capture_logs() as logs:
        assert client_service.reload_tls(app) is True
    assert app.tunnel.ssl_context is not old_ctx
    assert [e["event"] for e in logs] == ["reload.applied"]
