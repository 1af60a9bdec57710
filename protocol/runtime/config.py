"""YAML config loading and typed field helpers shared by both daemons.

Every failure is a `ConfigError(path, key, problem)` that says which file, which dotted key
and what to do (STYLE "Errors"). The daemons' own config modules decide *which* keys exist;
this module only makes each check one line and each message consistent.

`mapping` arguments are the parsed YAML mapping at `prefix` (e.g. the `tls` section has
prefix `"tls"`), so an error names `tls.cert`, not just `cert`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml  # type: ignore[import-untyped]  # no stubs in the venv

from protocol.errors import ConfigError

__all__ = [
    "CREDENTIAL_PREFIX",
    "Fields",
    "credential_path",
    "dotted",
    "dump_yaml",
    "load_yaml",
    "optional_bool",
    "optional_float",
    "optional_int",
    "optional_mapping",
    "optional_str",
    "optional_str_list",
    "reject_unknown",
    "require_bool",
    "require_float",
    "require_int",
    "require_mapping",
    "require_str",
    "require_str_list",
    "resolve_path",
]

_MAX_SHOWN: Final = 60  # longest rendering of an offending value in a message


# --- loading ----------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last one, so a
    pasted second `allow:` block would quietly replace the first."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}", mark
            )
        seen.add(key)
    mapping: dict[Any, Any] = loader.construct_mapping(node)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML config file whose top level is a mapping (an empty file is `{}`)."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "", "file not found — create it or pass --config") from None
    except IsADirectoryError:
        raise ConfigError(
            where, "", "is a directory, not a config file — pass the file with --config"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(where, "", f"not utf-8 text (byte {exc.start}) — save it as utf-8") from None
    except OSError as exc:
        raise ConfigError(
            where, "", f"cannot read it: {exc.strerror or exc} — check its permissions"
        ) from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(where, "", _describe_yaml_error(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, "", f"yaml syntax error: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(where, "", f"top level must be a mapping of settings, got {_type_name(data)}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(where, str(key), f"keys must be strings, got {_type_name(key)} {key!r}")
    return data


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid yaml"
    if mark is None:
        return f"yaml syntax error: {problem}"
    if problem.startswith("duplicate key"):
        return problem
    return f"yaml syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def dump_yaml(document: Mapping[str, Any], *, comment: str = "") -> str:
    """`document` as YAML text via `yaml.safe_dump` (never f-strings: a value with `: `, `#` or
    quotes must read back as itself), keys in the given order, led by `# comment` if any."""
    text: str = yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"# {comment}\n{text}" if comment else text


# --- typed fields -----------------------------------------------------------------------------


class _Missing:
    pass


_MISSING: Final = _Missing()


def dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a mapping" if isinstance(value, dict) else type(value).__name__
    )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _get(mapping: Mapping[str, Any], key: str, path: str | Path, prefix: str, required: bool) -> Any:
    if key in mapping and mapping[key] is not None:
        return mapping[key]
    if required:
        raise ConfigError(str(path), dotted(prefix, key), "required but missing")
    return _MISSING


def _wrong(path: str | Path, prefix: str, key: str, expected: str, value: object) -> ConfigError:
    return ConfigError(
        str(path), dotted(prefix, key), f"expected {expected}, got {_type_name(value)} {_shown(value)}"
    )


def _check_str(value: object, path: str | Path, key: str, prefix: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _wrong(path, prefix, key, "a string", value)
    if not isinstance(value, str):
        # YAML read `serial: 0012345` as a number: leading zeros are already lost.
        raise _wrong(path, prefix, key, f"a string (quote it: '{value}')", value)
    if not value.strip():
        raise ConfigError(str(path), dotted(prefix, key), "must not be empty")
    return value


def require_str(mapping: Mapping[str, Any], key: str, path: str | Path, *, prefix: str = "") -> str:
    return _check_str(_get(mapping, key, path, prefix, True), path, key, prefix)


def optional_str(
    mapping: Mapping[str, Any], key: str, path: str | Path, default: str | None = None, *, prefix: str = ""
) -> str | None:
    value = _get(mapping, key, path, prefix, False)
    return default if value is _MISSING else _check_str(value, path, key, prefix)


_INT_TEXT = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)")


def _check_int(
    value: object, path: str | Path, key: str, prefix: str, minimum: int | None, maximum: int | None
) -> int:
    """Integers, or strings in decimal or 0x-hex: USB ids are written `0x0529` by habit."""
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        number = int(value.strip(), 0) if value.strip().lower().startswith("0x") else int(value.strip(), 10)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise _wrong(path, prefix, key, "an integer (decimal or 0x-hex)", value)
    if minimum is not None and number < minimum:
        raise ConfigError(str(path), dotted(prefix, key), f"must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(str(path), dotted(prefix, key), f"must be <= {maximum}, got {number}")
    return number


def require_int(
    mapping: Mapping[str, Any],
    key: str,
    path: str | Path,
    *,
    prefix: str = "",
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    return _check_int(_get(mapping, key, path, prefix, True), path, key, prefix, minimum, maximum)


def optional_int(
    mapping: Mapping[str, Any],
    key: str,
    path: str | Path,
    default: int | None = None,
    *,
    prefix: str = "",
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    value = _get(mapping, key, path, prefix, False)
    return default if value is _MISSING else _check_int(value, path, key, prefix, minimum, maximum)


def _check_float(value: object, path: str | Path, key: str, prefix: str, minimum: float) -> float:
    """Durations in float seconds (STYLE: other units carry their unit in the key name)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(path, prefix, key, "a number of seconds", value)
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(str(path), dotted(prefix, key), f"must be a finite number, got {number}")
    if number < minimum:
        raise ConfigError(str(path), dotted(prefix, key), f"must be >= {minimum:g}, got {number:g}")
    return number


