"""`tokenbridge doctor`: can this build VM sign? A preflight a pipeline can run.

Each check returns a `Check(name, status, detail, fix)`; status is "ok", "warn" or "fail".
The exit code is 1 when any check failed (warnings do not fail). Checks that need an earlier
one (the server check needs the client config) are skipped when it failed.

Checks: client config; pcscd running and reachable (its socket); vpcd installed and
configured, and whether it listens on every interface without the loopback drop-in (warn);
the certificates (readable, signed by the CA, not expired, not expiring within 30 days);
the server (TLS handshake, Welcome or Refused); every configured token (present, allowed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import trio
from cryptography import x509

from bridge_client.status import fetch_status
from protocol import wire
from protocol.errors import TlsSetupError
from protocol.runtime.connect import ConnectFailed, connect, describe_connect_error
from protocol.runtime.framed import FramedConnection
from protocol.runtime.tls import client_context

PCSCD_SOCKET: Final = Path("/run/pcscd/pcscd.comm")
VPCD_CONF_DIR: Final = Path("/etc/reader.conf.d")
VPCD_DRIVER_GLOB: Final = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so*"
LOOPBACK_DROPIN: Final = Path("/etc/systemd/system/pcscd.service.d/tokenbridge-loopback.conf")
EXPIRY_WARNING_DAYS: Final = 30
SERVER_TIMEOUT_S: Final = 10.0
SOFTWARE: Final = "tokenbridge-doctor"
STATUS_WAIT_S: Final = 2.0
_ANY_ADDRESS: Final = ("0.0.0.0", "*", "[::]", "::")  # noqa: S104 - detecting, not binding


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skipped
    detail: str
    fix: str = ""


def check_pcscd(sock_path: Path) -> Check:
    if not sock_path.exists():
        return Check(
            "pcscd",
            "fail",
            f"no pcscd socket at {sock_path}",
            "start it: systemctl enable --now pcscd.socket pcscd (package pcscd)",
        )
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(sock_path))
    except OSError as exc:
        return Check(
            "pcscd",
            "fail",
            f"pcscd socket {sock_path} refuses connections: {exc.strerror or exc}",
            "restart it: systemctl restart pcscd",
        )
    finally:
        s.close()
    return Check("pcscd", "ok", f"running, socket {sock_path} reachable")


def _listening_off_host(ports: set[int]) -> list[str]:
    try:
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    bad = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        host, _, port = fields[3].rpartition(":")
        if port.isdigit() and int(port) in ports and host in _ANY_ADDRESS:
            bad.append(fields[3])
    return bad


def check_vpcd(ports: set[int], *, conf_dir: Path = VPCD_CONF_DIR, dropin: Path = LOOPBACK_DROPIN) -> Check:
    import glob

    if not glob.glob(VPCD_DRIVER_GLOB):
        return Check(
            "vpcd",
            "fail",
            "the vpcd driver (libifdvpcd.so) is not installed",
            "apt-get install vsmartcard-vpcd, then systemctl restart pcscd",
        )
    if not any(p.is_file() and "vpcd" in p.read_text(errors="replace") for p in conf_dir.glob("*")):
        return Check(
            "vpcd",
            "fail",
            f"no vpcd reader configured in {conf_dir}",
            "reinstall vsmartcard-vpcd (it ships /etc/reader.conf.d/vpcd)",
        )
    off_host = _listening_off_host(ports)
    if off_host and not dropin.exists():
        return Check(
            "vpcd",
            "warn",
            f"vpcd listens on every interface ({', '.join(off_host)}): anyone who can reach this VM "
            "could present a card to pcscd",
            f"install systemd/pcscd-loopback.conf as {dropin}, then "
            "systemctl daemon-reload && systemctl restart pcscd",
        )
    where = "loopback-confined by the drop-in" if off_host else "not listening off-host"
    return Check("vpcd", "ok", f"installed and configured ({where})")


def check_certificates(cert: Path, key: Path | None, ca: Path, now: dt.datetime) -> Check:
    """`key` None: the key is the service's (a credential this user cannot read); not checked."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        authority = x509.load_pem_x509_certificate(ca.read_bytes())
        if key is not None and not key.is_file():
            raise FileNotFoundError(key)
    except (OSError, ValueError) as exc:
        return Check(
            "certificates",
            "fail",
            f"cannot read the client certificate, key or CA: {exc}",
            "copy the bundle from `tokenbridge pki issue-client NAME` and fix tls: in client.yaml",
        )
    try:
        leaf.verify_directly_issued_by(authority)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        return Check(
            "certificates",
            "fail",
            f"{cert.name} is not signed by the CA in {ca} ({type(exc).__name__})",
            "use the ca.pem from the same PKI as the certificate (tokenbridge pki issue-client)",
        )
    days = (leaf.not_valid_after_utc - now).total_seconds() / 86400
    if leaf.not_valid_before_utc > now:
        return Check(
            "certificates",
            "fail",
            f"{cert.name} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}",
            "check this machine's clock (timedatectl)",
        )
    if days < 0:
        return Check(
            "certificates",
            "fail",
            f"{cert.name} expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
            "issue a new one: tokenbridge pki issue-client NAME, and copy the bundle here",
        )
    if days < EXPIRY_WARNING_DAYS:
        return Check(
            "certificates",
            "warn",
            f"{cert.name} expires in {days:.0f} day(s)",
            "renew it soon: tokenbridge pki issue-client NAME",
        )
    return Check(
        "certificates", "ok", f"{cert.name} valid until {leaf.not_valid_after_utc:%Y-%m-%d}, signed by the CA"
    )


