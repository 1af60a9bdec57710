"""Helpers for the service tests: a real sd_notify socket, and the daemons as processes.

`NotifySocket` binds an AF_UNIX datagram socket as systemd does and records every datagram
with its arrival time (time.monotonic), so tests can check order and rates. Daemons run as
`python -m bridge_server|bridge_client` (or the loop-blocking harness) with NOTIFY_SOCKET and
WATCHDOG_USEC set, as systemd would start them.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from bridge_admin.local_stack import BridgeStack, wait_for

HARNESS = Path(__file__).with_name("block_loop_harness.py")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Datagram:
    at: float
    fields: dict[str, str]


@dataclass
class NotifySocket:
    """The receiving end of NOTIFY_SOCKET (a short path: sun_path is 108 bytes)."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tb-notify-")))
    received: list[Datagram] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = self.folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.folder.rmdir()

    def poll(self, timeout: float) -> Datagram | None:
        """The next datagram, or None after `timeout` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        dgram = Datagram(time.monotonic(), fields)
        self.received.append(dgram)
        return dgram

    def wait_for(self, key: str, *, timeout: float, value: str | None = None) -> Datagram:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            dgram = self.poll(left)
            if dgram is not None and key in dgram.fields and value in (None, dgram.fields[key]):
                return dgram
        seen = [d.fields for d in self.received]
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; received {seen}")

    def collect(self, seconds: float) -> list[Datagram]:
        out: list[Datagram] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            dgram = self.poll(left)
            if dgram is not None:
                out.append(dgram)
        return out


def make_stack(workdir: Path, clients: tuple[str, ...] = ("build-vm-01",)) -> BridgeStack:
    stack = BridgeStack(workdir)
    stack.make_pki(list(clients))
    stack.write_server_config(allow=list(clients))
    return stack


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_log(self, needle: str, *, timeout: float = 15.0, after: int = 0) -> str:
        """Poll the log (a real process: polling with a deadline) until `needle` shows up."""

        def seen() -> str | bool:
            text = self.log()[after:]
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited before {needle!r}:\n{self.log()[-3000:]}")
            return False

        found = wait_for(seen, timeout=timeout, what=f"{needle!r} in the log", interval=0.05)
        assert isinstance(found, str)
        return found


def spawn(
    cmd: list[str],
    log_path: Path,
    notify: NotifySocket | None,
    *,
    watchdog_usec: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Proc:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(extra_env or {})
    env["PYTHONPATH"] = str(REPO)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Proc(proc, log_path)


def server_cmd(stack: BridgeStack, *, harness: bool = False) -> list[str]:
    entry = [str(HARNESS)] if harness else ["-m", "bridge_server"]
    return [sys.executable, *entry, "--config", str(stack.workdir / "server.yaml")]


def served_serial(stack: BridgeStack, client: str = "build-vm-01") -> int:
    """The serial of the certificate the server presents to a new connection."""
    bundle = stack.pki.folder / "clients" / client
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(bundle / "ca.pem")
    ctx.load_cert_chain(bundle / f"{client}.pem", bundle / f"{client}.key")
    with (
        socket.create_connection(("127.0.0.1", stack.server_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def poll_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    wait_for(condition, timeout=timeout, what=what, interval=0.05)
