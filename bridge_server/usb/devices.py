"""How a configured token's card is opened: a real USB device, or a simulator profile.

Both paths go through pyusb and the same `UsbCcidDevice` / `CcidDriver` code (DESIGN §7): a
`simulate:` token only swaps the pyusb backend for the simulator's, so the server's USB and
CCID layers run unchanged in tests and in the demo.
"""

from __future__ import annotations

from typing import Any

from bridge_server.config import TokenConfig
from bridge_server.tokens.device import CardOpener, OpenedCard
from bridge_server.usb.transport import AsyncUsbDevice, DeviceMatch
from protocol.errors import ConfigError


def card_opener(token: TokenConfig, *, config_path: str = "") -> tuple[CardOpener, Any]:
    """The opener for `token`, and its `SimulatedToken` (None for a real device).

    Raises:
        ConfigError: `match.simulate` names no known simulator profile.
    """
    from bridge_server.usb.ccid_driver import CcidDriver

    match = token.match
    backend: object | None = None
    simulated: Any = None
    if match.simulate is not None:
        from bridge_server.simulator.backend import open_simulator

        try:
            backend, sims = open_simulator([match.simulate], state_dir=match.state)
        except ValueError as exc:
            raise ConfigError(config_path, f"tokens.{token.name}.match.simulate", str(exc)) from None
        simulated = sims[0]
        device_match = DeviceMatch(vid=simulated.profile.vid, pid=simulated.profile.pid)
    else:
        device_match = DeviceMatch(vid=match.vid, pid=match.pid, serial=match.serial)

    async def open_card() -> OpenedCard:
        device = await AsyncUsbDevice.open(device_match, backend=backend)
        try:
            timeouts = token.timeouts
            driver = CcidDriver(device, frame_timeout_s=timeouts.frame_s, max_wait_s=timeouts.max_s)
        except BaseException:
            await device.aclose()
            raise
        return OpenedCard(driver=driver, serial=device.info.serial, close=device.aclose)

    return open_card, simulated
