"""`tokenbridge pki ...`: the command line over `bridge_admin.pki` (text for people, --json for scripts).

Every subcommand takes `--dir` before or after its name and `--json`, which prints one JSON
document on stdout (what was written, serials, next steps) instead of the sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from bridge_admin.pki import CRL_DAYS, LEAF_DAYS, Pki, PkiError

DEFAULT_PKI: Final = Path("/etc/tokenbridge/pki")
CLIENT_KEY_CREDENTIAL: Final = "tokenbridge-client.key"  # the client unit's LoadCredential= name


def add_pki_parser(sub: Any) -> None:
    pki = sub.add_parser("pki", help="deployment CA, server and client certificates, revocation, CRL")
    _common(pki, top=True)
    psub = pki.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")
    p_init = psub.add_parser("init", help="create the CA and an empty CRL")
    p_init.add_argument("--name", default="tokenbridge deployment CA", help="CA common name")
    p_init.add_argument(
        "--force", action="store_true", help="replace an existing CA (invalidates every certificate)"
    )
    p_srv = psub.add_parser("issue-server", help="issue the server certificate and key")
    p_srv.add_argument("names", nargs="+", metavar="HOST", help="DNS names and IP addresses clients use")
    p_srv.add_argument("--days", type=int, default=LEAF_DAYS, help="validity (default: %(default)s)")
    p_srv.add_argument("--out", type=Path, help="folder for HOST.pem and HOST.key (default: DIR)")
    p_cli = psub.add_parser("issue-client", help="issue a client bundle (key, cert, CA, client.yaml)")
    p_cli.add_argument("name", help="the client's identity (certificate CN), e.g. build-vm-01")
    p_cli.add_argument("--admin", action="store_true", help="an admin identity (list it in admins:)")
    p_cli.add_argument(
        "--server", help="HOST[:PORT] build VMs reach the token host at (required: written to client.yaml)"
    )
    p_cli.add_argument(
        "--no-config", action="store_true", help="no client.yaml (e.g. an admin bundle for status --bundle)"
    )
    p_cli.add_argument(
        "--token", action="append", dest="tokens", help="token name(s) for client.yaml readers"
    )
    p_cli.add_argument(
        "--key-file",
        action="store_true",
        help="client.yaml reads the key from the bundle folder (default: the systemd credential "
        "tokenbridge-client.key, for the tokenbridge-client service)",
    )
    p_cli.add_argument("--days", type=int, default=LEAF_DAYS, help="validity (default: %(default)s)")
    p_cli.add_argument("--out", type=Path, help="bundle folder (default: DIR/clients/NAME)")
    p_csr = psub.add_parser("sign-csr", help="certify a key made where it is used (openssl req -new)")
    p_csr.add_argument("csr", type=Path, help="the PEM certificate signing request")
    p_csr.add_argument("--kind", choices=["server", "client", "admin"], required=True)
    p_csr.add_argument("--out", type=Path, required=True, help="where to write the certificate")
    p_csr.add_argument("--days", type=int, default=LEAF_DAYS, help="validity (default: %(default)s)")
    p_ren = psub.add_parser("renew", help="a new certificate for NAME's existing key (reload is enough)")
    p_ren.add_argument("name")
    p_ren.add_argument("--days", type=int, default=LEAF_DAYS, help="validity (default: %(default)s)")
    p_rev = psub.add_parser(
        "revoke", help="revoke a certificate (by serial, or NAME's only one) and rewrite the CRL"
    )
    p_rev.add_argument("name", nargs="?", help="the identity; refused if it has several valid certificates")
    p_rev.add_argument("--serial", help="the serial (hex, as `pki list` shows it)")
    p_rev.add_argument("--all", action="store_true", dest="every", help="every valid certificate of NAME")
    psub.add_parser("list", help="issued certificates and their state")
    p_crl = psub.add_parser(
        "crl", help="re-sign the CRL (the server refuses a stale one; run it from a timer)"
    )
    p_crl.add_argument("--days", type=int, default=CRL_DAYS, help="validity (default: %(default)s)")
    p_crl.add_argument("--out", type=Path, help="write it here (default: DIR/crl.pem)")
    for each in psub.choices.values():  # `pki --dir X init` and `pki init --dir X` alike
        _common(each, top=False)


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--dir` and `--json` on `pki` and on each subcommand; SUPPRESS keeps the other level's value."""
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_PKI if top else argparse.SUPPRESS,
        help=f"PKI folder (default: {DEFAULT_PKI})",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", default=False if top else argparse.SUPPRESS,
        help="print one JSON document instead of text",
    )  # fmt: skip


def run_pki(args: argparse.Namespace) -> int:
    """Run one pki subcommand; 0 done, 2 refused (bad input, missing CA...), message on stderr."""
    try:
        result, text = _dispatch(Pki(args.dir), args)
    except PkiError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"tokenbridge: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, **result}, indent=2))
    else:
        print("\n".join(text))
    return 0