async def probe_server(config: Any) -> tuple[Check, dict[str, Any]]:
    """TLS handshake and greeting; on Welcome, the TokenStatus messages seen within a moment."""
    where = config.server_address
    try:
        ctx = client_context(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
        with trio.fail_after(SERVER_TIMEOUT_S):
            greeted = await connect(where, ctx, server_name=config.server_name, software=SOFTWARE)
            try:
                tokens = await _token_statuses(greeted.conn, len(config.readers))
            finally:
                await greeted.aclose()
    except TlsSetupError as exc:
        return Check(
            "server", "fail", f"tls with {where} failed: {exc}", "reissue the certificate it names"
        ), {}
    except trio.TooSlowError:
        return Check(
            "server",
            "fail",
            f"{where} did not answer within {SERVER_TIMEOUT_S:.0f} s",
            "check the address in client.yaml and the firewall between this VM and the server",
        ), {}
    except ConnectFailed as exc:
        return Check("server", "fail", str(exc), _SERVER_FIXES[exc.stage]), {}
    except (trio.BrokenResourceError, OSError) as exc:
        return Check("server", "fail", describe_connect_error(exc, where)), {}
    except Exception as exc:  # a garbled answer: say what it was rather than crash the preflight
        return Check("server", "fail", f"{where}: {exc}"), {}
    welcome = greeted.welcome
    return Check("server", "ok", f"{where} accepted identity {welcome.identity!r} ({welcome.server})"), tokens


_SERVER_FIXES: Final = {
    "network": "is tokenbridge-server running there, and the address in client.yaml right?",
    "tls": "the server must trust this certificate's CA and this VM the server's (same PKI); "
    "a revoked or expired certificate needs a new bundle",
    "closed": "the server must trust this certificate's CA; a revoked or expired certificate "
    "needs a new bundle",
    "greeting": "is that address a tokenbridge-server of this version?",
    "refused": "ask an operator to add this certificate's name to the token's allow list",
}


async def _token_statuses(conn: FramedConnection, wanted: int) -> dict[str, Any]:
    """The TokenStatus messages that arrive within STATUS_WAIT_S, by token name."""
    tokens: dict[str, Any] = {}
    with trio.move_on_after(STATUS_WAIT_S):
        while len(tokens) < wanted:
            msg = await conn.receive()
            if isinstance(msg, wire.TokenStatus):
                tokens[msg.name] = msg
            elif isinstance(msg, wire.Refused | wire.Goodbye | wire.ConnectionClosed):
                break
    return tokens


def check_tokens(readers: Any, seen: dict[str, Any]) -> list[Check]:
    out = []
    for reader in readers:
        st = seen.get(reader.token)
        name = f"token {reader.token}"
        if st is None:
            out.append(
                Check(
                    name,
                    "fail",
                    f"the server shows no token {reader.token!r} to this identity",
                    "check the token name in client.yaml and this identity on the token's allow list",
                )
            )
        elif not st.allowed:
            out.append(
                Check(
                    name,
                    "fail",
                    f"this identity may not use {reader.token!r}",
                    "ask an operator to add it to the token's allow list",
                )
            )
        elif not st.present:
            out.append(
                Check(
                    name,
                    "fail",
                    f"{reader.token!r} is not plugged in on the server (state {st.state})",
                    "plug the token in on the server host (tokenbridge status shows it)",
                )
            )
        else:
            out.append(Check(name, "ok", f"present ({st.state}), this identity is allowed"))
    return out


def run_checks(config_path: Path, *, pcscd_socket: Path | None = None) -> list[Check]:
    from bridge_client.config import load_client_config

    sock = pcscd_socket or Path(os.environ.get("TOKENBRIDGE_PCSCD_SOCKET", str(PCSCD_SOCKET)))
    checks = [check_pcscd(sock)]
    try:
        config = load_client_config(config_path)
    except Exception as exc:
        checks.append(Check("config", "fail", str(exc), "fix the file, or pass --config PATH"))
        return checks
    checks.append(Check("config", "ok", f"{config_path}: server {config.server_address}"))
    checks.append(check_vpcd({r.vpcd_port for r in config.readers}))
    tls = config.tls
    if config.status_socket is not None and not os.access(tls.key, os.R_OK):
        # Issue 19 #7: a CI runner cannot read the service's key (a systemd credential, root
        # only), so it asks the running tokenbridge-client what the server said instead.
        checks.append(check_certificates(tls.cert, None, tls.ca, dt.datetime.now(dt.UTC)))
        return [*checks, *checks_via_service(config.status_socket, config.readers)]
    checks.append(check_certificates(tls.cert, tls.key, tls.ca, dt.datetime.now(dt.UTC)))
    server, seen = trio.run(probe_server, config)
    checks.append(server)
    if server.status == "ok":
        checks += check_tokens(config.readers, seen)
    return checks


def checks_via_service(socket_path: Path, readers: Any) -> list[Check]:
    """The server and token checks as the running client sees them (its status socket)."""
    try:
        data = trio.run(fetch_status, socket_path)
    except (OSError, trio.TooSlowError) as exc:
        return [
            Check(
                "server", "fail",
                f"this user can read neither the client key nor the client's status socket "
                f"{socket_path} ({exc})",
                "run doctor as root, or add this user to the tokenbridge group (usermod -aG "
                "tokenbridge USER; docs/client.md §4), and check that tokenbridge-client runs",
            )
        ]  # fmt: skip
    tunnel = data["tunnel"]
    where = f"via the running tokenbridge-client ({socket_path})"
    if tunnel["state"] != "connected":
        return [
            Check("server", "fail", f"{where}: tunnel {tunnel['state']}: {tunnel['reason']}", _TUNNEL_FIX)
        ]
    out = [Check("server", "ok", f"{where}: connected to {tunnel['server']} as {tunnel['identity']!r}")]
    by_token = {r["token"]: r for r in data["readers"]}
    for reader in readers:
        r = by_token.get(reader.token)
        name = f"token {reader.token}"
        if r is None or not r["allowed"]:
            out.append(Check(name, "fail", f"this identity may not use {reader.token!r}", _ALLOW_FIX))
        elif not r["token_present"]:
            out.append(Check(name, "fail", f"{reader.token!r} is not plugged in on the server", _PLUG_FIX))
        else:
            out.append(Check(name, "ok", f"present ({r['server_state']}), card {r['card']}"))
    return out


_TUNNEL_FIX: Final = (
    "tokenbridge-client status and journalctl -u tokenbridge-client say why (docs/client.md §5)"
)
_ALLOW_FIX: Final = "ask an operator to add it to the token's allow list"
_PLUG_FIX: Final = "plug the token in on the server host (tokenbridge status shows it)"


def run_doctor(config_path: Path, *, as_json: bool = False, pcscd_socket: Path | None = None) -> int:
    checks = run_checks(config_path, pcscd_socket=pcscd_socket)
    ok = all(c.status != "fail" for c in checks)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"[{c.status.upper():^5}] {c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                print(f"        fix: {c.fix}")
        print("ready to sign" if ok else "NOT ready to sign: fix the failures above")
    return 0 if ok else 1
