"""`tokenbridge`: the admin command line (demo and PKI bootstrap)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bridge_admin.audit_cli import add_audit_parser, run_audit
from bridge_admin.commands import COMMANDS as ADMIN_COMMANDS
from bridge_admin.commands import add_admin_commands, run_admin_command
from bridge_admin.pki import Pki, PkiError
from bridge_admin.selftest import add_selftest_parser, run_selftest_command
from bridge_admin.server_pin_cli import add_pin_parser, run_pin_command
from protocol.errors import BridgeError
from protocol.wire import DEFAULT_PORT

DESCRIPTION = "Administer tokenbridge: try it on a simulated token, and set up the deployment's certificates."

EPILOG = """\
examples:
  tokenbridge demo                                        sign a script through the whole chain
  tokenbridge pki init --dir /etc/tokenbridge/pki          create the deployment CA and an empty CRL
  tokenbridge pki issue-server tokenhost.example 10.0.0.5  server certificate with those SANs
  tokenbridge pki issue-client build-vm-01 --server tokenhost.example:7447
                                                          key, certificate, CA and client.yaml for a build VM
  tokenbridge pki revoke build-vm-01                       revoke it (the server reloads the CRL)
  tokenbridge pki list --json
  tokenbridge status [--json] [--watch 2]                  tokens, holders, queues, clients (control socket)
  tokenbridge status --server tokenhost:7447 --bundle pki/clients/ops-admin   the same, remotely
  tokenbridge lease revoke codesign                        take the token from its holder
  tokenbridge pin-guard reset codesign                     clear the PIN guard (prints what to check first)
  tokenbridge pin set codesign                             store the token's PIN on the server (no echo)
  tokenbridge pin test codesign                            check the stored PIN against the card
  tokenbridge audit verify /var/lib/tokenbridge/audit.jsonl   check the audit log's hash chain
  tokenbridge doctor --config /etc/tokenbridge/client.yaml
                                                          preflight check on a build VM
  tokenbridge selftest --json > selftest.json             check the token on the token host (server
                                                          stopped); attach the file to a bug report
