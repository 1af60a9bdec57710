"""`tokenbridge-server`: run the token server.

    tokenbridge-server --config /etc/tokenbridge/server.yaml [--listen HOST:PORT]
                       [--simulate PROFILE] [--log-level LEVEL]

`--simulate PROFILE` still needs `--config` (TLS material and allow lists cannot be made up
safely): it replaces the `match` of every configured token with the simulator profile, keeping
the tokens' names and allow lists, so a real deployment's config can be tried without the
hardware. Exit codes: 0 after a clean shutdown, 2 for a bad command line or config, 1 when
the server could not start (TLS material, port in use).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from bridge_server.config import ServerConfig, load_server_config
from protocol.errors import BridgeError, ConfigError

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenbridge-server",
        description="Serve USB code-signing tokens to build machines over mutual TLS.",
    )
    parser.add_argument("--config", type=Path, required=True, help="server YAML file (DESIGN §6)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")
    parser.add_argument(
        "--simulate",
        metavar="PROFILE",
        help="serve every configured token from the simulator profile PROFILE "
        "(safenet-5110, yubikey5, etoken-fusion, epass2003) instead of USB hardware",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    return parser


def load_config(args: argparse.Namespace) -> ServerConfig:
    """The config the command line asks for. Raises ConfigError."""
    config = load_server_config(args.config)
    if args.listen:
        config = config.with_listen(args.listen)
    if args.simulate:
        config = config.with_simulated_tokens(args.simulate)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from protocol.runtime.logging import configure_logging

    configure_logging(level=args.log_level)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"tokenbridge-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from bridge_server.app import serve_forever

    try:
        trio.run(serve_forever, config)
    except ConfigError as exc:
        print(f"tokenbridge-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BridgeError, OSError) as exc:
        log.error("server.failed", error=str(exc))
        print(f"tokenbridge-server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
