"""The USB rig with the client's USB/IP reader as the device (issue 21).

`UsbipStack` is `BridgeStack` whose client runs `reader: usbip` on a free loopback port;
`imported_reader()` starts usbip_handler.py (the importer, under Debian's python with gi) against
it and yields what `umockdev-wrapper` needs, like `rig.emulated_token()` does for the simulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bridge_admin.local_stack import BridgeStack, free_port
from protocol.runtime.config import dump_yaml, load_yaml
from usb_rig.rig import SYSTEM_PYTHON, handler_pythonpath, require_umockdev

HANDLER = Path(__file__).with_name("usbip_handler.py")


@dataclass
class ImportedReader:
    umockdev_dir: str
    devnode: str
    vid: int
    pid: int
    log_path: Path


@dataclass
class UsbipStack(BridgeStack):
    usbip_port: int = field(default_factory=free_port)

    def write_client_config(self, name: str, slots: list[int]) -> Path:
        path = super().write_client_config(name, slots)
        config = load_yaml(path)
        config["readers"] = [{"token": r["token"]} for r in config["readers"]]
        config["reader"] = "usbip"
        config["usbip"] = {"listen": f"127.0.0.1:{self.usbip_port}"}
        path.write_text(dump_yaml(config))
        return path


@contextlib.contextmanager
def imported_reader(workdir: Path, port: int, busid: str = "1-1") -> Iterator[ImportedReader]:
    """Run usbip_handler.py importing `busid` from 127.0.0.1:`port` until the block ends."""
    require_umockdev()
    log_path = workdir / f"usbip-handler-{busid}.log"
    cmd = [str(SYSTEM_PYTHON), str(HANDLER), "--port", str(port), "--busid", busid]
    env = {k: v for k, v in os.environ.items() if k not in ("UMOCKDEV_DIR", "LD_PRELOAD", "PYTHONHOME")}
    env["PYTHONPATH"] = handler_pythonpath()
    log: IO[str]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=10)
            raise AssertionError(f"usbip handler exited ({proc.returncode}):\n{log_path.read_text()}")
        info = json.loads(line)
        yield ImportedReader(info["umockdev_dir"], info["devnode"], info["vid"], info["pid"], log_path)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the handler quits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


__all__ = ["ImportedReader", "UsbipStack", "imported_reader"]
