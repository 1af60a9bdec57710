"""`Section`: one YAML mapping being read with the shared field checks of `runtime.config`.

The server's config is deep (tokens[i].match.vid), so it reads each mapping as a `Section`
that remembers its file, dotted prefix and allowed keys; every check is one of the typed
helpers in `protocol.runtime.config`, so both daemons accept and refuse exactly the same
values with the same messages (NaN, hex USB ids, unquoted numeric text...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError
from protocol.runtime import config as fields

__all__ = ["Section"]


class Section:
    """The mapping at dotted `prefix` of the file at `path`; unknown keys are refused at once."""

    def __init__(self, raw: object, path: str, prefix: str, known: tuple[str, ...]) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(path, prefix, f"expected a mapping of settings, got {type(raw).__name__}")
        self.raw: Mapping[str, Any] = raw
        self.path = path
        self.prefix = prefix
        self.known = known
        fields.reject_unknown(raw, known, path, prefix)

    def key(self, name: str) -> str:
        return fields.dotted(self.prefix, name)

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def require(self, name: str) -> Any:
        if not self.has(name):
            raise self.error(name, "required but missing")
        return self.raw[name]

    def string(self, name: str, *, required: bool = False) -> str | None:
        if required:
            return fields.require_str(self.raw, name, self.path, prefix=self.prefix)
        return fields.optional_str(self.raw, name, self.path, prefix=self.prefix)

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        """Seconds, finite and strictly above `minimum` (a zero timeout would fire at once)."""
        value = fields.optional_float(self.raw, name, self.path, default, prefix=self.prefix, minimum=minimum)
        assert value is not None  # the default is a float
        if value <= minimum:
            raise self.error(name, f"must be greater than {minimum:g}, got {value:g}")
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value = self.optional_integer(name, low=low, high=high)
        return default if value is None else value

    def optional_integer(self, name: str, *, low: int, high: int) -> int | None:
        """An integer in low..high; text in decimal or 0x-hex too (USB ids are written 0x0529)."""
        return fields.optional_int(self.raw, name, self.path, prefix=self.prefix, minimum=low, maximum=high)

    def file(self, name: str) -> Path | None:
        """A path; relative ones resolve against the config file's folder (DESIGN §6)."""
        value = self.string(name)
        return None if value is None else fields.resolve_path(value, Path(self.path))

    def required_file(self, name: str) -> Path:
        return fields.resolve_path(self.string(name, required=True) or "", Path(self.path))

    def names(self, name: str) -> tuple[str, ...]:
        return tuple(
            fields.optional_str_list(
                self.raw, name, self.path, prefix=self.prefix, what="a list of identity names"
            )
        )

    def section(self, name: str, known: tuple[str, ...]) -> Section:
        sub = fields.optional_mapping(self.raw, name, self.path, prefix=self.prefix)
        return Section(sub, self.path, self.key(name), known)
