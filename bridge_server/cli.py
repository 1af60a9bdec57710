"""`tokenbridge-server`: run the token server, or check its config without starting anything.

    tokenbridge-server [--config FILE] [--listen HOST:PORT] [--simulate PROFILE] [--log-level LEVEL]
    tokenbridge-server check-config [--config FILE]

`--config` defaults to /etc/tokenbridge/server.yaml; the common options are accepted before and
after the subcommand. `--simulate PROFILE` replaces the `match` of every configured token with
the simulator profile, keeping the tokens' names and allow lists, so a real deployment's config
can be tried without the hardware.

One server runs per state folder (`bridge_server.guard.instance_lock`): a second one started on
the same config stops before it opens or removes anything, naming the PID that holds the lock.

Exit codes (`protocol.runtime.cli`, the table in docs/ops.md): a run exits 0 after a clean
shutdown, 2 for a bad command line or config, 1 when the server could not start (TLS material,
port in use, already running). `check-config` (like `nginx -t`): 0 the config and its TLS files
are usable, 1 a problem was found (`--json`: one document saying which), 2 bad usage.
Failures are one line on stderr, `tokenbridge-server: WHAT`, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import structlog
import trio

from bridge_server.config import ServerConfig, load_server_config, load_server_pins
from protocol.errors import BridgeError, ConfigError
from protocol.runtime.address import Address
from protocol.runtime.cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    add_version_option,
    package_version,
    print_error,
)

log = structlog.get_logger(__name__)

PROG: Final = "tokenbridge-server"

DEFAULT_CONFIG: Final = Path("/etc/tokenbridge/server.yaml")
LEVELS: Final = ["debug", "info", "warning", "error"]


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--config`, `--log-level`: on the top level and, suppressed by default, on each subcommand."""
    config_default = DEFAULT_CONFIG if top else argparse.SUPPRESS
    level_default = "info" if top else argparse.SUPPRESS
    parser.add_argument(
        "--config", type=Path, default=config_default, help=f"server YAML file (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument("--log-level", default=level_default, choices=LEVELS, help="default: info")


def _run_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--listen", metavar="HOST:PORT", default=default, help="override the config's listen")
    parser.add_argument(
        "--simulate",
        metavar="PROFILE",
        default=default,
        help="serve every configured token from the simulator profile PROFILE "
        "(safenet-5110, yubikey5, etoken-fusion, epass2003) instead of USB hardware",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge-server",
        description="Serve USB code-signing tokens to build machines over mutual TLS.",
        epilog="examples:\n"
        "  tokenbridge-server --config /etc/tokenbridge/server.yaml                run the server\n"
        "  tokenbridge-server check-config --config /etc/tokenbridge/server.yaml   validate, start nothing\n"
        "  tokenbridge-server check-config --json                                  the same for scripts\n"
        "\nexit codes: 0 ok, 1 a problem found (check-config) or the start failed, 2 bad usage or config\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)
    _common(parser, top=True)
    _run_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the server (the default)")
    _common(run, top=False)
    _run_options(run, top=False)
    check = sub.add_parser(
        "check-config",
        help="validate the config and its TLS files, start nothing (exit 0 ok, 1 not)",
    )
    _common(check, top=False)
    _run_options(check, top=False)
    check.add_argument(
        "--json", action="store_true", help="one JSON document: ok, config, problem, listen, tokens"
    )
    return parser


def load_config(args: argparse.Namespace) -> ServerConfig:
    """The config the command line asks for. Raises ConfigError."""
    config = load_server_pins(load_server_config(args.config))  # issue 16: the daemon reads PINs
    if args.listen:
        config = config.with_listen(args.listen)
    if args.simulate:
        config = config.with_simulated_tokens(args.simulate)
    return config


def check_config(config: ServerConfig) -> None:
    """Everything a start checks before it opens a device or a socket. Raises BridgeError."""
    from bridge_server.guard.guardrails import guard_state_path
    from bridge_server.guard.state_files import check_state_folders
    from protocol.runtime.tls import server_context

    check_state_folders(
        str(config.path), [("audit.path", config.audit.path), ("pin_guard.state", guard_state_path(config))]
    )
    tls = config.tls
    server_context(ca=tls.ca, cert=tls.cert, key=tls.key, crl=tls.crl)


def first_error(exc: BaseException) -> BaseException:
    """The exception inside trio's ExceptionGroup wrappers (the first, when several failed)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException, config: ServerConfig) -> str:
    """One line for a start failure."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {config.host}:{config.port}: address already in use; another process has "
            f"it (`ss -ltnp 'sport = :{config.port}'`), or change `listen` in {config.path}"
        )
    if isinstance(exc, OSError) and exc.filename is None and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from protocol.runtime.logging import configure_logging

    configure_logging(level=args.log_level)
    if args.command == "check-config":
        return _check(args)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print_error(PROG, str(exc))
        return EXIT_USAGE
    return _serve(config)


def check_report(args: argparse.Namespace) -> dict[str, object]:
    """What `check-config` found: `ok`, `config`, `problem` ("" when ok), `listen`, `tokens`."""
    report: dict[str, object] = {"ok": False, "config": str(args.config), "problem": "", "listen": None}
    report["tokens"] = []
    try:
        config = load_config(args)
        report["listen"] = str(Address(config.host, config.port))
        report["tokens"] = [t.name for t in config.tokens]
        check_config(config)
    except BridgeError as exc:
        report["problem"] = str(exc)
        return report
    report["ok"] = True
    return report


def _check(args: argparse.Namespace) -> int:
    report = check_report(args)
    if args.json:
        print(json.dumps(report))
    elif report["ok"]:
        names = ", ".join(map(str, report["tokens"]))  # type: ignore[call-overload]
        print(f"{report['config']}: ok (listen {report['listen']}; tokens: {names}; TLS files load)")
    else:
        print_error(PROG, str(report["problem"]))
    return EXIT_OK if report["ok"] else EXIT_PROBLEM


def _serve(config: ServerConfig) -> int:
    from bridge_server.app import serve_forever
    from bridge_server.guard.instance_lock import instance_lock

    # The first line of every run: which build, which file (journalctl -u ... shows it per start).
    log.info("server.starting", version=package_version(), config=str(config.path), pid=os.getpid())
    try:
        with instance_lock(config):
            trio.run(serve_forever, config)
    except BaseException as group:  # the ExceptionGroup trio wraps it in
        exc = first_error(group)
        if isinstance(exc, ConfigError):
            print_error(PROG, str(exc))
            return EXIT_USAGE
        if isinstance(exc, BridgeError | OSError):
            log.error("server.failed", error=describe(exc, config))
            print_error(PROG, describe(exc, config))
            return EXIT_PROBLEM
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        raise
    return EXIT_OK