def require_float(
    mapping: Mapping[str, Any], key: str, path: str | Path, *, prefix: str = "", minimum: float = 0.0
) -> float:
    return _check_float(_get(mapping, key, path, prefix, True), path, key, prefix, minimum)


def optional_float(
    mapping: Mapping[str, Any],
    key: str,
    path: str | Path,
    default: float | None = None,
    *,
    prefix: str = "",
    minimum: float = 0.0,
) -> float | None:
    value = _get(mapping, key, path, prefix, False)
    return default if value is _MISSING else _check_float(value, path, key, prefix, minimum)


def _check_bool(value: object, path: str | Path, key: str, prefix: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong(path, prefix, key, "true or false (unquoted)", value)
    return value


def require_bool(mapping: Mapping[str, Any], key: str, path: str | Path, *, prefix: str = "") -> bool:
    return _check_bool(_get(mapping, key, path, prefix, True), path, key, prefix)


def optional_bool(
    mapping: Mapping[str, Any], key: str, path: str | Path, default: bool | None = None, *, prefix: str = ""
) -> bool | None:
    value = _get(mapping, key, path, prefix, False)
    return default if value is _MISSING else _check_bool(value, path, key, prefix)


def _check_str_list(
    value: object, path: str | Path, key: str, prefix: str, what: str = "a list of strings"
) -> list[str]:
    if not isinstance(value, list):
        raise _wrong(path, prefix, key, what, value)
    return [_check_str(item, path, f"{key}[{i}]", prefix) for i, item in enumerate(value)]


def require_str_list(
    mapping: Mapping[str, Any], key: str, path: str | Path, *, prefix: str = ""
) -> list[str]:
    return _check_str_list(_get(mapping, key, path, prefix, True), path, key, prefix)


def optional_str_list(
    mapping: Mapping[str, Any],
    key: str,
    path: str | Path,
    default: Iterable[str] = (),
    *,
    prefix: str = "",
    what: str = "a list of strings",
) -> list[str]:
    """`what` names the list in the message ("a list of identity names")."""
    value = _get(mapping, key, path, prefix, False)
    return list(default) if value is _MISSING else _check_str_list(value, path, key, prefix, what)


def _check_mapping(value: object, path: str | Path, key: str, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _wrong(path, prefix, key, "a mapping of settings", value)
    for sub in value:
        if not isinstance(sub, str):
            raise ConfigError(str(path), dotted(dotted(prefix, key), str(sub)), "keys must be strings")
    return value


def require_mapping(
    mapping: Mapping[str, Any], key: str, path: str | Path, *, prefix: str = ""
) -> dict[str, Any]:
    return _check_mapping(_get(mapping, key, path, prefix, True), path, key, prefix)


def optional_mapping(
    mapping: Mapping[str, Any], key: str, path: str | Path, *, prefix: str = ""
) -> dict[str, Any]:
    """The sub-mapping, or `{}` when absent, so section defaults apply."""
    value = _get(mapping, key, path, prefix, False)
    return {} if value is _MISSING else _check_mapping(value, path, key, prefix)


def reject_unknown(
    mapping: Mapping[str, Any], allowed: Iterable[str], path: str | Path, prefix: str = ""
) -> None:
    """Typos must not silently fall back to defaults: name the unknown key and the closest one."""
    allowed_set = sorted(set(allowed))
    for key in sorted(str(k) for k in mapping if k not in allowed_set):
        close = difflib.get_close_matches(key, allowed_set, n=1, cutoff=0.6)
        hint = (
            f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed_set) or '(none)'}"
        )
        raise ConfigError(str(path), dotted(prefix, key), f"unknown key; {hint}")