def _dispatch(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    handler = {
        "init": _init, "issue-server": _issue_server, "issue-client": _issue_client, "sign-csr": _sign_csr,
        "renew": _renew, "revoke": _revoke, "list": _list, "crl": _crl,
    }[args.pki_command]  # fmt: skip
    return handler(pki, args)


def _init(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    path = pki.init(name=args.name, force=args.force)
    key = args.dir / "ca.key"
    return {"ca": str(path), "ca_key": str(key), "crl": str(pki.crl_path)}, [
        f"CA written to {path} (key {key}, mode 0600); CRL at {pki.crl_path}",
        "next: tokenbridge pki issue-server HOST... ; tokenbridge pki issue-client NAME --server HOST:7447",
    ]


def _issue_server(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    issued = pki.issue_server(args.names, days=args.days, out=args.out)
    return {"issued": issued.as_json()}, [
        f"server certificate {issued.cert} and key {issued.key} (SANs: {', '.join(args.names)}, serial "
        f"{issued.serial})",
        f"on the token host: install the key as /etc/credstore/tokenbridge-server.key (root, 0600; "
        f"`install -D -m 0600 {issued.key} /etc/credstore/tokenbridge-server.key`); see docs/ops.md",
    ]


def _issue_client(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    if args.server is None and not args.no_config:
        raise PkiError(
            "--server HOST[:PORT] is required: the address the build VM reaches tokenbridge-server at, "
            "written into the bundle's client.yaml (or --no-config for a bundle without one)"
        )
    issued = pki.issue_client(
        args.name, admin=args.admin, days=args.days, out=args.out, server=args.server, tokens=args.tokens,
        key_credential=None if args.key_file else CLIENT_KEY_CREDENTIAL,
    )  # fmt: skip
    folder = issued.cert.parent
    files = [issued.cert.name, f"{args.name}.key", "ca.pem", *([] if args.no_config else ["client.yaml"])]
    where = (
        f"add '{args.name}' to `admins:` in server.yaml" if args.admin
        else f"add '{args.name}' to the `allow:` list of its token(s) in server.yaml"
    )  # fmt: skip
    steps = [f"{where}, then `systemctl reload tokenbridge-server`"]
    if not args.no_config:
        steps.insert(0, f"copy {folder} to the build VM (docs/client.md §1: key to /etc/credstore)")
    result = {"issued": issued.as_json(), "folder": str(folder), "files": files, "next": steps}
    return result, [
        f"client bundle for {args.name} in {folder}: {', '.join(files)}",
        *(f"next: {s}" for s in steps),
    ]


def _sign_csr(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    try:
        csr = args.csr.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {args.csr}: {exc.strerror or exc}") from exc
    issued = pki.sign_csr(csr, kind=args.kind, days=args.days, out=args.out)
    return {"issued": issued.as_json()}, [
        f"{args.kind} certificate for {issued.name} written to {issued.cert} (serial {issued.serial}, "
        f"until {issued.not_after[:10]}); the key never left the machine that made the request"
    ]


def _renew(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    issued = pki.renew(args.name, days=args.days)
    return {"issued": issued.as_json()}, [
        f"renewed {issued.name}: {issued.cert} (serial {issued.serial}, until "
        f"{issued.not_after[:10]}), same key",
        "the old certificate stays valid until it expires (revoke it with --serial if it must go); "
        "`systemctl reload` the service that uses it",
    ]


def _revoke(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    if (args.name is None) == (args.serial is None):
        raise PkiError("give NAME or --serial SERIAL (one of them)")
    serials = pki.revoke(args.name, serial=args.serial, every=args.every)
    return {"revoked": serials, "crl": str(pki.crl_path)}, [
        f"revoked serial(s) {', '.join(serials)}; CRL rewritten: {pki.crl_path}",
        "copy the CRL to the server if it is elsewhere; the server reloads it and drops the client",
    ]


def _list(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    rows = pki.listing()
    lines = [f"{'NAME':<24} {'KIND':<7} {'SERIAL':<42} {'EXPIRES':<26} STATE"]
    for r in rows:
        state = "revoked" if r["revoked"] else "valid"
        lines.append(f"{r['name']:<24} {r['kind']:<7} {r['serial']:<42} {r['not_after']:<26} {state}")
    return {"certificates": rows}, lines


def _crl(pki: Pki, args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    path = pki.write_crl(days=args.days, out=args.out)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    next_update = crl.next_update_utc.isoformat() if crl.next_update_utc else None
    return {"crl": str(path), "crl_number": number, "next_update": next_update}, [
        f"CRL re-signed: {path} (number {number}, valid until {next_update})"
    ]
