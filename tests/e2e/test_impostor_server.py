"""S4: the real client refuses an impostor server, so no PIN leaves the build machine.

reliability-anchors §7.3 S4: "client refuses before any APDU, so no PIN leaves the CI VM".
The impostor listens where the client expects the bridge, with a server certificate either
from another CA or from our CA for another name. It speaks TLS 1.3 without asking for a
client certificate (an impostor wants to capture, not to check) and records every decrypted
byte. The build machine runs the real stack: tokenbridge-client, vpcd, pcscd, and OpenSC's
`pkcs11-tool --login` with a canary PIN, retried while the client keeps reconnecting. The
impostor must complete no handshake and receive no application byte, the reader must show no
card, and pkcs11-tool must fail for want of a token, not after a VERIFY.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_stack import VpcdSlot, wait_for

from bridge_admin.local_stack import BridgeStack, card_present
from bridge_admin.pki import Issued, Pki
from bridge_admin.signing_tools import pkcs11

pytestmark = pytest.mark.e2e

CANARY = "739146"


@dataclass
class Impostor:
    """A TLS 1.3 server on 127.0.0.1:port that logs what each connection gets to say."""

    cert: Issued
    port: int
    attempts: int = 0
    handshakes: int = 0
    failures: list[str] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    _stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert.cert, self.cert.key)
        with socket.create_server(("127.0.0.1", self.port)) as listener:
            listener.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                self.attempts += 1
                conn.settimeout(5)
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        self.handshakes += 1
                        while chunk := tls.recv(65536):
                            self.received += chunk
                except (OSError, ssl.SSLError) as exc:
                    self.failures.append(type(exc).__name__ + ": " + str(exc)[:120])

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture
def stack() -> Iterator[BridgeStack]:
    folder = Path(tempfile.mkdtemp(prefix="tb-impostor-"))
    s = BridgeStack(folder / "stack")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _other_ca_server(folder: Path) -> Issued:
    evil = Pki(folder / "evil-pki")
    evil.init(name="look-alike tokenbridge CA")
    return evil.issue_server(["localhost", "127.0.0.1"], out=folder / "evil-pki")


def _wrong_name_server(stack: BridgeStack, folder: Path) -> Issued:
    out = folder / "wrong-name"
    out.mkdir()
    return stack.pki.issue_server(["evil.example"], out=out)


@pytest.mark.parametrize("kind", ["another CA", "our CA, another name"])
def test_the_client_refuses_an_impostor_server_and_the_pin_never_leaves_the_vm(
    stack: BridgeStack, vpcd_slot: VpcdSlot, kind: str
) -> None:
    slot = vpcd_slot.index
    stack.make_pki(["build-vm-01"])
    folder = stack.workdir
    cert = _other_ca_server(folder) if kind == "another CA" else _wrong_name_server(stack, folder)
    impostor = Impostor(cert, stack.server_port)
    thread = threading.Thread(target=impostor.serve, daemon=True)
    thread.start()
    try:
        client = stack.start_client("build-vm-01", [slot])
        wait_for(lambda: impostor.attempts >= 2, timeout=30, what="the client to try the impostor twice")
        for _ in range(2):
            login = pkcs11("--login", "--pin", CANARY, "--list-objects", slot=slot, check=False)
            assert login.returncode != 0, login.stdout
            assert "CKR_TOKEN_NOT_PRESENT" in login.stderr, login.stderr  # no card, so no VERIFY
            assert not card_present(slot)
        wait_for(lambda: impostor.attempts >= 3, timeout=30, what="a third attempt")
        assert client.proc.poll() is None, client.log_text()
    finally:
        impostor.stop()
        thread.join(timeout=10)

    assert impostor.handshakes == 0, "the client finished a handshake with the impostor"
    assert bytes(impostor.received) == b""
    assert CANARY.encode() not in impostor.received
    assert impostor.failures, "the impostor saw no failed handshake at all"
    client_log = client.log_text()
    assert '"tunnel.disconnected"' in client_log
    expected = "not signed by our CA" if kind == "another CA" else "hostname mismatch"
    assert expected in client_log, client_log[-2000:]
