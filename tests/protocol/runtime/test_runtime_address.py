"""One address type: brackets for IPv6 in its text, port 1..65535 to connect, 0 allowed to listen."""

from __future__ import annotations

from dataclasses import astuple

import pytest

from protocol.runtime.address import Address, parse_address


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (Address("tokenhost.example", 7447), "tokenhost.example:7447"),
        (Address("127.0.0.1", 35963), "127.0.0.1:35963"),
        (Address("::1", 7447), "[::1]:7447"),
        (Address("fe80::1%eth0", 9), "[fe80::1%eth0]:9"),
    ],
)
def test_the_text_of_an_address_brackets_ipv6_and_parses_back(address: Address, text: str) -> None:
    assert str(address) == text
    assert parse_address(text, 1) == address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tokenhost", Address("tokenhost", 7447)),
        ("tokenhost:9000", Address("tokenhost", 9000)),
        ("::1", Address("::1", 7447)),
        ("[::1]", Address("::1", 7447)),
        ("[::1]:9000", Address("::1", 9000)),
        ("  tokenhost:1  ", Address("tokenhost", 1)),
    ],
)
def test_a_bare_host_gets_the_default_port(text: str, expected: Address) -> None:
    assert parse_address(text, 7447) == expected


@pytest.mark.parametrize("text", ["host:0", "[::1]:0"])
def test_port_zero_is_only_a_listen_address(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected 1\.\.65535"):
        parse_address(text, 7447)
    assert parse_address(text, 7447, listen=True).port == 0


@pytest.mark.parametrize(
    "text", ["host:", "host:65536", "host:-1", "host:http", ":7000", "[::1", "[::1]x", "[]:1"]
)
def test_bad_addresses_are_refused_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text, 7447, listen=True)
    assert repr(text.strip()) in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bridge.example:7443", ("bridge.example", 7443)),
        ("bridge.example", ("bridge.example", 7000)),
        ("10.0.0.7:1", ("10.0.0.7", 1)),
        ("[::1]:7443", ("::1", 7443)),
        ("[fe80::1]", ("fe80::1", 7000)),
        ("::1", ("::1", 7000)),
    ],
)
def test_parse_address_accepts_host_port_forms(text: str, expected: tuple[str, int]) -> None:
    assert astuple(parse_address(text, 7000)) == expected


BAD_ADDRESSES = ["host:", "host:0", "host:65536", "host:http", ":7000", "[::1", "[::1]x"]


@pytest.mark.parametrize("text", BAD_ADDRESSES)
def test_parse_address_rejects_bad_addresses_naming_them(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text, 7000)
    assert repr(text) in str(info.value)


def test_parse_address_rejects_empty_text() -> None:
    with pytest.raises(ValueError, match="empty address"):
        parse_address("  ", 7000)
