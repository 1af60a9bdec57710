"""One address type for both daemons and the admin tools: `Address(host, port)`.

`parse_address` is the one parser of "host", "host:port", "[v6]", "[v6]:port" and a bare
IPv6 address. A connect target needs a port in 1..65535; a listen address (`listen=True`)
may say port 0, which asks the kernel for a free one. `str(Address)` puts an IPv6 host in
brackets, so the text it prints parses back to the same address. The well-known ports live
where their protocol is defined: `protocol.wire.DEFAULT_PORT` (7447) and
`protocol.vpcd.DEFAULT_PORT` (35963).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Address", "parse_address"]


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(value: str, default_port: int, *, listen: bool = False) -> Address:
    """The address `value` names; a bare host gets `default_port`.

    Raises ValueError naming the offending text; callers wrap it in an error naming the
    config key or command-line option.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty address; expected host or host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise ValueError(f"bad address {text!r}: unclosed '[' around an ipv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected ':port' after ']'")
        has_port, port_text = bool(rest), rest[1:]
    elif text.count(":") > 1:  # bare IPv6, no port possible without brackets
        host, has_port, port_text = text, False, ""
    else:
        host, sep, port_text = text.partition(":")
        has_port = bool(sep)
        if not host:
            raise ValueError(f"bad address {text!r}: missing host before ':'")
    if not has_port:
        return Address(host, default_port)
    lowest = 0 if listen else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r} in {text!r}: expected {lowest}..65535")
    return Address(host, int(port_text))
