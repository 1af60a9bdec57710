"""`tokenbridge demo`: the whole chain on one machine, narrated, on a simulated token.

osslsigncode -> PKCS#11 (OpenSC) -> pcscd -> vpcd -> tokenbridge-client -> TLS 1.3 ->
tokenbridge-server -> pyusb -> simulated token (a PIV card behind a custom pyusb backend).

`BridgeStack` is also what the end-to-end tests use to run the real daemons as processes, so
the demo a new user runs is the path CI exercises.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
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
from bridge_admin.signing_tools import (
    OPENSC_PKCS11,
    PKCS11_ENGINE,
    minimal_pe,
    osslsigncode_sign_command,
    osslsigncode_verify_command,
)
from protocol.errors import BridgeError
from protocol.runtime.address import Address
from protocol.runtime.config import dump_yaml
from protocol.vpcd import DEFAULT_PORT as VPCD_PORT

T = TypeVar("T")

VPCD_BASE_PORT = VPCD_PORT  # slot n of the demo's vpcd readers is VPCD_BASE_PORT + n
VPCD_SLOTS = (0, 1)
LOCK_DIR = Path(os.environ.get("TOKENBRIDGE_E2E_LOCK_DIR", tempfile.gettempdir()))
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


# -- signing helpers (also used by the end-to-end tests) ------------------------------------


def pkcs11(
    *args: str, slot: int, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = ["pkcs11-tool", "--module", str(OPENSC_PKCS11), "--slot-description", reader_name(slot), *args]
    return run(cmd, timeout=timeout, check=check)


def pkcs11_sign(
    slot: int,
    infile: Path,
    outfile: Path,
    *,
    key_id: str = "01",
    pin: str = PIN,
    timeout: float = 120.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`pkcs11-tool --login --sign` (RSA PKCS#1 v1.5 over SHA-256) with key `key_id` in reader `slot`."""
    return pkcs11(
        "--login", "--pin", pin, "--sign", "--id", key_id, "-m", "SHA256-RSA-PKCS",
        "--input-file", str(infile), "--output-file", str(outfile), slot=slot, timeout=timeout, check=check,
    )  # fmt: skip


def token_serial(slot: int) -> str:
    out = pkcs11("-L", slot=slot).stdout
    m = re.search(r"serial num\s*:\s*(\S+)", out)
    if not m:
        raise DemoError(f"pkcs11-tool -L shows no token serial in {reader_name(slot)}:\n{out}")
    return m.group(1)


def read_certificate_pem(slot: int, key_id: str, out: Path) -> Path:
    der = out.with_suffix(".der")
    pkcs11("--read-object", "--type", "cert", "--id", key_id, "--output-file", str(der), slot=slot)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out.write_bytes(x509.load_der_x509_certificate(der.read_bytes()).public_bytes(Encoding.PEM))
    return out


def osslsigncode_sign(
    slot: int, cert: Path, infile: Path, outfile: Path, *, key_id: str = "01", pin: str = PIN
) -> subprocess.CompletedProcess[str]:
    serial = token_serial(slot)
    key_uri = f"pkcs11:serial={serial};id=%{key_id};type=private;pin-value={pin}"
    outfile.unlink(missing_ok=True)
    return run(osslsigncode_sign_command(key_uri, cert, infile, outfile))


def osslsigncode_verify(cert: Path, signed: Path) -> subprocess.CompletedProcess[str]:
    return run(osslsigncode_verify_command(cert, signed))


# -- the narrated demo -----------------------------------------------------------------------


class Narrator:
    def __init__(self) -> None:
        self.steps: list[dict[str, object]] = []

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        print(f"==> {text} ...", flush=True)
        start = time.monotonic()
        try:
            yield
        except BaseException:
            print(f"    FAILED after {time.monotonic() - start:.2f} s", flush=True)
            raise
        took = time.monotonic() - start
        self.steps.append({"step": text, "seconds": round(took, 3)})
        print(f"    ok ({took:.2f} s)", flush=True)


