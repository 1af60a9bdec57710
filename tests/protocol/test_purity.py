"""protocol/ (outside protocol/runtime/) is pure: importing it loads no I/O, clock or
concurrency module (STYLE "Shape"). Checked in a fresh interpreter so this test run's own
imports (trio, pytest, ...) do not hide anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# Every pure module, named explicitly: a module that disappears or is renamed fails the
# existence test instead of silently dropping out of the purity check.
PURE_MODULES = (
    "protocol",
    "protocol.ccid",
    "protocol.ccid_stream",
    "protocol.atr",
    "protocol.t1",
    "protocol.apdu",
    "protocol.vpcd",
    "protocol.wire",
    "protocol.connection",
    "protocol.errors",
    "protocol.speculation",
)

FORBIDDEN = (
    "trio",
    "usb",
    "socket",
    "ssl",
    "select",
    "selectors",
    "threading",
    "asyncio",
    "logging",
    "structlog",
    "yaml",
)

_PROBE = """
import importlib, importlib.util, json, pkgutil, sys
explicit = json.loads(sys.argv[1])
import protocol
# plus any module added to protocol/ since the list above was written (runtime/ excepted)
found = [f"protocol.{m.name}" for m in pkgutil.iter_modules(protocol.__path__) if m.name != "runtime"]
missing = [name for name in explicit if importlib.util.find_spec(name) is None]
broken = {}
for name in dict.fromkeys(explicit + found):
    if name not in missing:
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported per module; the others are still checked
            broken[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"missing": missing, "broken": broken, "loaded": sorted(sys.modules), "found": found}))
"""


def _probe() -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(PURE_MODULES)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    return _probe()


def test_importing_pure_protocol_modules_loads_no_io_module(probe: dict[str, Any]) -> None:
    loaded = set(probe["loaded"])
    leaked = [name for name in FORBIDDEN if name in loaded or any(m.startswith(name + ".") for m in loaded)]
    assert leaked == []


def test_runtime_is_not_imported_by_pure_modules(probe: dict[str, Any]) -> None:
    assert not [m for m in probe["loaded"] if m.startswith("protocol.runtime")]


def test_the_probe_actually_imported_the_modules(probe: dict[str, Any]) -> None:
    loaded = set(probe["loaded"])
    present = [name for name in PURE_MODULES if name not in probe["missing"] and name not in probe["broken"]]
    assert "protocol.errors" in present
    assert set(present) <= loaded


def test_every_listed_pure_module_exists(probe: dict[str, Any]) -> None:
    assert probe["missing"] == [], "pure modules named in docs/internals.md are missing"


def test_every_pure_module_imports_cleanly(probe: dict[str, Any]) -> None:
    assert probe["broken"] == {}
