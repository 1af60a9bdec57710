"""`tokenbridge status | lease revoke | token reset | pin-guard reset | doctor` (wired in admin_cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from bridge_admin.client import (
    AdminClientError,
    AdminSession,
    add_target_options,
    call_sync,
    resolve_target,
)
from protocol.runtime.cli import json_line

COMMANDS = ("status", "lease", "token", "pin-guard", "doctor")


def add_admin_commands(sub: Any) -> None:
    status = sub.add_parser("status", help="tokens, holders, queues, PIN guard and clients of a server")
    status.add_argument("--json", action="store_true", help="the stable JSON document (docs/status.md)")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2); with --json one document per line",
    )
    add_target_options(status)
    for cmd, verb, text in (
        ("lease", "revoke", "end the current lease of token NAME (the next waiter gets it)"),
        ("token", "reset", "end the lease, release and reopen token NAME's USB device"),
        ("pin-guard", "reset", "clear token NAME's PIN guard (prints what to check first)"),
    ):
        group = sub.add_parser(cmd, help=text)
        action = group.add_subparsers(dest="verb", required=True, metavar="ACTION").add_parser(
            verb, help=text
        )
        action.add_argument("name", metavar="NAME", help="token name from the server config")
        action.add_argument("--json", action="store_true")
        add_target_options(action)
    doctor = sub.add_parser("doctor", help="preflight check on a build VM: can this machine sign?")
    doctor.add_argument("--config", type=Path, default=Path("/etc/tokenbridge/client.yaml"))
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--pcscd-socket", type=Path, help="pcscd socket (default /run/pcscd/pcscd.comm)")


def run_admin_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "doctor":
            from bridge_admin.doctor import run_doctor

            return run_doctor(args.config, as_json=args.json, pcscd_socket=args.pcscd_socket)
        target = resolve_target(args)
        if args.command == "status":
            return _status(args, target)
        action = {"lease": "lease.revoke", "token": "token.reset", "pin-guard": "pin-guard.reset"}[
            args.command
        ]
        answer = call_sync(target, action, {"token": args.name})
    except AdminClientError as exc:
        print(f"tokenbridge: {exc}", file=sys.stderr)
        return 1
    return _print_action(answer, as_json=args.json)


def _print_action(answer: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(answer, indent=2))
        return 0 if answer["ok"] else 1
    if not answer["ok"]:
        print(f"tokenbridge: {answer['error']}", file=sys.stderr)
        return 1
    result = answer["result"]
    checklist = result.get("checklist") or result.get("check_first") or []
    if checklist:
        print("Before re-running jobs, check:")
        for item in checklist:
            print(f"  - {item}")
    if result.get("message"):
        print(result["message"])
    elif not checklist:
        print(json.dumps(result, indent=2))
    return 0


def _render(doc: dict[str, Any], as_json: bool, *, watch: bool = False) -> str:
    """The table, or JSON: indented once, one document per line under `--watch` (`jq`-friendly)."""
    from bridge_server.observe.status import render_table

    if not as_json:
        return render_table(doc)
    return json_line(doc) if watch else json.dumps(doc, indent=2)


def _status(args: argparse.Namespace, target: Any) -> int:
    if args.watch is None:
        answer = call_sync(target, "status")
        if not answer["ok"]:
            print(f"tokenbridge: {answer['error']}", file=sys.stderr)
            return 1
        print(_render(answer["result"], args.json))
        return 0

    async def watch() -> int:
        async with AdminSession(target) as session:
            while True:
                answer = await session.request("status")
                if not answer["ok"]:
                    print(f"tokenbridge: {answer['error']}", file=sys.stderr)
                    return 1
                if not args.json and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(_render(answer["result"], args.json, watch=True), flush=True)
                await trio.sleep(max(0.2, args.watch))

    return trio.run(watch)