"""

DEFAULT_PKI = Path("/etc/tokenbridge/pki")


def _dir_option(parser: argparse.ArgumentParser, default: object) -> None:
    """`--dir` on `pki` and on each pki subcommand; SUPPRESS keeps the other level's value."""
    parser.add_argument("--dir", type=Path, default=default, help=f"PKI folder (default: {DEFAULT_PKI})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run server, client and a real signature on a simulated token")
    demo.add_argument(
        "--profile",
        default="safenet-5110",
        help="simulated token: safenet-5110, yubikey5, etoken-fusion, epass2003 (default: %(default)s)",
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep the demo folder (certificates, logs, signed file)"
    )
    demo.add_argument("--json", action="store_true", help="print the step timings as JSON at the end")

    svc = sub.add_parser("install-service", help="install systemd units, udev/polkit rules, example config")
    svc.add_argument("role", choices=["server", "client"], help="server: token host; client: build VM")
    svc.add_argument("--prefix", type=Path, default=Path("/"), help="install under this root (default: /)")
    svc.add_argument("--dry-run", action="store_true", help="only print what would be written")
    svc.add_argument("--config", type=Path, help="server config whose VID:PIDs go into the udev rule")

    pki = sub.add_parser("pki", help="deployment CA, server and client certificates, revocation")
    _dir_option(pki, DEFAULT_PKI)
    psub = pki.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")
    p_init = psub.add_parser("init", help="create the CA and an empty CRL")
    p_init.add_argument("--name", default="tokenbridge deployment CA", help="CA common name")
    p_init.add_argument(
        "--force", action="store_true", help="replace an existing CA (invalidates every certificate)"
    )
    p_srv = psub.add_parser("issue-server", help="issue the server certificate")
    p_srv.add_argument("names", nargs="+", metavar="HOST", help="DNS names and IP addresses clients use")
    p_srv.add_argument("--days", type=int, default=397)
    p_cli = psub.add_parser("issue-client", help="issue a client bundle (key, cert, CA, client.yaml)")
    p_cli.add_argument("name", help="the client's identity (certificate CN), e.g. build-vm-01")
    p_cli.add_argument("--admin", action="store_true", help="mark it as an admin identity")
    p_cli.add_argument(
        "--server", default=f"tokenhost.example:{DEFAULT_PORT}", help="server address for client.yaml"
    )
    p_cli.add_argument(
        "--token", action="append", dest="tokens", help="token name(s) for client.yaml readers"
    )
    p_cli.add_argument("--days", type=int, default=397)
    p_cli.add_argument("--out", type=Path, help="bundle folder (default: DIR/clients/NAME)")
    p_rev = psub.add_parser("revoke", help="revoke every certificate of NAME and rewrite the CRL")
    p_rev.add_argument("name")
    p_list = psub.add_parser("list", help="issued certificates and their state")
    p_list.add_argument("--json", action="store_true")
    psub.add_parser("crl", help="re-sign the CRL (run before it goes stale; the server refuses a stale CRL)")
    for each in psub.choices.values():  # `pki --dir X init` and `pki init --dir X` alike
        _dir_option(each, argparse.SUPPRESS)
    add_admin_commands(sub)
    add_audit_parser(sub)
    add_selftest_parser(sub)
    add_pin_parser(sub)  # issue 16: pin set|test
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from bridge_admin.demo import run_demo

            return run_demo(profile=args.profile, keep=args.keep, as_json=args.json)
        if args.command == "install-service":
            from bridge_admin.install import install

            return install(args.role, prefix=args.prefix, dry_run=args.dry_run, config_path=args.config)
        if args.command == "pki":
            return _pki(args)
        if args.command in ADMIN_COMMANDS:
            return run_admin_command(args)
        if args.command == "audit":
            return run_audit(args)
        if args.command == "selftest":
            return run_selftest_command(args)
        if args.command == "pin":
            return run_pin_command(args)
    except BridgeError as exc:
        print(f"tokenbridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _pki(args: argparse.Namespace) -> int:
    pki = Pki(args.dir)
    cmd = args.pki_command
    if cmd == "init":
        path = pki.init(name=args.name, force=args.force)
        print(f"CA written to {path} (key {args.dir / 'ca.key'}, mode 0600); CRL at {pki.crl_path}")
        print("next: tokenbridge pki issue-server HOST... ; tokenbridge pki issue-client NAME")
    elif cmd == "issue-server":
        issued = pki.issue_server(args.names, days=args.days)
        print(f"server certificate {issued.cert} and key {issued.key} (SANs: {', '.join(args.names)})")
    elif cmd == "issue-client":
        issued = pki.issue_client(
            args.name, admin=args.admin, days=args.days, out=args.out, server=args.server, tokens=args.tokens
        )
        folder = issued.cert.parent
        print(
            f"client bundle for {args.name} in {folder}: {issued.cert.name}, {issued.key.name}, ca.pem, "
            "client.yaml"
        )
        print(f"copy it to the build VM's /etc/tokenbridge/ and add '{args.name}' to the token's allow list")
    elif cmd == "revoke":
        serials = pki.revoke(args.name)
        print(f"revoked {args.name} (serials {', '.join(serials)}); CRL rewritten: {pki.crl_path}")
        print("copy the CRL to the server if it is elsewhere; the server reloads it and drops the client")
    elif cmd == "list":
        rows = pki.listing()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'NAME':<24} {'KIND':<7} {'SERIAL':<42} {'EXPIRES':<26} STATE")
            for r in rows:
                state = "revoked" if r["revoked"] else "valid"
                print(f"{r['name']:<24} {r['kind']:<7} {r['serial']:<42} {r['not_after']:<26} {state}")
    elif cmd == "crl":
        print(f"CRL re-signed: {pki.write_crl()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except PkiError as exc:
        print(f"tokenbridge: {exc}", file=sys.stderr)
        sys.exit(2)
