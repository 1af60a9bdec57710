"""How every admin command finds and asks its server.

Resolution order (the same for `status`, `lease revoke`, `token reset`, `pin-guard reset`):
1. `--server HOST:PORT` with `--cert/--key/--ca` or `--bundle DIR` (from `pki issue-client
   --admin`): mutual TLS, the wire's AdminRequest/AdminResponse; the identity must be on the
   server's `admins` list;
2. `--socket PATH`: that control socket;
3. the `control.socket` of `--config FILE` (default /etc/tokenbridge/server.yaml).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from protocol.errors import BridgeError
from protocol.runtime.address import Address, parse_address
from protocol.runtime.connect import ConnectFailed, connect
from protocol.runtime.tls import client_context
from protocol.wire import DEFAULT_PORT

DEFAULT_SERVER_CONFIG: Final = Path("/etc/tokenbridge/server.yaml")
REQUEST_TIMEOUT_S: Final = 15.0
CONNECT_TIMEOUT_S: Final = 15.0  # TCP, TLS and the server's Welcome
MAX_RESPONSE: Final = 16 * 1024 * 1024
SOFTWARE: Final = "tokenbridge-admin/0.1.0"
_ids = itertools.count(1)


class AdminClientError(BridgeError):
    """The server could not be reached, or refused the request."""


@dataclass(frozen=True)
class Target:
    socket: Path | None = None
    address: Address | None = None
    server_name: str | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def describe(self) -> str:
        return f"control socket {self.socket}" if self.socket else f"server {self.address}"


def add_target_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("which server")
    g.add_argument(
        "--config", type=Path, help=f"server config naming control.socket (default {DEFAULT_SERVER_CONFIG})"
    )
    g.add_argument("--socket", type=Path, help="control socket path")
    g.add_argument("--server", metavar="HOST:PORT", help="a remote server, over mutual TLS (admin identity)")
    g.add_argument("--server-name", help="TLS name to check on the server certificate (default: HOST)")
    g.add_argument("--bundle", type=Path, help="admin bundle folder from `pki issue-client --admin`")
    g.add_argument("--cert", type=Path, help="admin client certificate (with --server)")
    g.add_argument("--key", type=Path, help="admin client key (with --server)")
    g.add_argument("--ca", type=Path, help="the deployment CA (with --server)")


def _bundle_files(folder: Path) -> tuple[Path, Path, Path]:
    keys = sorted(folder.glob("*.key"))
    if len(keys) != 1:
        raise AdminClientError(f"bundle {folder} must hold exactly one NAME.key (found {len(keys)})")
    cert, ca = keys[0].with_suffix(".pem"), folder / "ca.pem"
    for p in (cert, ca):
        if not p.is_file():
            raise AdminClientError(
                f"bundle {folder} has no {p.name}; re-issue it with `tokenbridge pki issue-client`"
            )
    return cert, keys[0], ca


def resolve_target(args: argparse.Namespace) -> Target:
    """Pick the server from the parsed options (see the module docstring)."""
    if args.server:
        try:
            address = parse_address(args.server, DEFAULT_PORT)
        except ValueError as exc:
            raise AdminClientError(f"--server: {exc}") from None
        if args.bundle is not None:
            cert, key, ca = _bundle_files(args.bundle)
        else:
            cert, key, ca = args.cert, args.key, args.ca
        if cert is None or key is None or ca is None:
            raise AdminClientError("--server needs --bundle DIR or all of --cert, --key and --ca")
        return Target(
            address=address, server_name=args.server_name or address.host, cert=cert, key=key, ca=ca
        )
    if args.socket is not None:
        return Target(socket=args.socket)
    from bridge_server.config import load_server_config

    config = load_server_config(args.config or DEFAULT_SERVER_CONFIG)
    if config.control.socket is None:
        raise AdminClientError(
            f"{config.path} has no control.socket; add `control: {{socket: /run/tokenbridge/control.sock}}` "
            "or use --socket/--server"
        )
    return Target(socket=config.control.socket)


class AdminSession:
    """One open connection to a server, for one or more requests (`--watch` reuses it)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._stream: trio.abc.Stream | None = None
        self._framed: Any = None
        self._buf = b""

    async def __aenter__(self) -> AdminSession:
        t = self.target
        try:
            if t.socket is not None:
                with trio.fail_after(CONNECT_TIMEOUT_S):  # blocks while the accept backlog is full
                    self._stream = await trio.open_unix_socket(str(t.socket))
            else:
                await self._open_tls()
        except trio.TooSlowError as exc:
            raise AdminClientError(
                f"{t.describe()} did not accept the connection within {CONNECT_TIMEOUT_S:g} s; "
                "is tokenbridge-server stuck?"
            ) from exc
        except OSError as exc:
            raise AdminClientError(
                f"cannot reach {t.describe()}: {exc.strerror or exc}; is tokenbridge-server running?"
            ) from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)

    async def _open_tls(self) -> None:
        t = self.target
        assert t.address is not None
        assert t.cert is not None
        assert t.key is not None
        assert t.ca is not None
        ctx = client_context(ca=t.ca, cert=t.cert, key=t.key)
        try:
            # Every wait has a deadline (P5): a peer that accepts TCP and then says nothing
            # (a black hole, a stuck server) must not hang `tokenbridge status` forever.
            with trio.fail_after(CONNECT_TIMEOUT_S):
                greeted = await connect(
                    t.address,
                    ctx,
                    server_name=t.server_name or t.address.host,
                    software=SOFTWARE,
                    name_fix="fix --server or --server-name",
                )
        except ConnectFailed as exc:
            raise AdminClientError(str(exc)) from exc
        except trio.TooSlowError as exc:
            raise AdminClientError(
                f"{t.describe()} accepted the connection but did not complete the TLS handshake "
                f"and greeting within {CONNECT_TIMEOUT_S:g} s (a black hole, or not a tokenbridge server?)"
            ) from exc
        self._stream, self._framed = greeted.stream, greeted.conn

    async def request(self, action: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """`{"ok", "result", "error"}` for one action. Raises AdminClientError."""
        where = self.target.describe()
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                if self._framed is not None:
                    return await self._wire_request(action, args or {})
                return await self._socket_request(action, args or {})
        except trio.TooSlowError:
            raise AdminClientError(f"{where} did not answer within {REQUEST_TIMEOUT_S:.0f} s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # e.g. the server refused our certificate after the handshake (revoked) or restarted
            cause = exc.__cause__ or exc
            raise AdminClientError(
                f"lost the connection to {where}: {cause}; if the server log shows "
                "tls.handshake_failed, our certificate was refused (revoked or expired)"
            ) from exc

    async def _socket_request(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        assert self._stream is not None
        await self._stream.send_all(json.dumps({"action": action, "args": args}).encode() + b"\n")
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise AdminClientError(f"{self.target.describe()} closed the connection without answering")
            self._buf += chunk
            if len(self._buf) > MAX_RESPONSE:
                raise AdminClientError("answer too large")
        line, self._buf = self._buf.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def _wire_request(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        from protocol import wire

        request_id = next(_ids)
        await self._framed.send(wire.AdminRequest(request_id=request_id, action=action, args=args))
        while True:
            msg = await self._framed.receive()
            if isinstance(msg, wire.AdminResponse) and msg.request_id == request_id:
                return {"ok": msg.ok, "result": msg.result, "error": msg.error}
            if isinstance(msg, wire.Ping):
                await self._framed.send(wire.Pong(nonce=msg.nonce))
            elif isinstance(msg, wire.Goodbye | wire.Refused | wire.ConnectionClosed):
                raise AdminClientError(
                    f"{self.target.describe()} closed the connection: {getattr(msg, 'reason', '')}"
                )


async def call(target: Target, action: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    async with AdminSession(target) as session:
        return await session.request(action, args)


def call_sync(target: Target, action: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request from synchronous code (the CLI, tests)."""
    return trio.run(call, target, action, args)
