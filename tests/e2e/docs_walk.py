"""Walk docs/ops.md §1-§2 and docs/client.md §3 as written: from nothing to a signature (issue 19).

The walk reads the shell blocks of those sections in order and runs every line, on this machine,
against a simulated token. The target system's `/` is a folder (`root`): absolute paths of the
tokenbridge tree (/etc, /var/lib/tokenbridge, /run/tokenbridge) are moved under it and
`/opt/tokenbridge/bin` is this virtual environment. There is no systemd as PID 1 in CI, so
`systemctl enable --now UNIT` runs the installed unit's ExecStart as systemd would: as its
`User=` (the uid `systemd-sysusers --root` gave it) when we are root, with a private
`$CREDENTIALS_DIRECTORY` built from its `LoadCredential=` lines, `UMask=` and a NOTIFY_SOCKET, and
waits for READY=1. Whatever cannot run here is recorded in `gaps` with the reason (docs/ops.md §12
lists them). A line the walk does not know fails the walk: the docs cannot grow a step that
nobody ran.

The prose steps between the blocks (edit server.yaml, copy the bundle to the VM, allow the VM on
the token) are done by `edit_*` with the values a reader would type, except that the server
listens on a free loopback port and the VM reaches it as 127.0.0.1 with `server_name` set.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from systemd_support import NotifySocket

from protocol.runtime.config import dump_yaml, load_yaml

REPO: Final = Path(__file__).resolve().parents[2]
MOVED: Final = ("/etc/", "/var/lib/tokenbridge", "/run/tokenbridge")
RUNNER_UID: Final = 61001  # stands for gitlab-runner, which this machine does not have


def shell_blocks(doc: Path, start: str, end: str) -> list[str]:
    """The command lines of the ```sh blocks between two headings (continuations joined)."""
    text = doc.read_text()
    section = text[text.index(start) : text.index(end, text.index(start))]
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for raw in block.replace("\\\n", " ").splitlines():
            if raw.strip() and not raw.lstrip().startswith("#"):
                lines.append(raw.strip())
    return lines


@dataclass
class Service:
    unit: str
    proc: subprocess.Popen[bytes]
    log: Path
    notify: NotifySocket

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        return self.proc.returncode


@dataclass
class Walk:
    root: Path  # the target system's "/"
    work: Path  # the reader's working folder (the bundle copy lives here)
    bindir: Path
    slot: int
    port: int
    pin: str
    gaps: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    services: dict[str, Service] = field(default_factory=dict)
    runner_groups: list[int] = field(default_factory=list)
    status_line: str = ""
    drop: bool = False  # run services as their User= and the runner as its uid (set by __post_init__)

    def __post_init__(self) -> None:
        self.drop = self.other_users_can_run()

    # -- paths and users ---------------------------------------------------------------------

    def word(self, w: str) -> str:
        if w.startswith("/opt/tokenbridge/bin/"):
            return str(self.bindir / w.removeprefix("/opt/tokenbridge/bin/"))
        if w.startswith(MOVED):
            return str(self.root) + w
        return w

    def ids(self, name: str, file: str = "passwd") -> int:
        for line in (self.root / "etc" / file).read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2])
        raise AssertionError(f"{name} is not in {self.root}/etc/{file}: did systemd-sysusers run?")

    def other_users_can_run(self) -> bool:
        """Whether a uid other than root can run this venv (a checkout under /root cannot be)."""
        if os.geteuid() != 0:
            return False
        probe = ["setpriv", f"--reuid={RUNNER_UID}", f"--regid={RUNNER_UID}", "--clear-groups",
                 str(self.bindir / "python"), "-c", "import bridge_server"]  # fmt: skip
        if subprocess.run(probe, capture_output=True, timeout=60, cwd="/").returncode == 0:
            return True
        self.gap("the checkout is not readable by other users here: services and the runner ran as root")
        return False

    def gap(self, text: str) -> None:
        if text not in self.gaps:
            self.gaps.append(text)

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, as_runner: bool = False,
            ok: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        if as_runner and self.drop:
            groups = ",".join(map(str, self.runner_groups)) or str(RUNNER_UID)
            argv = ["setpriv", f"--reuid={RUNNER_UID}", f"--regid={RUNNER_UID}", f"--groups={groups}", *argv]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.work,
            env={**os.environ, **(env or {})},
        )
        if ok and proc.returncode != 0:
            raise AssertionError(
                f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    # -- one documented line ---------------------------------------------------------------------

    def line(self, text: str) -> None:
        for part in text.split(" && "):
            self.command(part.split(" #", 1)[0].strip())

    def command(self, text: str) -> None:
        self.ran.append(text)
        words = shlex.split(text)
        if words[0] == "sudo":
            words = words[1:]
        prog = Path(words[0]).name
        handler = getattr(self, "do_" + prog.replace("-", "_"), None)
        if handler is None:
            raise AssertionError(
                f"the docs walk does not know how to run `{text}`: teach tests/e2e/docs_walk.py"
            )
        handler(words)

    def do_apt_get(self, words: list[str]) -> None:
        pkgs = [w for w in words[2:] if not w.startswith("-")]
        missing = [p for p in pkgs if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
        self.gap("apt-get install: not run (the packages come from .ci/system-deps.sh)"
                 + (f"; missing here: {', '.join(missing)}" if missing else ""))  # fmt: skip

    def do_python3(self, words: list[str]) -> None:
        self.gap(
            "python3 -m venv /opt/tokenbridge + pip install: the test's virtual environment stands for it"
        )

    def do_pip(self, words: list[str]) -> None:
        self.do_python3(words)

    def do_tokenbridge(self, words: list[str]) -> None:
        argv = [self.word(w) for w in words]
        argv[0] = str(self.bindir / "tokenbridge")
        if words[1] == "install-service":
            argv += ["--prefix", str(self.root)]
        self.run(argv)

    def do_systemd_sysusers(self, words: list[str]) -> None:
        self.run(["systemd-sysusers", f"--root={self.root}", self.word(words[1])])

    def do_systemd_tmpfiles(self, words: list[str]) -> None:
        self.run(["systemd-tmpfiles", f"--root={self.root}", *[self.word(w) for w in words[1:]]])

    def do_install(self, words: list[str]) -> None:
        self.run(["install", *[self.word(w) for w in words[1:]]])

    def do_rm(self, words: list[str]) -> None:
        self.run(["rm", *[self.word(w) for w in words[1:]]])

    def do_udevadm(self, words: list[str]) -> None:
        self.gap("udevadm: no udev here; the simulated token needs no USB rule (the rule's text is tested)")

    def do_tokenbridge_server(self, words: list[str]) -> None:
        self.check_config(words, "server")

    def do_tokenbridge_client(self, words: list[str]) -> None:
        if words[1] == "check-config":
            self.check_config(words, "client")
            return
        assert words[1] == "status", words
        config = ["--config", str(self.root / "etc/tokenbridge/client.yaml")]
        out = self.run([str(self.bindir / "tokenbridge-client"), *words[1:], *config], as_runner=True).stdout
        assert out.startswith("tunnel   connected"), out
        self.gap("tokenbridge-client status: --config names the prefix's client.yaml (the default is /etc)")

    def check_config(self, words: list[str], role: str) -> None:
        argv = [str(self.bindir / f"tokenbridge-{role}"), *[self.word(w) for w in words[1:]]]
        # Run by root outside the service, `credential:NAME` is /etc/credstore/NAME: here, the prefix's.
        self.run(argv, env={"CREDENTIALS_DIRECTORY": str(self.root / "etc/credstore")})
        self.gap("check-config as root reads credentials from the prefix's /etc/credstore "
                 "(CREDENTIALS_DIRECTORY points there)")  # fmt: skip

    def do_usermod(self, words: list[str]) -> None:
        assert words[1] == "-aG", words
        self.runner_groups = [self.ids(g, "group") for g in words[2].split(",")]
        self.gap(f"usermod: no {words[3]} user here; uid {RUNNER_UID} with those groups stands for it")

    def do_pkcs11_tool(self, words: list[str]) -> None:
        out = self.run(["pkcs11-tool", *words[1:]]).stdout
        assert f"Virtual PCD 00 {self.slot:02d}" in out, out

    def do_systemctl(self, words: list[str]) -> None:
        verb, names = words[1], words[2:]
        if verb == "daemon-reload":
            units = sorted((self.root / "etc/systemd/system").glob("tokenbridge-*.*"))
            out = self.run(["systemd-analyze", "verify", "--man=no", *map(str, units)])
            assert "tokenbridge" not in out.stderr, out.stderr
        elif verb == "restart" and names == ["pcscd.service"]:
            self.gap("systemctl restart pcscd: pcscd is shared on this machine and never restarted; "
                     "its drop-ins are checked by tests/systemd/test_units.py")  # fmt: skip
        elif verb == "enable" and names[0] == "--now":
            for name in names[1:]:
                self.start(name)
        elif verb == "status":
            assert "codesign" in self.status_line, self.status_line
        else:
            raise AssertionError(f"the docs walk does not know `systemctl {' '.join(words[1:])}`")

    # -- services ----------------------------------------------------------------------------------

    def unit(self, name: str) -> dict[str, list[str]]:
        settings: dict[str, list[str]] = {}
        for line in (self.root / "etc/systemd/system" / name).read_text().splitlines():
            if "=" in line and not line.startswith(("#", "[")):
                key, value = line.split("=", 1)
                settings.setdefault(key, []).append(value)
        return settings

    def start(self, name: str) -> None:
        if name.endswith(".timer"):
            service = name.removesuffix(".timer") + ".service"
            self.gap(f"{name}: no systemd to fire timers; {service}'s ExecStart ran once instead")
            self.run([self.word(w) for w in shlex.split(self.unit(service)["ExecStart"][0])])
            return
        unit = self.unit(name)
        argv = [self.word(w) for w in shlex.split(unit["ExecStart"][0])]
        env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        env["CREDENTIALS_DIRECTORY"] = str(self.credentials(name, unit))
        notify = NotifySocket()
        notify.folder.chmod(0o755)
        notify.path.chmod(0o777)
        env["NOTIFY_SOCKET"] = str(notify.path)
        if self.drop:
            uid, gid = self.ids(unit["User"][0]), self.ids(unit["Group"][0], "group")
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={gid}", *argv]
        umask = int(unit.get("UMask", ["0022"])[0], 8)
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, umask=umask)  # fmt: skip
        self.services[name] = service = Service(name, proc, log, notify)
        deadline = time.monotonic() + 60
        while (dgram := notify.poll(0.5)) is None or "READY" not in dgram.fields:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not get ready:\n{log.read_text()[-3000:]}")
        self.status_line = dgram.fields.get("STATUS", self.status_line)
        assert service.proc.poll() is None
        self.gap(
            "systemctl enable --now: no systemd as PID 1; the unit's ExecStart ran with the User=, "
            "UMask=, LoadCredential= and NOTIFY_SOCKET systemd would give it (no sandboxing)"
        )

    def credentials(self, name: str, unit: dict[str, list[str]]) -> Path:
        """$CREDENTIALS_DIRECTORY as systemd makes it: a private copy, readable by the user only."""
        folder = Path(tempfile.mkdtemp(prefix="tb-creds-", dir=self.work)) / name
        folder.mkdir()
        owner = self.ids(unit["User"][0]) if self.drop else -1
        for spec in unit.get("LoadCredential", []):
            cred, source = spec.split(":", 1)
            shutil.copyfile(self.word(source), folder / cred)
            os.chown(folder / cred, owner, -1)
            os.chmod(folder / cred, 0o400)
        os.chown(folder, owner, -1)
        folder.chmod(0o500)
        folder.parent.chmod(0o755)
        return folder

    def stop_all(self) -> dict[str, int]:
        """Stop every service started (last first); each only once. Their exit codes."""
        codes = {name: svc.stop() for name, svc in reversed(self.services.items())}
        self.services.clear()
        return codes

    # -- the prose steps ---------------------------------------------------------------------------

    def edit_server_yaml(self) -> None:
        """'edit /etc/tokenbridge/server.yaml' on a machine with a simulated token."""
        path = self.root / "etc/tokenbridge/server.yaml"
        doc = load_yaml(path)
        doc["listen"] = f"127.0.0.1:{self.port}"
        doc["tokens"][0]["match"] = {"simulate": "safenet-5110", "state": "/var/lib/tokenbridge"}
        path.write_text(dump_yaml(self.moved(doc)))
        self.gap("server.yaml: listen on a free loopback port, a simulated token, and its absolute "
                 "paths (audit, control socket, simulator state) under the prefix")  # fmt: skip

    def copy_bundle(self) -> None:
        """'Copy the folder … to the VM': the VM is this machine, its copy the working folder."""
        shutil.copytree(self.root / "etc/tokenbridge/pki/clients/build-vm-01", self.work / "build-vm-01")

    def edit_client_yaml(self) -> None:
        path = self.root / "etc/tokenbridge/client.yaml"
        doc = load_yaml(path)
        doc["server"], doc["server_name"] = f"127.0.0.1:{self.port}", "tokenhost.example"
        doc["readers"][0]["vpcd"]["connect"] = f"127.0.0.1:{35963 + self.slot}"
        path.write_text(dump_yaml(self.moved(doc)))
        self.gap("client.yaml: tokenhost.example is 127.0.0.1 here (server_name keeps the name check), "
                 "the free vpcd slot, the status socket under the prefix")  # fmt: skip

    def moved(self, value: object) -> object:
        if isinstance(value, dict):
            return {k: self.moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.moved(v) for v in value]
        return self.word(value) if isinstance(value, str) else value
