"""`--server HOST:PORT` of the admin commands: a connect target, parsed by the one address parser."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bridge_admin.client import AdminClientError, Target, add_target_options, resolve_target
from protocol.runtime.address import Address


def _target(*argv: str) -> Target:
    parser = argparse.ArgumentParser()
    add_target_options(parser)
    return resolve_target(parser.parse_args([*argv, "--cert", "a.pem", "--key", "a.key", "--ca", "ca.pem"]))


def test_port_zero_is_refused_for_a_server_to_connect_to() -> None:
    with pytest.raises(
        AdminClientError, match=r"--server: bad port '0' in 'tokenhost:0': expected 1\.\.65535"
    ):
        _target("--server", "tokenhost:0")


def test_an_ipv6_server_keeps_its_brackets_in_messages() -> None:
    target = _target("--server", "[::1]:9000")
    assert target.address == Address("::1", 9000)
    assert target.server_name == "::1"
    assert target.describe() == "server [::1]:9000"
    assert target.cert == Path("a.pem")


def test_a_bare_host_gets_the_default_server_port() -> None:
    assert _target("--server", "tokenhost").address == Address("tokenhost", 7447)
