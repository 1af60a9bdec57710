"""/etc/tokenbridge/client.yaml, validated (pure: `parse_client_config(mapping, path)`).

```yaml
server: "tokenhost.example:7447"
server_name: tokenhost.example        # optional: the name in the server certificate (default: host)
tls: {ca: pki/ca.pem, cert: pki/build-vm-01.pem, key: pki/build-vm-01.key}
readers:
  - token: codesign
    vpcd: {connect: "127.0.0.1:35963"}  # vpcd slot n listens on 35963+n
reader: vpcd                          # or usbip: an emulated USB CCID reader per token (docs/windows.md)
usbip: {listen: "127.0.0.1:3240"}     # reader: usbip only; loopback only
lease: {queue_timeout_s: 900}
reconnect: {initial_s: 0.5, max_s: 30}
status: {socket: /run/tokenbridge/client.sock}
```
Relative paths resolve against the config file's folder. Durations are seconds.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import vpcd as vpcd_protocol
from protocol import wire
from protocol.errors import ConfigError
from protocol.runtime.address import Address, parse_address
from protocol.runtime.config import (
    load_yaml,
    optional_float,
    optional_mapping,
    optional_str,
    reject_unknown,
    require_mapping,
    require_str,
    resolve_path,
)

DEFAULT_PORT = wire.DEFAULT_PORT
VPCD_BASE_PORT = vpcd_protocol.DEFAULT_PORT  # reader slot n connects to VPCD_BASE_PORT + n
USBIP_DEFAULT_PORT = 3240  # IANA "usbip"; bridge_client.usbip.wire.DEFAULT_PORT
USBIP_DEFAULT_LISTEN = Address("127.0.0.1", USBIP_DEFAULT_PORT)
READER_BACKENDS = ("vpcd", "usbip")
DEFAULT_CONFIG = Path("/etc/tokenbridge/client.yaml")
DEFAULT_STATUS_SOCKET = Path("/run/tokenbridge/client.sock")
DEFAULT_METRICS_PORT = 9448  # the server's is 9447: both can run on one machine


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class ReaderConfig:
    token: str
    vpcd_host: str
    vpcd_port: int

    @property
    def vpcd_address(self) -> Address:
        return Address(self.vpcd_host, self.vpcd_port)


@dataclass(frozen=True)
class ClientConfig:
    path: Path
    server_host: str
    server_port: int
    server_name: str
    tls: TlsFiles
    readers: tuple[ReaderConfig, ...]
    queue_timeout_s: float = 900.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    status_socket: Path | None = None
    metrics_listen: Address | None = None  # opt-in Prometheus endpoint (bridge_client/metrics.py)
    reader: str = "vpcd"  # READER_BACKENDS
    usbip_listen: Address = USBIP_DEFAULT_LISTEN

    @property
    def server_address(self) -> Address:
        return Address(self.server_host, self.server_port)


def load_client_config(path: Path) -> ClientConfig:
    return parse_client_config(load_yaml(path), path)


def load_tls_files(path: Path) -> TlsFiles:
    """Only the `tls` section of the file at `path`: what SIGHUP applies (docs/client.md)."""
    return parse_tls_files(load_yaml(path), path)


def parse_tls_files(raw: dict[str, Any], path: Path) -> TlsFiles:
    tls_raw = require_mapping(raw, "tls", path)
    reject_unknown(tls_raw, ["ca", "cert", "key"], path, "tls")
    return TlsFiles(
        *(resolve_path(require_str(tls_raw, k, path, prefix="tls"), path) for k in ("ca", "cert", "key"))
    )


def parse_client_config(raw: dict[str, Any], path: Path) -> ClientConfig:
    reject_unknown(
        raw,
        [
            "server",
            "server_name",
            "tls",
            "readers",
            "reader",
            "usbip",
            "lease",
            "reconnect",
            "status",
            "metrics",
        ],
        path,
    )
    backend, usbip_listen = _parse_backend(raw, path)
    server = require_str(raw, "server", path)
    try:
        server_address = parse_address(server, DEFAULT_PORT)
    except ValueError as exc:
        raise ConfigError(str(path), "server", str(exc)) from None
    tls = parse_tls_files(raw, path)
    lease = optional_mapping(raw, "lease", path) or {}
    reject_unknown(lease, ["queue_timeout_s"], path, "lease")
    reconnect = optional_mapping(raw, "reconnect", path) or {}
    reject_unknown(reconnect, ["initial_s", "max_s", "connect_timeout_s"], path, "reconnect")
    status = optional_mapping(raw, "status", path) or {}
    reject_unknown(status, ["socket"], path, "status")
    status_socket = optional_str(status, "socket", path, prefix="status")
    initial = optional_float(reconnect, "initial_s", path, 0.5, prefix="reconnect", minimum=0.01)
    maximum = optional_float(reconnect, "max_s", path, 30.0, prefix="reconnect", minimum=0.01)
    assert initial is not None
    assert maximum is not None
    if maximum < initial:
        raise ConfigError(str(path), "reconnect.max_s", f"must be at least reconnect.initial_s ({initial})")
    return ClientConfig(
        path=path,
        server_host=server_address.host,
        server_port=server_address.port,
        server_name=optional_str(raw, "server_name", path) or server_address.host,
        tls=tls,
        readers=_parse_readers(raw, path, backend),
        queue_timeout_s=_queue_timeout(lease, path),
        reconnect_initial_s=initial,
        reconnect_max_s=maximum,
        connect_timeout_s=optional_float(
            reconnect, "connect_timeout_s", path, 10.0, prefix="reconnect", minimum=0.1
        )
        or 10.0,
        status_socket=resolve_path(status_socket, path) if status_socket else None,
        metrics_listen=_metrics_listen(raw, path),
        reader=backend,
        usbip_listen=usbip_listen,
    )


def _metrics_listen(raw: dict[str, Any], path: Path) -> Address | None:
    """`metrics: {listen: HOST:PORT}` (a bare host gets 9448, beside the server's 9447)."""
    metrics = optional_mapping(raw, "metrics", path) or {}
    reject_unknown(metrics, ["listen"], path, "metrics")
    listen = optional_str(metrics, "listen", path, prefix="metrics")
    if listen is None:
        return None
    try:
        return parse_address(listen, DEFAULT_METRICS_PORT, listen=True)
    except ValueError as exc:
        raise ConfigError(str(path), "metrics.listen", str(exc)) from None


def _parse_backend(raw: dict[str, Any], path: Path) -> tuple[str, Address]:
    """`reader: vpcd | usbip` and, for usbip, `usbip: {listen: HOST:PORT}` (loopback only)."""
    backend = optional_str(raw, "reader", path) or "vpcd"
    if backend not in READER_BACKENDS:
        raise ConfigError(
            str(path), "reader", f"must be one of {', '.join(READER_BACKENDS)}, not {backend!r}"
        )
    usbip = optional_mapping(raw, "usbip", path)
    if "usbip" in raw and backend != "usbip":
        raise ConfigError(
            str(path), "usbip", "only applies with `reader: usbip`; remove it or set reader: usbip"
        )
    reject_unknown(usbip, ["listen"], path, "usbip")
    text = optional_str(usbip, "listen", path, prefix="usbip") or f"127.0.0.1:{USBIP_DEFAULT_PORT}"
    try:
        listen = parse_address(text, USBIP_DEFAULT_PORT, listen=True)
    except ValueError as exc:
        raise ConfigError(str(path), "usbip.listen", str(exc)) from None
    if not _is_loopback(listen.host):
        raise ConfigError(
            str(path),
            "usbip.listen",
            f"{listen.host} is not a loopback address: USB/IP has no authentication and whoever attaches "
            "the reader sees every APDU (PINs included); use 127.0.0.1",
        )
    return backend, listen


def _queue_timeout(lease: dict[str, Any], path: Path) -> float:
    value = optional_float(lease, "queue_timeout_s", path, 900.0, prefix="lease", minimum=0.1)
    assert value is not None
    return value


def _parse_readers(raw: dict[str, Any], path: Path, backend: str = "vpcd") -> tuple[ReaderConfig, ...]:
    items = raw.get("readers")
    if not isinstance(items, list) or not items:
        raise ConfigError(
            str(path), "readers", "must be a non-empty list of {token: NAME, vpcd: {connect: HOST:PORT}}"
        )
    readers: list[ReaderConfig] = []
    for index, item in enumerate(items):
        prefix = f"readers[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(str(path), prefix, "must be a mapping with keys token and vpcd")
        if backend == "usbip" and "vpcd" in item:
            raise ConfigError(
                str(path),
                f"{prefix}.vpcd",
                "does not apply with `reader: usbip` (each token gets a USB/IP bus id)",
            )
        reject_unknown(item, ["token", "vpcd"], path, prefix)
        token = require_str(item, "token", path, prefix=prefix)
        vpcd = optional_mapping(item, "vpcd", path, prefix=prefix) or {}
        reject_unknown(vpcd, ["connect"], path, f"{prefix}.vpcd")
        text = optional_str(vpcd, "connect", path, prefix=f"{prefix}.vpcd") or str(
            Address("127.0.0.1", VPCD_BASE_PORT + index)
        )
        try:
            address = parse_address(text, VPCD_BASE_PORT + index)
        except ValueError as exc:
            raise ConfigError(str(path), f"{prefix}.vpcd.connect", str(exc)) from None
        host, port = address.host, address.port
        if not _is_loopback(host):
            raise ConfigError(
                str(path),
                f"{prefix}.vpcd.connect",
                f"{host} is not a loopback address: vpcd sees every APDU (PINs included) and must stay on "
                "this host; use 127.0.0.1",
            )
        readers.append(ReaderConfig(token=token, vpcd_host=host, vpcd_port=port))
    ports = [(r.vpcd_host, r.vpcd_port) for r in readers]
    if len(set(ports)) != len(ports):
        raise ConfigError(str(path), "readers", "two readers use the same vpcd slot; give each its own port")
    tokens = [r.token for r in readers]
    if len(set(tokens)) != len(tokens):
        # One lease per token and client: a second reader for the same token could never be
        # served while the first holds the lease, and OpenSC, which opens every reader, would
        # wait on itself.
        raise ConfigError(str(path), "readers", "two readers show the same token; list each token once")
    return tuple(readers)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
