"""`tokenbridge demo`: the whole chain on one machine, narrated, on a simulated token.

osslsigncode -> PKCS#11 (OpenSC) -> pcscd -> vpcd -> tokenbridge-client -> TLS 1.3 ->
tokenbridge-server -> pyusb -> simulated token (a PIV card behind a custom pyusb backend).
The processes are run by `bridge_admin.local_stack.BridgeStack`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bridge_admin.local_stack import (
    BridgeStack,
    DemoError,
    card_states,
    claim_vpcd_slot,
    reader_name,
    wait_for,
)
from bridge_admin.signing_tools import (
    OPENSC_PKCS11,
    PKCS11_ENGINE,
    minimal_pe,
    osslsigncode_sign,
    osslsigncode_verify,
    read_certificate_pem,
)
from protocol.errors import BridgeError


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
