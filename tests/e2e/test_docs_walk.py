"""Issue 19 "done when": docs/ops.md and docs/client.md, walked as written, reach a signature.

See docs_walk.py for how each documented line runs here and what stands in for systemd. The
walk needs root (it runs the services as their `User=` and hands them root-only credentials);
CI runs as root.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from docs_walk import REPO, Walk, shell_blocks
from e2e_stack import VpcdSlot

from bridge_admin.local_stack import PIN, free_port
from bridge_admin.signing_tools import OPENSC_PKCS11, minimal_pe, read_certificate_pem

OPS, CLIENT = REPO / "docs/ops.md", REPO / "docs/client.md"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="the walk runs the services as their User= and needs root (CI runs as root)",
)


@pytest.fixture
def walk(vpcd_slot: VpcdSlot) -> Iterator[Walk]:
    base = Path(tempfile.mkdtemp(prefix="tb-walk-"))
    base.chmod(0o755)  # the service user and the runner traverse it, as they would traverse /
    (base / "root").mkdir(mode=0o755)
    (base / "work").mkdir(mode=0o755)
    w = Walk(base / "root", base / "work", Path(sys.executable).parent, vpcd_slot.index, free_port(), PIN)
    try:
        yield w
    finally:
        w.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def _token_host(walk: Walk) -> None:
    for line in shell_blocks(OPS, "## 1. Install on the token host", "## 2. Install on a build VM"):
        if "check-config" in line and "server" in line:
            walk.edit_server_yaml()  # the prose step "edit /etc/tokenbridge/server.yaml"
        walk.line(line)


def _build_vm(walk: Walk) -> None:
    copied = False
    for line in shell_blocks(OPS, "## 2. Install on a build VM", "**Loopback confinement.**"):
        if "build-vm-01/" in line and not copied:
            walk.copy_bundle()  # "Copy the folder … to the VM"
            copied = True
        if "tokenbridge-client check-config" in line:
            walk.edit_client_yaml()
        walk.line(line)


def _sign(walk: Walk) -> str:
    """docs/client.md §3's block, as one shell script (its variables carry from line to line)."""
    lines = shell_blocks(CLIENT, "## 3. What the user sees", "## 4.")
    signing = [ln for ln in lines if not ln.startswith(("printf", "jsign"))]
    walk.gap("jsign: not installed on Debian 12 (client.md says it is untested)")
    script = "set -e\n" + "\n".join(signing)
    script = script.replace("Virtual PCD 00 00", f"Virtual PCD 00 {walk.slot:02d}")
    script = script.replace("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so", str(OPENSC_PKCS11))
    read_certificate_pem(walk.slot, "01", walk.work / "signing-cert.pem")  # "signing-cert.pem" you have
    (walk.work / "app.exe").write_bytes(minimal_pe(b"\xc3 docs walk"))
    (walk.work / "data.bin").write_bytes(b"what the build signs\n")
    proc = walk.run(["bash", "-c", script], env={"PIN": walk.pin})
    return proc.stdout + proc.stderr


def test_the_ops_and_client_docs_walked_as_written_reach_a_verified_signature(walk: Walk) -> None:
    _token_host(walk)
    assert set(walk.services) == {"tokenbridge-server.service"}
    _build_vm(walk)
    assert set(walk.services) == {"tokenbridge-server.service", "tokenbridge-client.service"}

    # The CI runner's user (not root, not the service user) asks the running client.
    config = str(walk.root / "etc/tokenbridge/client.yaml")
    doctor = walk.run(
        [str(walk.bindir / "tokenbridge"), "doctor", "--config", config], as_runner=True, ok=False
    )
    assert "via the running tokenbridge-client" in doctor.stdout, doctor.stdout
    assert "[FAIL ] server" not in doctor.stdout and "[FAIL ] token" not in doctor.stdout, doctor.stdout

    out = _sign(walk)
    assert "Signature verification: ok" in out, out
    assert (walk.work / "sig.bin").stat().st_size > 0
    assert walk.stop_all() == {"tokenbridge-client.service": 0, "tokenbridge-server.service": 0}
    print("\n".join(["docs walk gaps:", *(f"- {g}" for g in walk.gaps)]))
