"""`python -m bridge_admin` is the `tokenbridge` command."""

import sys

from bridge_admin.cli import main

sys.exit(main())
