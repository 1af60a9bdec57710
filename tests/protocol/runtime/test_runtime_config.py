"""Config loading and typed fields: every error names the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.errors import ConfigError
from protocol.runtime import config as cfg
from protocol.runtime.config import (
    Fields,
    load_yaml,
    optional_bool,
    optional_float,
    optional_int,
    optional_mapping,
    optional_str,
    optional_str_list,
    reject_unknown,
    require_float,
    require_int,
    require_mapping,
    require_str,
    require_str_list,
    resolve_path,
)

P = "/etc/bridge/server.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- load_yaml --------------------------------------------------------------------------------


def test_load_yaml_returns_the_top_level_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen: 0.0.0.0:7000\ntls:\n  ca: ca.pem\n")
    assert load_yaml(path) == {"listen": "0.0.0.0:7000", "tls": {"ca": "ca.pem"}}


def test_empty_file_is_an_empty_mapping(tmp_path: Path) -> None:
    assert load_yaml(_write(tmp_path, "# nothing yet\n")) == {}


def test_missing_file_says_create_it_or_pass_config(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert info.value.path == str(path)
    assert info.value.key == ""
    assert "file not found" in info.value.problem
    assert "--config" in info.value.problem
    assert str(path) in str(info.value)


def test_directory_instead_of_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_yaml(tmp_path)


def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen: a\ntls:\n  ca: [unclosed\n  cert: x\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert info.value.path == str(path)
    assert "yaml syntax error at line 4, column" in info.value.problem


def test_duplicate_key_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "listen: a\nallow: [x]\nallow: [y]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'allow' at line 3, column 1"):
        load_yaml(path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("just text\n", "a string")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    with pytest.raises(ConfigError, match=f"top level must be a mapping of settings, got {kind}"):
        load_yaml(_write(tmp_path, text))


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not utf-8"):
        load_yaml(path)


# --- typed fields -----------------------------------------------------------------------------


def _key_error(func: object, *args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        func(*args, **kwargs)  # type: ignore[operator]
    assert info.value.path == P
    return info.value


def test_required_key_missing_names_the_dotted_key() -> None:
    err = _key_error(require_str, {}, "cert", P, prefix="tls")
    assert err.key == "tls.cert"
    assert err.problem == "required but missing"
    assert str(err) == f"{P}: tls.cert: required but missing"


def test_null_value_counts_as_missing() -> None:
    assert optional_str({"name": None}, "name", P, "dflt") == "dflt"
    assert _key_error(require_str, {"name": None}, "name", P).problem == "required but missing"


def test_number_where_a_string_belongs_suggests_quoting() -> None:
    err = _key_error(require_str, {"serial": 12345}, "serial", P, prefix="tokens.0")
    assert err.key == "tokens.0.serial"
    assert "quote it: '12345'" in err.problem


def test_empty_string_is_refused() -> None:
    assert _key_error(require_str, {"name": "  "}, "name", P).problem == "must not be empty"


@pytest.mark.parametrize(
    ("raw", "expected"), [(0x0529, 0x0529), ("0x0529", 0x0529), ("0X620", 0x620), ("42", 42)]
)
def test_int_accepts_ints_and_hex_or_decimal_strings(raw: object, expected: int) -> None:
    assert require_int({"vid": raw}, "vid", P) == expected


@pytest.mark.parametrize("raw", ["0x", "12ab", "-3", True, 1.5, [1]])
def test_int_rejects_other_values_showing_them(raw: object) -> None:
    err = _key_error(require_int, {"vid": raw}, "vid", P, prefix="tokens.1.match")
    assert err.key == "tokens.1.match.vid"
    assert repr(raw) in err.problem


def test_int_range_is_checked() -> None:
    err = _key_error(optional_int, {"pid": 0x10000}, "pid", P, maximum=0xFFFF)
    assert err.problem == "must be <= 65535, got 65536"
    assert optional_int({}, "pid", P, 7) == 7


def test_float_durations_accept_ints_and_refuse_negatives_and_strings() -> None:
    assert require_float({"grace_period": 10}, "grace_period", P) == 10.0
    assert optional_float({}, "idle_timeout", P, 300.0) == 300.0
    neg = _key_error(require_float, {"grace_period": -1}, "grace_period", P, prefix="server")
    assert (neg.key, neg.problem) == ("server.grace_period", "must be >= 0, got -1")
    text = _key_error(require_float, {"grace_period": "10s"}, "grace_period", P)
    assert "a number of seconds" in text.problem
    assert "'10s'" in text.problem
    inf = _key_error(require_float, {"t": float("inf")}, "t", P)
    assert "finite" in inf.problem


def test_bool_must_be_a_real_boolean() -> None:
    assert optional_bool({"pin_guard": False}, "pin_guard", P, True) is False
    assert optional_bool({}, "pin_guard", P, True) is True
    err = _key_error(optional_bool, {"enabled": "yes please"}, "enabled", P)
    assert "true or false" in err.problem


def test_string_list_names_the_bad_element() -> None:
    assert require_str_list({"allow": ["a", "b"]}, "allow", P) == ["a", "b"]
    assert optional_str_list({}, "allow", P) == []
    err = _key_error(require_str_list, {"allow": ["a", 7]}, "allow", P, prefix="tokens.0")
    assert err.key == "tokens.0.allow[1]"
    single = _key_error(require_str_list, {"allow": "a"}, "allow", P)
    assert "a list of strings" in single.problem


def test_mapping_fields() -> None:
    assert require_mapping({"tls": {"ca": "x"}}, "tls", P) == {"ca": "x"}
    assert optional_mapping({}, "tls", P) == {}
    err = _key_error(require_mapping, {"tls": ["ca"]}, "tls", P)
    assert "a mapping of settings" in err.problem


def test_fields_namespace_exposes_the_same_helpers() -> None:
    assert Fields.require_str({"a": "b"}, "a", P) == "b"
    assert Fields.optional_float({}, "x", P, 1.5) == 1.5
    assert Fields.require_int is cfg.require_int


# --- reject_unknown ---------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_allowed_one() -> None:
    err = _key_error(reject_unknown, {"ca": 1, "crt": 2}, {"ca", "cert", "key", "crl"}, P, "tls")
    assert err.key == "tls.crt"
    assert "did you mean 'cert'?" in err.problem


def test_unknown_key_without_a_close_match_lists_the_allowed_keys() -> None:
    err = _key_error(reject_unknown, {"zzzzzz": 1}, ["listen", "tls"], P)
    assert err.key == "zzzzzz"
    assert err.problem == "unknown key; allowed keys: listen, tls"


def test_known_keys_pass() -> None:
    reject_unknown({"listen": 1}, ["listen", "tls"], P)


# --- paths and addresses ----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder() -> None:
    config_path = Path("/etc/bridge/server.yaml")
    assert resolve_path("certs/ca.pem", config_path) == Path("/etc/bridge/certs/ca.pem")
    assert resolve_path("/srv/ca.pem", config_path) == Path("/srv/ca.pem")
    assert resolve_path("~/ca.pem", config_path) == Path.home() / "ca.pem"
