"""Issue 19 #7: `tokenbridge-client check-config` reports a certificate outside its validity.

It used to say "ok" for a certificate that had expired 20 days earlier; every connection then
failed with the server's "certificate expired", which reads like the server's fault.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from bridge_admin.pki import Pki
from bridge_client.cli import main


def _bundle(tmp_path: Path, *, not_before: dt.datetime, days: int) -> Path:
    pki = Pki(tmp_path / "pki")
    pki.init()
    issued = pki.issue_client(
        "build-vm-01", server="tokenhost.example:7447", days=days, not_before=not_before
    )
    return issued.cert.parent / "client.yaml"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_an_expired_certificate_is_a_problem_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _bundle(tmp_path, not_before=_now() - dt.timedelta(days=21), days=1)
    assert main(["check-config", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: tls.cert: certificate" in err and "expired on" in err and "(20 day(s) ago)" in err


def test_a_certificate_not_yet_valid_points_at_the_clock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _bundle(tmp_path, not_before=_now() + dt.timedelta(days=2), days=30)
    assert main(["check-config", "--config", str(config)]) == 1
    assert "is not valid before" in capsys.readouterr().err


def test_a_valid_certificate_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _bundle(tmp_path, not_before=_now() - dt.timedelta(days=1), days=30)
    assert main(["check-config", "--config", str(config)]) == 0
    assert "ok (1 reader(s)" in capsys.readouterr().out
