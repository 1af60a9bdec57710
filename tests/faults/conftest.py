"""Lend the e2e fixtures (pcscd, vpcd_slot) to the fault tests (helpers: pyproject pythonpath)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent

# The e2e conftest's fixtures, loaded under another module name (pytest only reads conftest
# files on the path of the collected tests).
_spec = importlib.util.spec_from_file_location("e2e_fixtures", _TESTS / "e2e" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
pcscd = _e2e.pcscd
vpcd_slot = _e2e.vpcd_slot
