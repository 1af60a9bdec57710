"""Make tests/support importable and lend the e2e fixtures (pcscd, vpcd_slot) to fault tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
for _dir in (str(_TESTS / "support"), str(_TESTS / "e2e")):  # faultproxy, inproc; e2e_stack
    if _dir not in sys.path:
        sys.path.insert(0, _dir)

# The e2e conftest's fixtures, loaded under another module name (pytest only reads conftest
# files on the path of the collected tests).
_spec = importlib.util.spec_from_file_location("e2e_fixtures", _TESTS / "e2e" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
pcscd = _e2e.pcscd
vpcd_slot = _e2e.vpcd_slot
