"""`tokenbridge-client`: run the client service, or ask a running one for its status."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from bridge_client.config import DEFAULT_CONFIG, DEFAULT_STATUS_SOCKET, load_client_config
from protocol.errors import BridgeError
from protocol.runtime.logging import configure_logging

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
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge-client",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the client (the default)")
    status = sub.add_parser("status", help="show the running client's tunnel, readers and lease")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--socket",
        type=Path,
        help=f"status socket (default: from the config, else {DEFAULT_STATUS_SOCKET})",
    )
    check = sub.add_parser("check-config", help="validate the config file and exit")
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
        config = load_client_config(args.config)
        if args.command == "check-config":
            print(f"{args.config}: ok ({len(config.readers)} reader(s), server {config.server_address})")
            return 0
        configure_logging(level=args.log_level)
        from bridge_client.app import main_async

        trio.run(main_async, config)
        return 0
    except BridgeError as exc:
        print(f"tokenbridge-client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _status(args: argparse.Namespace) -> int:
    from bridge_client.status import fetch_status

    path = args.socket
    if path is None:
        try:
            path = load_client_config(args.config).status_socket or DEFAULT_STATUS_SOCKET
        except BridgeError:
            path = DEFAULT_STATUS_SOCKET
    try:
        data = trio.run(fetch_status, path)
    except (OSError, trio.TooSlowError) as exc:
        print(
            f"tokenbridge-client: cannot read status from {path}: {exc}. Is the client running, and does "
            "its config set status.socket?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(render_status(data))
    tunnel_ok = data["tunnel"]["state"] == "connected"
    return 0 if tunnel_ok else 1


def render_status(data: dict) -> str:  # type: ignore[type-arg]
    t = data["tunnel"]
    lines = [f"tunnel   {t['state']} to {t['server']}" + (f" as {t['identity']}" if t["identity"] else "")]
    if t["reason"]:
        lines.append(f"         {t['reason']}")
    if t["rtt_ms"] is not None:
        lines.append(f"         rtt {t['rtt_ms']} ms, connected for {t['connected_for_s']} s")
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
