"""Issue 19 #6: something re-signs the CRL. The timer and service in systemd/, as installed.

The service's ExecStart is run as systemd would run it (the rendered command line, only the PKI
folder moved into the test's folder); `systemd-analyze` checks the units and the timer's calendar.
"""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from bridge_admin.pki import Pki
from bridge_server.net.reload import CRL_WARNING_S
from protocol.runtime.tls import crl_problem

BINDIR = str(Path(sys.executable).parent)
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")


def _install(prefix: Path) -> tuple[Path, Path]:
    subprocess.run(
        [BINDIR + "/tokenbridge", "install-service", "crl", "--prefix", str(prefix)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    units = prefix / "etc/systemd/system"
    return units / "tokenbridge-crl.service", units / "tokenbridge-crl.timer"


def _exec_start(unit: Path) -> list[str]:
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def _number(path: Path) -> int:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def test_the_installed_service_re_signs_a_30_day_crl_with_a_higher_number_each_run(tmp_path: Path) -> None:
    service, _timer = _install(tmp_path / "root")
    pki = Pki(tmp_path / "pki")
    pki.init()
    argv = [a.replace("/etc/tokenbridge/pki", str(pki.folder)) for a in _exec_start(service)]
    assert argv[0] == BINDIR + "/tokenbridge"
    before = _number(pki.crl_path)
    for run in (1, 2):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        assert _number(pki.crl_path) == before + run
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    now = dt.datetime.now(dt.UTC)
    assert crl.next_update_utc is not None
    assert dt.timedelta(days=29) < crl.next_update_utc - now <= dt.timedelta(days=30)
    assert crl_problem(pki.crl_path, now, ca=pki.ca_cert_path) is None  # what the server checks


@needs_analyze
def test_the_crl_units_verify_and_the_timer_fires_weekly_and_catches_up(tmp_path: Path) -> None:
    service, timer = _install(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(service), str(timer)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0 and "tokenbridge-crl" not in result.stderr, result.stderr
    text = timer.read_text()
    assert "OnCalendar=weekly" in text and "Persistent=true" in text
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    level = float(
        next(ln for ln in security.splitlines() if "Overall exposure" in ln).split(":")[1].split()[0]
    )
    assert level <= 1.5


def test_the_crl_lifetime_leaves_weeks_between_the_timer_and_the_servers_warning() -> None:
    service = (Path(__file__).resolve().parents[2] / "systemd/tokenbridge-crl.service").read_text()
    days = int(service.split("crl --days ")[1].split()[0])
    timer_period_days = 7  # OnCalendar=weekly, plus RandomizedDelaySec=1h
    assert days * 86400 - CRL_WARNING_S >= 2 * timer_period_days * 86400
