"""The two daemons, their PKI and configs as real processes on one machine, in one folder.

`BridgeStack` is what `tokenbridge demo` runs, and the end-to-end tests, the fault tests and the
bench run the same thing, so the demo a new user runs is the path CI exercises. pcscd is one per
machine: a vpcd slot is taken with `claim_vpcd_slot` (an advisory lock and an empty reader),
never assumed free.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from bridge_admin.pki import Pki
from protocol.errors import BridgeError
from protocol.runtime.address import Address
from protocol.runtime.config import dump_yaml
from protocol.vpcd import DEFAULT_PORT as VPCD_PORT

T = TypeVar("T")

VPCD_BASE_PORT = VPCD_PORT  # slot n of the demo's vpcd readers is VPCD_BASE_PORT + n
VPCD_SLOTS = (0, 1)
# Everyone who puts a card in the shared pcscd's vpcd readers (the demo, the tests, a second
# demo) takes a slot by an advisory lock on a file here, and then checks the reader is empty.
LOCK_DIR = Path(tempfile.gettempdir())
PIN = "123456"


class DemoError(BridgeError):
    """A demo step failed; the message says which and what to look at."""


class WaitTimeout(DemoError, TimeoutError):
    """A condition polled by `wait_for` did not come true before its deadline."""


def wait_for(
    condition: Callable[[], T], *, timeout: float = 15.0, what: str = "", interval: float = 0.1
) -> T:
    """Poll `condition` until truthy; the deadline bounds the wait (polling, not synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what or condition!r}")
        time.sleep(interval)


def run(cmd: list[str], *, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise DemoError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def reader_name(slot: int) -> str:
    return f"Virtual PCD 00 {slot:02d}"


def card_states() -> dict[str, bool]:
    """Reader name -> card present, as pcscd sees it (`opensc-tool -l`)."""
    out = run(["opensc-tool", "-l"], check=False, timeout=30).stdout
    states: dict[str, bool] = {}
    for line in out.splitlines():
        m = re.match(r"^\s*\d+\s+(Yes|No)\s+.*?(Virtual PCD \d\d \d\d)\s*$", line)
        if m:
            states[m.group(2)] = m.group(1) == "Yes"
    return states


def card_present(slot: int) -> bool:
    return card_states().get(reader_name(slot), False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def claim_vpcd_slot(timeout: float = 120.0) -> Iterator[int]:
    """A vpcd slot nobody else uses: an advisory lock shared with the tests, and no card shown."""
    deadline = time.monotonic() + timeout
    while True:
        for index in VPCD_SLOTS:
            lock = open(LOCK_DIR / f"tokenbridge-vpcd-slot-{index}.lock", "w")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            if card_present(index):
                lock.close()
                continue
            try:
                yield index
            finally:
                lock.close()
            return
        if time.monotonic() > deadline:
            raise DemoError(
                "no free vpcd slot: both 'Virtual PCD' readers show a card (another user of pcscd?)"
            )
        time.sleep(0.5)


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0  # where this process's output starts in a log shared across restarts

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")


@dataclass
class BridgeStack:
    """Certificates, configs and the two daemons as real processes, in one folder."""

    workdir: Path
    profiles: list[str] = field(default_factory=lambda: ["safenet-5110"])
    server_port: int = 0
    lease: dict[str, float] = field(default_factory=lambda: {"linger_s": 1.0, "idle_timeout_s": 60.0})
    heartbeat_s: float = 2.0
    log_level: str = "info"
    daemons: list[Daemon] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.workdir / "pki")
        self.server_port = self.server_port or free_port()
        self.server: Daemon | None = None

    @property
    def token_names(self) -> list[str]:
        return [f"token{i}" if i else "codesign" for i in range(len(self.profiles))]

    def make_pki(self, clients: list[str]) -> None:
        self.pki.init(name="tokenbridge demo CA (throw-away)")
        self.pki.issue_server(["localhost", "127.0.0.1"], out=self.pki.folder)
        for name in clients:
            self.pki.issue_client(
                name, server=str(Address("127.0.0.1", self.server_port)), tokens=self.token_names
            )

    def write_server_config(self, allow: list[str]) -> Path:
        tokens = [
            {"name": name, "match": {"simulate": profile, "state": "state"}, "allow": list(allow)}
            for name, profile in zip(self.token_names, self.profiles, strict=True)
        ]
        document = {
            "listen": str(Address("127.0.0.1", self.server_port)),
            "tls": {
                "ca": "pki/ca.pem",
                "cert": "pki/localhost.pem",
                "key": "pki/localhost.key",
                "crl": "pki/crl.pem",
            },
            "heartbeat_s": self.heartbeat_s,
            "tokens": tokens,
            "lease": dict(self.lease),
            "audit": {"path": "audit.jsonl"},
            "control": {"socket": "control.sock"},
        }
        path = self.workdir / "server.yaml"
        path.write_text(dump_yaml(document))
        (self.workdir / "state").mkdir(exist_ok=True)
        return path

    def write_client_config(self, name: str, slots: list[int]) -> Path:
        bundle = self.pki.folder / "clients" / name
        readers = [
            {"token": tok, "vpcd": {"connect": str(Address("127.0.0.1", VPCD_BASE_PORT + slot))}}
            for tok, slot in zip(self.token_names, slots, strict=False)
        ]
        document = {
            "server": str(Address("127.0.0.1", self.server_port)),
            "server_name": "localhost",
            "tls": {"ca": f"{bundle}/ca.pem", "cert": f"{bundle}/{name}.pem", "key": f"{bundle}/{name}.key"},
            "reconnect": {"initial_s": 0.2, "max_s": 2},
            "status": {"socket": f"{self.workdir}/client-{name}.sock"},
            "readers": readers,
        }
        path = self.workdir / f"client-{name}.yaml"
        path.write_text(dump_yaml(document))
        return path

    def _spawn(self, name: str, cmd: list[str]) -> Daemon:
        log_path = self.workdir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log: IO[bytes]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        daemon = Daemon(name, proc, log_path, offset)
        self.daemons.append(daemon)
        return daemon

    def start_server(self, timeout: float = 30.0) -> Daemon:
        cmd = [
            sys.executable,
            "-m",
            "bridge_server",
            "--config",
            str(self.workdir / "server.yaml"),
            "--log-level",
            self.log_level,
        ]
        self.server = daemon = self._spawn("server", cmd)

        def ready() -> bool:
            if daemon.proc.poll() is not None:
                raise DemoError(f"tokenbridge-server exited ({daemon.proc.returncode}):\n{daemon.log_text()}")
            # The server logs server.ready once it listens and its tokens are opened (a TCP probe
            # would work too, but shows up in the server's log as a failed handshake).
            return '"server.ready"' in daemon.log_text()

        wait_for(ready, timeout=timeout, what="tokenbridge-server to be ready")
        return daemon

    def start_client(self, name: str, slots: list[int]) -> Daemon:
        config = self.write_client_config(name, slots)
        cmd = [sys.executable, "-m", "bridge_client", "--config", str(config), "--log-level", self.log_level]
        return self._spawn(f"client-{name}", cmd)

    def wait_card(self, slot: int, daemon: Daemon, *, present: bool = True, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if daemon.proc.poll() is not None:
                raise DemoError(f"{daemon.name} exited ({daemon.proc.returncode}):\n{daemon.log_text()}")
            return card_present(slot) == present

        state = "appear" if present else "disappear"
        wait_for(ready, timeout=timeout, what=f"the card to {state} in reader {reader_name(slot)}")

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
