"""S5/P8: scanned from another network namespace, the token host shows only its TLS port.

reliability-anchors §7.3 S5. Two network namespaces joined by a veth pair stand for the token
host and a build VM (IPv4 10.231.N.0/30 and IPv6 fd00:7b:N::/64 on the link). The real
tokenbridge-server runs in the host namespace, configured to listen on its veth IPv4 address,
with the metrics endpoint and control socket on their defaults for a host (127.0.0.1, a unix
socket); the real tokenbridge-client runs in the VM namespace and connects across the link.
From each side, every TCP port 1-65535 of the other side's addresses is scanned:

- the host shows exactly the configured port on its IPv4 address and nothing on IPv6;
- the VM (the client daemon) shows no port at all;
- and, so the scan can fail, a server whose metrics listen on 0.0.0.0 shows that port too.

Needs root (namespaces, veth): CI runs as root; elsewhere it is skipped, never in CI. The
vpcd half of S5 (pcscd's vpcd ports unreachable from off the VM) relies on systemd's
IPAddressDeny for pcscd (systemd/pcscd-loopback.conf, checked by tests/systemd/test_units.py)
and is not run here: it needs systemd as PID 1 managing pcscd (docs/reliability.md S5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bridge_admin.local_stack import BridgeStack, wait_for
from protocol.runtime.config import dump_yaml

SCANNER = Path(__file__).with_name("netns_scan.py")
SERVER_PORT = 7447
METRICS_PORT = 9447


def _root_with_ip() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


if not _root_with_ip():
    if os.environ.get("CI"):
        pytest.fail("S5 needs root and iproute2 (ip netns); CI runs as root", pytrace=False)
    pytest.skip("S5 needs root and iproute2 (ip netns)", allow_module_level=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Link:
    host_ns: str
    vm_ns: str
    host_v4: str
    vm_v4: str
    host_v6: str
    vm_v6: str

    def exec_in(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def scan(self, from_ns: str, *addresses: str) -> dict[str, dict[str, object]]:
        done = subprocess.run(
            self.exec_in(from_ns, sys.executable, str(SCANNER), *addresses),
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        result: dict[str, dict[str, object]] = json.loads(done.stdout)
        return result


@pytest.fixture
def link() -> Iterator[Link]:
    n = os.getpid() % 250 + 1
    tag = f"{os.getpid() % 100000}"
    host_ns, vm_ns = f"tbhost{tag}", f"tbvm{tag}"
    veth_host, veth_vm = f"tbh{tag}", f"tbv{tag}"
    net = Link(host_ns, vm_ns, f"10.231.{n}.1", f"10.231.{n}.2", f"fd00:7b:{n:x}::1", f"fd00:7b:{n:x}::2")
    try:
        ip("netns", "add", host_ns)
    except subprocess.CalledProcessError as exc:  # e.g. an unprivileged container
        pytest.fail(
            f"cannot create a network namespace (needs CAP_SYS_ADMIN and CAP_NET_ADMIN): {exc.stderr}"
        )
    try:
        ip("netns", "add", vm_ns)
        ip("link", "add", veth_host, "type", "veth", "peer", "name", veth_vm)
        ip("link", "set", veth_host, "netns", host_ns)
        ip("link", "set", veth_vm, "netns", vm_ns)
        for ns, dev, v4, v6 in (
            (host_ns, veth_host, net.host_v4, net.host_v6),
            (vm_ns, veth_vm, net.vm_v4, net.vm_v6),
        ):
            ip("-n", ns, "addr", "add", f"{v4}/30", "dev", dev)
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield net
    finally:
        for ns in (host_ns, vm_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(cmd: list[str], log: Path) -> Proc:
    with open(log, "ab") as out:
        return Proc(
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log
        )


@pytest.fixture
def stack() -> Iterator[BridgeStack]:
    folder = Path(tempfile.mkdtemp(prefix="tb-netns-"))
    try:
        yield BridgeStack(folder / "stack", server_port=SERVER_PORT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _start_server(stack: BridgeStack, link: Link, *, metrics_host: str) -> Proc:
    config = stack.write_server_config(allow=["build-vm-01"])
    doc = yaml.safe_load(config.read_text())
    doc["listen"] = f"{link.host_v4}:{SERVER_PORT}"
    doc["metrics"] = {"listen": f"{metrics_host}:{METRICS_PORT}"}
    config.write_text(dump_yaml(doc))
    cmd = link.exec_in(link.host_ns, sys.executable, "-m", "bridge_server", "--config", str(config))
    server = _spawn(cmd, stack.workdir / "server.log")

    def ready() -> bool:
        assert server.proc.poll() is None, server.text()
        return '"server.ready"' in server.text() and '"metrics.listening"' in server.text()

    wait_for(ready, timeout=60, what="tokenbridge-server in its namespace to be ready")
    return server


def test_from_another_namespace_the_token_host_shows_only_its_tls_port_and_the_vm_none(
    stack: BridgeStack, link: Link
) -> None:
    stack.make_pki(["build-vm-01"])
    server = _start_server(stack, link, metrics_host="127.0.0.1")
    client_config = stack.write_client_config("build-vm-01", [0])
    doc = yaml.safe_load(client_config.read_text())
    doc["server"] = f"{link.host_v4}:{SERVER_PORT}"
    client_config.write_text(dump_yaml(doc))
    client = _spawn(
        link.exec_in(link.vm_ns, sys.executable, "-m", "bridge_client", "--config", str(client_config)),
        stack.workdir / "client.log",
    )
    try:
        wait_for(lambda: '"tunnel.connected"' in client.text(), timeout=60, what="the tunnel across the link")
        host_side = link.scan(link.vm_ns, link.host_v4, link.host_v6)
        vm_side = link.scan(link.host_ns, link.vm_v4, link.vm_v6)
        assert client.proc.poll() is None and server.proc.poll() is None
    finally:
        client.stop()
        server.stop()

    assert host_side[link.host_v4] == {"open": [SERVER_PORT], "filtered": 0}
    assert host_side[link.host_v6] == {"open": [], "filtered": 0}
    assert vm_side[link.vm_v4] == {"open": [], "filtered": 0}
    assert vm_side[link.vm_v6] == {"open": [], "filtered": 0}


def test_the_scan_finds_a_port_the_server_should_not_expose(stack: BridgeStack, link: Link) -> None:
    stack.make_pki(["build-vm-01"])
    server = _start_server(stack, link, metrics_host="0.0.0.0")  # the misconfiguration under test
    try:
        found = link.scan(link.vm_ns, link.host_v4)
    finally:
        server.stop()
    assert found[link.host_v4]["open"] == [SERVER_PORT, METRICS_PORT]
