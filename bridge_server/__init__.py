"""tokenbridge-server: the daemon that owns the USB token and serves it to build machines."""

from typing import Final

__version__: Final = "0.1.0"
SERVER_SOFTWARE: Final = f"tokenbridge-server/{__version__}"  # sent in Welcome, shown by status
