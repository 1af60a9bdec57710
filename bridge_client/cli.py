"""`tokenbridge-client`: run the client service, or ask a running one for its status.

Exit codes (`protocol.runtime.cli`, docs/ops.md "Exit codes"): 0 ok; 1 a problem was found
(check-config: the config is not usable; status: no answer, or the tunnel is not connected),
the same with or without `--json`; 2 bad input (a command line that does not parse, a run
with a config it cannot use); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import structlog
import trio

from bridge_client.config import DEFAULT_CONFIG, DEFAULT_STATUS_SOCKET, load_client_config
from protocol.display import format_duration
from protocol.errors import BridgeError
from protocol.runtime.cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    add_version_option,
    json_line,
    package_version,
    print_error,
)
from protocol.runtime.logging import configure_logging
from protocol.runtime.tls import client_context, validity_problem

log = structlog.get_logger(__name__)

PROG = "tokenbridge-client"

DESCRIPTION = """\
Show a token served by tokenbridge-server as a smart card in a local vpcd reader (or, with
`reader: usbip`, in an emulated USB CCID reader attached over USB/IP on loopback), so PC/SC
and PKCS#11 tools on this machine (OpenSC, osslsigncode, jsign, signtool...) can sign with it.
"""

EPILOG = """\
examples:
  tokenbridge-client --config /etc/tokenbridge/client.yaml     run the service
  tokenbridge-client status                                    tunnel, readers and lease
  tokenbridge-client status --json                             the same for scripts
  tokenbridge-client check-config --config client.yaml         validate a config file
  tokenbridge-client check-config --json                       the same as one JSON document
  tokenbridge-client status --watch 5 --json                   one JSON document per line

exit codes: 0 ok, 1 a problem found (bad config, no status, tunnel down), 2 bad usage
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge-client",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the client (the default)")
    status = sub.add_parser("status", help="show the running client's tunnel, readers and lease")
    status.add_argument("--json", action="store_true", help="machine-readable output (docs/client.md)")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2); with --json one document per line",
    )
    status.add_argument(
        "--socket",
        type=Path,
        help=f"status socket (default: from the config, else {DEFAULT_STATUS_SOCKET})",
    )
    check = sub.add_parser("check-config", help="validate the config file and exit (0 ok, 1 not)")
    check.add_argument("--json", action="store_true", help="one JSON document: ok, config, problem, ...")
    for each in (run, status, check):
        _common(each, top=False)
    return parser


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--config` and `--log-level`, before or after the subcommand (SUPPRESS keeps the top's value)."""
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG if top else argparse.SUPPRESS,
        help=f"client config (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--log-level",
        default="info" if top else argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "check-config":
            return _check(args)
        configure_logging(level=args.log_level)
        # The first line of every run: which build, which file (journalctl -u ... shows it per start).
        log.info("client.starting", version=package_version(), config=str(args.config), pid=os.getpid())
        config = load_client_config(args.config)
        from bridge_client.app import main_async

        trio.run(main_async, config)
        return EXIT_OK
    except BridgeError as exc:
        print_error(PROG, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def check_report(path: Path) -> dict[str, object]:
    """What `check-config` found: `ok`, `config`, `problem` ("" when ok), `server`, `readers`."""
    report: dict[str, object] = {
        "ok": False,
        "config": str(path),
        "problem": "",
        "server": None,
        "readers": [],
    }
    try:
        config = load_client_config(path)
    except BridgeError as exc:
        report["problem"] = str(exc)
        return report
    # issue 19 #7: a certificate outside its validity is a problem found (exit 1).
    cert = config.tls.cert
    problem = validity_problem(cert, datetime.now(UTC)) if cert.is_file() else None
    if problem is not None:
        report["problem"] = f"{path}: tls.cert: {problem}"
        return report
    try:  # the CA, certificate and key load together, as the daemon will load them
        client_context(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
    except BridgeError as exc:
        report["problem"] = f"{path}: tls: {exc}"
        return report
    report.update(ok=True, server=str(config.server_address), readers=[r.token for r in config.readers])
    return report


def _check(args: argparse.Namespace) -> int:
    report = check_report(args.config)
    if args.json:
        print(json.dumps(report))
    elif report["ok"]:
        readers = report["readers"]
        assert isinstance(readers, list)
        print(f"{args.config}: ok ({len(readers)} reader(s), server {report['server']})")
    else:
        print_error(PROG, str(report["problem"]))
    return EXIT_OK if report["ok"] else EXIT_PROBLEM


def _status(args: argparse.Namespace) -> int:
    from bridge_client.status import fetch_status

    path = args.socket
    if path is None:
        try:
            path = load_client_config(args.config).status_socket or DEFAULT_STATUS_SOCKET
        except BridgeError:
            path = DEFAULT_STATUS_SOCKET
    try:
        if args.watch is None:
            return _show(args, trio.run(fetch_status, path))
        return trio.run(_watch, args, path)
    except (OSError, trio.TooSlowError) as exc:
        print_error(
            PROG,
            f"cannot read status from {path}: {exc}. Is the client running, and does its config set "
            "status.socket?",
        )
        return EXIT_PROBLEM


def _show(args: argparse.Namespace, data: dict) -> int:  # type: ignore[type-arg]
    """Print one snapshot; 1 when the tunnel is not connected, the same with `--json`."""
    if args.json:
        print(json_line(data) if args.watch is not None else json.dumps(data, indent=2), flush=True)
    else:
        print(render_status(data), flush=True)
    return EXIT_OK if data["tunnel"]["state"] == "connected" else EXIT_PROBLEM


async def _watch(args: argparse.Namespace, path: Path) -> int:
    from bridge_client.status import fetch_status

    while True:
        data = await fetch_status(path)
        if not args.json and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")
        _show(args, data)
        await trio.sleep(max(0.2, args.watch))


def render_status(data: dict) -> str:  # type: ignore[type-arg]
    t = data["tunnel"]
    lines = [f"tunnel   {t['state']} to {t['server']}" + (f" as {t['identity']}" if t["identity"] else "")]
    if t["reason"]:
        lines.append(f"         {t['reason']}")
    if t["rtt_ms"] is not None:
        since = format_duration(t["connected_for_s"])
        lines.append(f"         rtt {t['rtt_ms']:.1f}ms, connected for {since}")
    lines.append("")
    lines.append(f"{'TOKEN':<16} {'READER':<24} {'CARD':<18} {'LEASE':<14} DETAIL")
    for r in data["readers"]:
        usbip = r.get("usbip")
        where = f"usbip {usbip['busid']}@{usbip['listen']}" if usbip else f"vpcd {r['vpcd']}"
        lease = "-" if r["lease"] is None else f"epoch {r['lease']['epoch']}"
        if r["queue_position"] is not None:
            lease = f"queued #{r['queue_position']}"
        lines.append(f"{r['token']:<16} {where:<24} {r['card']:<18} {lease:<14} {r['reason']}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
