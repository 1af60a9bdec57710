"""SystemdNotifier and run_watchdog against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from protocol.runtime.sdnotify import SystemdNotifier, run_watchdog


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sd") as folder:
        path = str(Path(folder) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        try:
            yield sock, path
        finally:
            sock.close()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_ready_and_status_arrive_as_single_datagrams(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="2 tokens")
    assert notifier.status("1 session, 2 tokens")
    assert notifier.stopping()
    assert _drain(sock) == [b"READY=1\nSTATUS=2 tokens", b"STATUS=1 session, 2 tokens", b"STOPPING=1"]


def test_newlines_in_values_are_flattened(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    SystemdNotifier({"NOTIFY_SOCKET": path}).notify(STATUS="line one\nWATCHDOG=1")
    assert _drain(sock) == [b"STATUS=line one WATCHDOG=1"]


def test_abstract_socket_address_with_at_sign() -> None:
    name = f"tokenbridge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).notify(READY=1)
        assert _drain(sock) == [b"READY=1"]


def test_everything_is_a_no_op_without_notify_socket() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False
    assert notifier.watchdog_interval is None


def test_missing_socket_is_ignored_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.notify(READY=1) is False


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier()
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_interval == 15.0


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    env: dict[str, str], interval: float | None
) -> None:
    assert SystemdNotifier({"NOTIFY_SOCKET": "/x", **env}).watchdog_interval == interval


async def test_run_watchdog_pings_at_half_the_interval(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    start = trio.current_time()
    with trio.move_on_after(5.5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier)
            assert _drain(sock) == [b"WATCHDOG=1"]  # one ping before started()
    # pings at t = 0, 1, 2, 3, 4, 5 virtual seconds
    assert trio.current_time() - start == pytest.approx(5.5)
    assert _drain(sock) == [b"WATCHDOG=1"] * 5


async def test_run_watchdog_sends_one_ping_after_a_stall_not_a_burst(
    listener: tuple[socket.socket, str], mock_clock: trio.testing.MockClock
) -> None:
    """A loop that was blocked for five intervals owes systemd one ping, not five in a row."""
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, notifier)
        _drain(sock)
        mock_clock.jump(5.0)  # as if the loop had been stuck for 5 s (5 intervals of 1 s)
        await trio.testing.wait_all_tasks_blocked()
        assert _drain(sock) == [b"WATCHDOG=1"]
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert _drain(sock) == [b"WATCHDOG=1"]
        nursery.cancel_scope.cancel()


async def test_run_watchdog_returns_at_once_without_a_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, SystemdNotifier({"NOTIFY_SOCKET": path}))
    assert _drain(sock) == []
