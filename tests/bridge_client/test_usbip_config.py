"""client.yaml `reader: usbip` and `usbip.listen`: defaults and errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge_client.config import parse_client_config
from protocol.errors import ConfigError
from protocol.runtime.address import Address

CONFIG = Path("/etc/tokenbridge/client.yaml")


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "server": "tokenhost.example",
        "tls": {"ca": "pki/ca.pem", "cert": "pki/vm.pem", "key": "pki/vm.key"},
        "readers": [{"token": "codesign"}, {"token": "spare"}],
    }
    return base | changes


def test_the_backend_defaults_to_vpcd_and_usbip_listens_on_loopback_port_3240() -> None:
    assert parse_client_config(doc(), CONFIG).reader == "vpcd"
    cfg = parse_client_config(doc(reader="usbip"), CONFIG)
    assert (cfg.reader, cfg.usbip_listen) == ("usbip", Address("127.0.0.1", 3240))
    cfg = parse_client_config(doc(reader="usbip", usbip={"listen": "127.0.0.1:4000"}), CONFIG)
    assert cfg.usbip_listen == Address("127.0.0.1", 4000)


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"reader": "pcsc"}, "reader", "must be one of vpcd, usbip, not 'pcsc'"),
        ({"usbip": {"listen": "127.0.0.1:4000"}}, "usbip", "only applies with `reader: usbip`"),
        ({"reader": "usbip", "usbip": {"listen": "0.0.0.0:3240"}}, "usbip.listen", "not a loopback address"),
        ({"reader": "usbip", "usbip": {"port": 3240}}, "usbip.port", "unknown"),
        ({"reader": "usbip", "usbip": {"listen": "127.0.0.1:99999"}}, "usbip.listen", "99999"),
        (
            {"reader": "usbip", "readers": [{"token": "codesign", "vpcd": {"connect": "127.0.0.1:35963"}}]},
            "readers[0].vpcd",
            "does not apply with `reader: usbip`",
        ),
    ],
)
def test_usbip_settings_errors_name_the_key(changes: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_client_config(doc(**changes), CONFIG)
    assert info.value.key == key
    assert words in str(info.value)
