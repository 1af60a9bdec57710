"""Type=notify as systemd sees it: a real AF_UNIX notify socket and the daemons as processes."""

from __future__ import annotations

import itertools
import signal
import socket
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemd_support import NotifySocket, make_stack, server_cmd, spawn

from bridge_admin.local_stack import BridgeStack, free_port

WATCHDOG_USEC = 400_000  # pings expected every 0.2 s


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def stack(tmp_path: Path) -> BridgeStack:
    return make_stack(tmp_path / "stack")


def test_server_sends_ready_only_once_the_token_is_reset_and_the_listener_serves(
    stack: BridgeStack, notify: NotifySocket, tmp_path: Path
) -> None:
    proc = spawn(server_cmd(stack), tmp_path / "server.log", notify)
    try:
        ready = notify.wait_for("READY", timeout=30, value="1")
        log_at_ready = proc.log()
        # Serving means: the port accepts right now, the token was opened and power-cycled.
        with socket.create_connection(("127.0.0.1", stack.server_port), timeout=2):
            pass
        assert '"device.attached"' in log_at_ready
        assert '"server.listening"' in log_at_ready
        assert all("READY" not in d.fields for d in notify.received[:-1])
        assert ready.fields["STATUS"] == "codesign idle; 0 connection(s)"
        proc.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", timeout=20, value="1")
        assert proc.proc.wait(timeout=20) == 0
    finally:
        proc.stop()


def test_server_watchdog_pings_at_half_the_interval_and_stop_while_the_loop_is_blocked(
    stack: BridgeStack, notify: NotifySocket, tmp_path: Path
) -> None:
    proc = spawn(
        server_cmd(stack, harness=True), tmp_path / "server.log", notify, watchdog_usec=WATCHDOG_USEC
    )
    try:
        notify.wait_for("READY", timeout=30, value="1")
        healthy = [d.at for d in notify.collect(1.6) if "WATCHDOG" in d.fields]
        gaps = [b - a for a, b in itertools.pairwise(healthy)]
        assert 6 <= len(healthy) <= 10, healthy
        assert statistics.median(gaps) == pytest.approx(0.2, abs=0.05)

        proc.signal(signal.SIGUSR1)  # the harness now sleeps 1.5 s inside the trio loop
        proc.wait_log("harness: blocking the event loop")
        blocked_from = notify.received[-1].at if notify.received else 0.0
        after = [d.at for d in notify.collect(2.5) if "WATCHDOG" in d.fields]
        assert after, "pings must resume once the loop is free again"
        # No ping for far longer than the 0.4 s watchdog: systemd would have restarted us.
        assert after[0] - blocked_from >= 1.2
        assert "harness: event loop released" in proc.log()
        # run_watchdog keeps absolute deadlines, so the missed pings go out at once when the
        # loop is free; after that burst the steady rate is back.
        steady = [t for t in after if t > after[0] + 0.05]
        resumed = [b - a for a, b in itertools.pairwise(steady)]
        assert len(resumed) >= 3
        assert statistics.median(resumed) == pytest.approx(0.2, abs=0.05)
    finally:
        proc.stop()


def test_client_is_ready_while_retrying_an_unreachable_server_and_says_so(
    stack: BridgeStack, notify: NotifySocket, tmp_path: Path
) -> None:
    stack.pki.issue_client("build-vm-01", server=f"127.0.0.1:{stack.server_port}", tokens=["codesign"])
    config = stack.write_client_config("build-vm-01", [0])
    # Nothing listens on the server port or on the "vpcd" port: the client must still start.
    text = config.read_text().replace(":35963", f":{free_port()}")
    config.write_text(text)
    cmd = [sys.executable, "-m", "bridge_client", "--config", str(config)]
    proc = spawn(cmd, tmp_path / "client.log", notify, watchdog_usec=WATCHDOG_USEC)
    try:
        ready = notify.wait_for("READY", timeout=20, value="1")
        assert ready.fields["STATUS"].startswith("tunnel retrying (")
        assert "codesign: waiting" in ready.fields["STATUS"]
        pings = [d for d in notify.collect(1.0) if "WATCHDOG" in d.fields]
        assert 3 <= len(pings) <= 7
        proc.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", timeout=10, value="1")
    finally:
        proc.stop()


def test_client_reports_the_connected_tunnel_once_the_server_is_up(
    stack: BridgeStack, notify: NotifySocket, tmp_path: Path
) -> None:
    server = spawn(server_cmd(stack), tmp_path / "server.log", None)
    try:
        server.wait_log('"server.ready"', timeout=30)
        config = stack.write_client_config("build-vm-01", [0])
        config.write_text(config.read_text().replace(":35963", f":{free_port()}"))
        cmd = [sys.executable, "-m", "bridge_client", "--config", str(config)]
        client = spawn(cmd, tmp_path / "client.log", notify)
        try:
            ready = notify.wait_for("READY", timeout=20, value="1")
            assert ready.fields["STATUS"].startswith("tunnel connected")
        finally:
            client.stop()
    finally:
        server.stop()
