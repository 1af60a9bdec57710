"""Every duration key of client.yaml refuses NaN and ±infinity (issue 13 item 7)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from bridge_client.config import parse_client_config
from protocol.errors import ConfigError

CONFIG = Path("/etc/tokenbridge/client.yaml")
MINIMAL: dict[str, Any] = {
    "server": "tokenhost.example",
    "tls": {"ca": "pki/ca.pem", "cert": "pki/vm.pem", "key": "pki/vm.key"},
    "readers": [{"token": "codesign"}],
}
DURATION_KEYS = [
    ("lease", "queue_timeout_s"),
    ("reconnect", "initial_s"),
    ("reconnect", "max_s"),
    ("reconnect", "connect_timeout_s"),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("section", "key"), DURATION_KEYS)
def test_every_client_duration_key_refuses_nan_and_infinity(section: str, key: str, value: float) -> None:
    doc = copy.deepcopy(MINIMAL)
    doc[section] = {key: value}
    with pytest.raises(ConfigError) as info:
        parse_client_config(doc, CONFIG)
    assert info.value.key == f"{section}.{key}"
