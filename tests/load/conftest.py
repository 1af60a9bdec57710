"""Make tests/support (faultproxy, inproc) and tests/bridge_server (server_fakes) importable."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
for _dir in (str(_TESTS / "support"), str(_TESTS / "bridge_server")):  # + server_fakes
    if _dir not in sys.path:
        sys.path.insert(0, _dir)
