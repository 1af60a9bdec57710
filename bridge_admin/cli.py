"""`tokenbridge`: the admin command line (demo and PKI bootstrap)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bridge_admin.audit_cli import add_audit_parser, run_audit
from bridge_admin.commands import COMMANDS as ADMIN_COMMANDS
from bridge_admin.commands import add_admin_commands, run_admin_command
from bridge_admin.pki import PkiError
from bridge_admin.pki_cli import add_pki_parser, run_pki
from bridge_admin.selftest import add_selftest_parser, run_selftest_command
from bridge_admin.server_pin_cli import add_pin_parser, run_pin_command
from protocol.errors import BridgeError
from protocol.runtime.cli import add_version_option

DESCRIPTION = "Administer tokenbridge: try it on a simulated token, and set up the deployment's certificates."

EPILOG = """\
examples:
  tokenbridge demo                                        sign a script through the whole chain
  tokenbridge pki init --dir /etc/tokenbridge/pki          create the deployment CA and an empty CRL
  tokenbridge pki issue-server tokenhost.example 10.0.0.5  server certificate with those SANs
  tokenbridge pki issue-client build-vm-01 --server tokenhost.example:7447
                                                          key, certificate, CA and client.yaml for a build VM
  tokenbridge pki sign-csr vm.csr --kind client --out vm.pem   certify a key made on the VM itself
  tokenbridge pki renew tokenhost.example                 new certificate, same key (reload is enough)
  tokenbridge pki revoke build-vm-01                      revoke its one valid certificate (else --serial)
  tokenbridge pki revoke --serial 1f2e3d                  revoke exactly that certificate
  tokenbridge pki crl --days 30                           re-sign the CRL (tokenbridge-crl.timer does)
  tokenbridge pki list --json
  tokenbridge install-service server --dry-run            units, rules and example config (--json)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)  # observe: --version (protocol/runtime/cli.py)
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
    svc.add_argument(
        "role",
        choices=["server", "client", "crl"],
        help="server: token host; client: build VM; crl: the weekly CRL timer, where the CA key is",
    )
    svc.add_argument("--prefix", type=Path, default=Path("/"), help="install under this root (default: /)")
    svc.add_argument("--dry-run", action="store_true", help="only print what would be written")
    svc.add_argument(
        "--config",
        type=Path,
        help="config whose VID:PIDs (server) and credentials go into the unit and rules",
    )
    svc.add_argument("--json", action="store_true", help="print what was written and the next steps as JSON")

    add_pki_parser(sub)
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

            return install(
                args.role,
                prefix=args.prefix,
                dry_run=args.dry_run,
                config_path=args.config,
                as_json=args.json,
            )
        if args.command == "pki":
            return run_pki(args)
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


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except PkiError as exc:
        print(f"tokenbridge: {exc}", file=sys.stderr)
        sys.exit(2)