class Fields:
    """The helpers above as one namespace (docs/internals.md: `Fields.require_str(...)`)."""

    require_str = staticmethod(require_str)
    optional_str = staticmethod(optional_str)
    require_int = staticmethod(require_int)
    optional_int = staticmethod(optional_int)
    require_float = staticmethod(require_float)
    optional_float = staticmethod(optional_float)
    require_bool = staticmethod(require_bool)
    optional_bool = staticmethod(optional_bool)
    require_str_list = staticmethod(require_str_list)
    optional_str_list = staticmethod(optional_str_list)
    require_mapping = staticmethod(require_mapping)
    optional_mapping = staticmethod(optional_mapping)
    reject_unknown = staticmethod(reject_unknown)


# --- paths (addresses: protocol.runtime.address) --------------------------------------------


# Issue 19 #2: keys reach the service as systemd credentials (LoadCredential=), never as files
# the service user can read on disk. A path value `credential:NAME` is the credential NAME.
CREDENTIAL_PREFIX: Final = "credential:"
# systemd.exec(5), LoadCredential= (systemd >= 252): a credential without an absolute source
# path is looked up in these folders; a program started outside the service (check-config as
# root) looks in the same places, so both read the same file.
CREDSTORE_DIRS: Final = (Path("/etc/credstore"), Path("/run/credstore"), Path("/usr/lib/credstore"))
_CREDENTIAL_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,254}$")


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where credential NAME is: `$CREDENTIALS_DIRECTORY/NAME` inside a unit that has
    `LoadCredential=NAME:...`, else the first credstore folder holding it (else /etc/credstore).

    Raises:
        ValueError: NAME is not a plain file name.
    """
    if not _CREDENTIAL_NAME.match(name) or name in {".", ".."}:
        raise ValueError(f"{name!r} is not a credential name (letters, digits, '_', '.', '@', '-')")
    env = os.environ if environ is None else environ
    folder = env.get("CREDENTIALS_DIRECTORY")
    if folder:
        return Path(folder) / name
    for store in CREDSTORE_DIRS:
        if (store / name).exists():
            return store / name
    return CREDSTORE_DIRS[0] / name


def resolve_path(value: str | Path, config_path: Path) -> Path:
    """`~` expanded; a relative path is relative to the config file's folder, not the cwd
    (systemd starts daemons in `/`); `credential:NAME` is `credential_path(NAME)`."""
    if isinstance(value, str) and value.startswith(CREDENTIAL_PREFIX):
        try:
            return credential_path(value.removeprefix(CREDENTIAL_PREFIX))
        except ValueError as exc:
            raise ConfigError(str(config_path), "", str(exc)) from None
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return candidate
    return config_path.parent / candidate
