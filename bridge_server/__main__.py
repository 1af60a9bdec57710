"""`python -m bridge_server`: the same as `tokenbridge-server`."""

from __future__ import annotations

import sys

from bridge_server.cli import main

sys.exit(main())
