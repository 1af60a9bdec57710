"""Every duration key of server.yaml refuses NaN and ±infinity (issue 13 item 7).

`nan <= 0` is False, so a bare `value <= minimum` check let `.nan` through: a NaN
`limits.handshake_timeout_s` crashed the server on the first connection, a NaN `heartbeat_s`
crashed every session and a NaN `lease.idle_timeout_s` turned the idle timeout off.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from bridge_server.config import parse_server_config
from protocol.errors import ConfigError

CFG = Path("/etc/tokenbridge/server.yaml")

DURATION_KEYS = [
    ("lease", "linger_s"),
    ("lease", "idle_timeout_s"),
    ("lease", "max_hold_s"),
    ("lease", "queue_timeout_s"),
    ("limits", "handshake_timeout_s"),
    ("limits", "grace_period_s"),
    (None, "heartbeat_s"),
]


def _doc(section: str | None, key: str, value: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
        "tokens": [{"name": "codesign", "match": {"simulate": "yubikey5"}, "allow": ["vm1"]}],
    }
    if section is None:
        doc[key] = value
    else:
        doc[section] = {key: value}
    return doc


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("section", "key"), DURATION_KEYS)
def test_every_duration_key_refuses_nan_and_infinity(section: str | None, key: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_config(_doc(section, key, value), CFG)
    assert info.value.key == (key if section is None else f"{section}.{key}")
    assert "finite" in str(info.value) or "greater than" in str(info.value)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN", ".Inf"])
def test_yaml_spellings_of_nan_and_infinity_are_refused(text: str) -> None:
    raw = yaml.safe_load(f"limits: {{handshake_timeout_s: {text}}}")
    doc = _doc("limits", "handshake_timeout_s", 1.0) | raw
    with pytest.raises(ConfigError, match=r"limits\.handshake_timeout_s"):
        parse_server_config(doc, CFG)


@pytest.mark.parametrize(("section", "key"), DURATION_KEYS)
def test_a_finite_positive_duration_is_still_accepted(section: str | None, key: str) -> None:
    config = parse_server_config(_doc(section, key, 2.5), CFG)
    part = config if section is None else getattr(config, section)
    assert getattr(part, key) == 2.5
