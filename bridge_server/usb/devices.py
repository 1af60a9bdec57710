"""How a configured token's card is opened: a real USB device, or a simulator profile.

Both paths go through pyusb and the same `UsbCcidDevice` / `CcidDriver` code (DESIGN §7): a
`simulate:` token only swaps the pyusb backend for the simulator's, so the server's USB and
CCID layers run unchanged in tests and in the demo.
"""

from __future__ import annotations

from typing import Any

import structlog

from bridge_server.config import TokenConfig
from bridge_server.tokens.device import CardOpener, OpenedCard
from bridge_server.usb.identity import IdentityCard, IdentitySource, read_card_identity
from bridge_server.usb.transport import AsyncUsbDevice, DeviceMatch
from protocol.errors import ConfigError

log = structlog.get_logger(__name__)


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
            backend, sims = open_simulator(
                [match.simulate], state_dir=match.state, usb_serial=match.usb_serial
            )
        except ValueError as exc:
            raise ConfigError(config_path, f"tokens.{token.name}.match.simulate", str(exc)) from None
        simulated = sims[0]
        device_match = DeviceMatch(vid=simulated.profile.vid, pid=simulated.profile.pid)
    else:
        device_match = DeviceMatch(vid=match.vid, pid=match.pid, serial=match.serial, port=match.port)

    async def open_card() -> OpenedCard:
        device = await AsyncUsbDevice.open(device_match, backend=backend)
        try:
            timeouts = token.timeouts
            driver = CcidDriver(
                device,
                frame_timeout_s=timeouts.frame_s,
                max_wait_s=timeouts.max_s,
                rescue=device,
                data_rates=device.data_rates,
            )
            serial, source = device.info.serial, IdentitySource.USB_SERIAL
            if not serial:
                serial, source = await _fallback_identity(token, device, driver)
        except BaseException:
            await device.aclose()
            raise
        return OpenedCard(driver=driver, serial=serial, close=device.aclose, identity_source=source.value)

    return open_card, simulated


async def _fallback_identity(
    token: TokenConfig, device: AsyncUsbDevice, driver: IdentityCard
) -> tuple[str, IdentitySource]:
    """The identity of a device without a usb serial: from its card, else its usb port path."""
    found = await read_card_identity(driver)
    if found is not None:
        identity, source = found
    else:
        identity, source = f"usb-port:{device.info.port_path or 'unknown'}", IdentitySource.USB_PORT
    # Loud: the token is no longer known by what it says over USB, and an operator must know
    # what the server will compare on a replug (a configured serial, or the first one seen).
    log.warning(
        "device.identity_fallback",
        token=token.name,
        device=device.info.describe(),
        identity=identity,
        source=source.value,
        configured_serial=token.match.serial,
        reason="the usb device reports no serial number (iSerialNumber)",
        hint=(
            "match this token by port (tokens[].match.port) or by the serial read from its card"
            if source is not IdentitySource.USB_PORT
            else "match this token by port (tokens[].match.port); it must stay in that usb port"
        ),
    )
    return identity, source