def _check_tools() -> None:
    missing = [t for t in ("pcscd", "opensc-tool", "pkcs11-tool", "osslsigncode") if shutil.which(t) is None]
    missing += [str(p) for p in (OPENSC_PKCS11, PKCS11_ENGINE) if not p.exists()]
    if not Path("/etc/reader.conf.d/vpcd").exists():
        missing.append("vsmartcard-vpcd (/etc/reader.conf.d/vpcd)")
    if missing:
        raise DemoError(
            f"missing: {', '.join(missing)}; `make demo` installs them (or: apt-get install pcscd "
            "vsmartcard-vpcd opensc osslsigncode libengine-pkcs11-openssl)"
        )
    if not Path("/run/pcscd/pcscd.comm").exists():
        raise DemoError(
            "pcscd is not running; start it (`systemctl start pcscd` or `pcscd`) — `make demo` does"
        )
    wait_for(
        lambda: reader_name(0) in card_states(),
        timeout=20,
        what="pcscd to list the vpcd readers (restart pcscd after installing vsmartcard-vpcd)",
    )


def run_demo(*, profile: str = "safenet-5110", keep: bool = False, as_json: bool = False) -> int:
    n = Narrator()
    workdir = Path(tempfile.mkdtemp(prefix="tokenbridge-demo-"))
    stack = BridgeStack(workdir, profiles=[profile])
    print(f"tokenbridge demo: simulated '{profile}' token, working folder {workdir}\n")
    total = time.monotonic()
    try:
        with n.step("Checking pcscd, vpcd, OpenSC and osslsigncode"):
            _check_tools()
        with claim_vpcd_slot() as slot:
            with n.step("Creating a throw-away CA, a server certificate and a client certificate"):
                stack.make_pki(["demo-build-vm"])
                stack.write_server_config(allow=["demo-build-vm"])
            with n.step(
                f"Starting tokenbridge-server on 127.0.0.1:{stack.server_port} (simulated {profile})"
            ):
                stack.start_server()
            with n.step(f"Starting tokenbridge-client; waiting for the card in '{reader_name(slot)}'"):
                client = stack.start_client("demo-build-vm", [slot])
                stack.wait_card(slot, client)
            with n.step("Reading the signing certificate from the remote token (pkcs11-tool)"):
                cert = read_certificate_pem(slot, "01", workdir / "signing-cert.pem")
            program = workdir / "hello.exe"
            program.write_bytes(minimal_pe(b"\xc3 signed through tokenbridge"))
            signed = workdir / "hello-signed.exe"
            with n.step("Signing hello.exe with osslsigncode through the bridge (PIN login on the token)"):
                osslsigncode_sign(slot, cert, program, signed)
            with n.step("Verifying the Authenticode signature (osslsigncode verify)"):
                out = osslsigncode_verify(cert, signed).stdout
                if "Signature verification: ok" not in out:
                    raise DemoError(f"osslsigncode verify did not report success:\n{out}")
            with n.step("Stopping the client and the server"):
                stack.stop()
    except (DemoError, BridgeError, subprocess.TimeoutExpired) as exc:
        print(f"\ntokenbridge demo failed: {exc}", file=sys.stderr)
        for daemon in stack.daemons:
            print(
                f"\n--- last lines of {daemon.log_path} ---\n"
                + "\n".join(daemon.log_text().splitlines()[-25:]),
                file=sys.stderr,
            )
        stack.stop()
        print(f"\nlogs and files kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    print(
        f"\nDone in {time.monotonic() - total:.1f} s: a Windows program was signed with a key that never "
        "left the (simulated) token, over mutual TLS, and the signature verifies."
    )
    if as_json:
        print(json.dumps({"profile": profile, "steps": n.steps}, indent=2))
    if keep:
        print(f"Files kept in {workdir} (server.yaml, client-*.yaml, pki/, *.log, hello-signed.exe)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
