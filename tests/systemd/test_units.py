"""The systemd files: `systemd-analyze verify`/`security --offline`, the pcscd drop-ins,
sysusers/tmpfiles in a scratch root, and the installer's output.

systemd-analyze works without systemd as PID 1 when handed unit files (verify loads the
fragment and its `NAME.d/` drop-ins from the file's folder). verify checks that ExecStart is
executable, so the units are checked as `install-service` renders them (ExecStart in this venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_admin import install

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
BINDIR = str(Path(sys.executable).parent)
PCSCD_UNIT = Path("/lib/systemd/system/pcscd.service")

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and os.environ.get("CI") != "true",
    reason="systemd-analyze missing (apt-get install systemd; .ci/system-deps.sh installs it)",
)


def analyze(*args: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug" if debug else "info")
    if args[0] == "verify":
        # verify runs `man` for every Documentation=man:... line (pcscd.service has one); a fresh
        # Debian root has no man-db, and whether man pages exist says nothing about the units.
        args = ("verify", "--man=no", *args[1:])
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, env=env, timeout=60)


def rendered(tmp_path: Path, role: str) -> Path:
    unit = tmp_path / f"tokenbridge-{role}.service"
    unit.write_bytes(install.render_unit(unit.name, BINDIR))
    return unit


def effective(dump: str, unit: str) -> str:
    """The unit's section of verify's debug dump (its settings after drop-ins)."""
    start = dump.index(f"-> Unit {unit}:")
    end = dump.find("-> Unit ", start + 1)
    return dump[start : end if end > 0 else None]


@pytest.mark.parametrize("role", ["server", "client"])
def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path: Path, role: str) -> None:
    unit = rendered(tmp_path, role)
    result = analyze("verify", str(unit))
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) not in result.stderr and unit.name not in result.stderr, result.stderr


def test_server_unit_is_notify_with_watchdog_and_usb_access_only(tmp_path: Path) -> None:
    dump = effective(
        analyze("verify", str(rendered(tmp_path, "server")), debug=True).stdout, "tokenbridge-server.service"
    )
    for line in (
        "Type: notify", "NotifyAccess: main", "Restart: on-failure", "PrivateDevices: no",
        "DevicePolicy: closed", "DeviceAllow: char-usb_device rw", "ProtectSystem: strict",
        "User: tokenbridge", "StateDirectory: tokenbridge", "RuntimeDirectory: tokenbridge",
        "ConfigurationDirectory: tokenbridge", "WatchdogSec: 30s", "TimeoutStopSec: 30s",
    ):  # fmt: skip
        assert line in dump, line


def test_server_stop_timeout_exceeds_twice_the_grace_period_plus_usb_release() -> None:
    from bridge_server.config import LimitsConfig
    from bridge_server.tokens.manager import CLEANUP_TIMEOUT_S

    text = (SYSTEMD / "tokenbridge-server.service").read_text()
    stop_s = int(text.split("TimeoutStopSec=")[1].split("s", 1)[0])
    assert stop_s > 2 * LimitsConfig().grace_period_s + CLEANUP_TIMEOUT_S


@pytest.mark.parametrize(("role", "limit"), [("server", "1.6"), ("client", "1.4")])
def test_security_exposure_stays_low(tmp_path: Path, role: str, limit: str) -> None:
    unit = rendered(tmp_path, role)
    result = analyze("security", "--offline=yes", str(unit))
    overall = [ln for ln in result.stdout.splitlines() if "Overall exposure level" in ln]
    assert overall, result.stdout + result.stderr
    level = float(overall[0].split(":")[1].split()[0])
    assert level <= float(limit), overall[0]


@pytest.mark.skipif(not PCSCD_UNIT.exists(), reason="pcscd.service not installed")
def test_pcscd_dropins_confine_to_loopback_and_keep_pcscd_running(tmp_path: Path) -> None:
    shutil.copy(PCSCD_UNIT, tmp_path)
    shutil.copy(PCSCD_UNIT.with_suffix(".socket"), tmp_path)
    dropins = tmp_path / "pcscd.service.d"
    dropins.mkdir()
    for name in ("pcscd-loopback.conf", "pcscd-keep-running.conf"):
        shutil.copy(SYSTEMD / name, dropins / f"tokenbridge-{name.removeprefix('pcscd-')}")
    result = analyze("verify", str(tmp_path / "pcscd.service"), debug=True)
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr and "Assignment outside" not in result.stderr
    dump = effective(result.stdout, "pcscd.service")
    for line in ("IPAddressDeny: 0.0.0.0/0", "IPAddressDeny: ::/0", "IPAddressAllow: 127.0.0.0/8",
                 "IPAddressAllow: ::1/128"):  # fmt: skip
        assert line in dump, line
    exec_start = dump.split("-> ExecStart:")[1].split("-> ")[0]
    assert "/usr/sbin/pcscd --foreground" in exec_start and "--auto-exit" not in exec_start


def test_sysusers_and_tmpfiles_create_the_user_and_private_folders(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "tokenbridge.sysusers.conf")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert any(
        ln.startswith("tokenbridge:") and ln.endswith(":/usr/sbin/nologin") for ln in passwd.splitlines()
    )
    assert "tokenbridge-signers:" in (tmp_path / "etc" / "group").read_text()
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(SYSTEMD / "tokenbridge.tmpfiles.conf")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    for folder in ("etc/tokenbridge", "var/lib/tokenbridge", "run/tokenbridge"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o750, folder


def test_the_systemd_files_exist_once_and_the_installer_reads_that_copy() -> None:
    assert not (REPO / "bridge_server" / "service_files").exists()
    assert install.files_dir() in (SYSTEMD, Path(sys.prefix) / install.SHARE_SUBDIR)
    for p in [*SYSTEMD.glob("*.*"), *(SYSTEMD / "examples").glob("*.yaml")]:
        assert install.service_file(p.name) == p.read_bytes(), p.name


def test_install_service_server_writes_units_rules_and_keeps_an_existing_config(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "tokenbridge" / "server.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    example = SYSTEMD / "examples" / "server.yaml"
    cmd = [BINDIR + "/tokenbridge", "install-service", "server", "--prefix", str(tmp_path)]
    out = subprocess.run(
        [*cmd, "--config", str(example)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    unit = (tmp_path / "etc/systemd/system/tokenbridge-server.service").read_text()
    assert f"ExecStart={BINDIR}/tokenbridge-server --config /etc/tokenbridge/server.yaml" in unit
    rules = (tmp_path / "etc/udev/rules.d/70-tokenbridge.rules").read_text()
    assert 'ATTR{idVendor}=="0529", ATTR{idProduct}=="0620", MODE="0660", GROUP="tokenbridge"' in rules
    assert "@TOKEN_RULES@" not in rules
    assert config.read_text() == "# mine\n"  # never overwritten
    assert "systemctl enable --now tokenbridge-server.service" in out
    assert (tmp_path / "etc/sysusers.d/tokenbridge.conf").read_bytes() == (
        SYSTEMD / "tokenbridge.sysusers.conf"
    ).read_bytes()


def test_install_service_client_adds_polkit_and_pcscd_dropins_and_dry_run_writes_nothing(
    tmp_path: Path,
) -> None:
    cmd = [BINDIR + "/tokenbridge", "install-service", "client", "--prefix", str(tmp_path)]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "would write" in dry and not any(tmp_path.iterdir())
    subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    assert (tmp_path / "etc/systemd/system/pcscd.service.d/tokenbridge-loopback.conf").exists()
    assert (tmp_path / "etc/polkit-1/rules.d/60-tokenbridge-pcsc.rules").exists()
    client_yaml = tmp_path / "etc/tokenbridge/client.yaml"
    assert client_yaml.stat().st_mode & 0o777 == 0o644  # no secret inside: the key is a credential
    unit = rendered(tmp_path, "client")
    assert unit.read_bytes() == (tmp_path / "etc/systemd/system/tokenbridge-client.service").read_bytes()


def test_udev_rule_without_usb_tokens_holds_a_commented_example() -> None:
    rules = install.udev_rules(None).decode()
    assert "\n# ACTION" in rules and "\nACTION" not in rules
