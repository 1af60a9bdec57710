"""`python -m bridge_server.simulator --vpcd HOST:PORT --profile NAME`: a simulated token in a vpcd slot."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from bridge_server.simulator.direct import DirectCard, main_async, main_usb_async
from bridge_server.simulator.piv import PivCard
from bridge_server.simulator.profiles import PROFILES
from protocol.runtime.address import parse_address
from protocol.runtime.logging import configure_logging
from protocol.vpcd import DEFAULT_PORT


def parse_host_port(text: str) -> tuple[str, int]:
    try:
        address = parse_address(text, DEFAULT_PORT)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return address.host, address.port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bridge_server.simulator",
        description="Expose a simulated PIV token straight to a vpcd reader (no bridge).",
    )
    parser.add_argument(
        "--vpcd",
        type=parse_host_port,
        default=("127.0.0.1", DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"vpcd slot port (default 127.0.0.1:{DEFAULT_PORT}; slot n is {DEFAULT_PORT}+n)",
    )
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="safenet-5110", help="token to imitate"
    )
    parser.add_argument("--state", type=Path, help="JSON file for keys and PIN counters (created if missing)")
    parser.add_argument("--pin", default="123456", help="initial PIN of a new card (default 123456)")
    parser.add_argument("--puk", default="12345678", help="initial PUK of a new card (default 12345678)")
    parser.add_argument("--stats", type=Path, help="write APDU/PIN/signature counters here after each APDU")
    parser.add_argument(
        "--via-usb",
        action="store_true",
        help="put the card behind the simulated USB token and the server's pyusb/CCID host stack "
        "(the benchmark's second baseline: the same token as through the bridge, minus the bridge)",
    )
    parser.add_argument("--log-level", default="info", help="debug shows every APDU (PINs redacted)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.pin.isdigit() and 6 <= len(args.pin) <= 8 and args.puk.isdigit() and len(args.puk) == 8):
        print("error: --pin must be 6-8 digits and --puk 8 digits", file=sys.stderr)  # values not echoed
        return 2
    configure_logging(level=args.log_level)
    card = PivCard(state_path=args.state, pin=args.pin, puk=args.puk)
    host, port = args.vpcd
    if args.via_usb:
        trio.run(main_usb_async, card, PROFILES[args.profile], host, port, args.stats)
        return 0
    direct = DirectCard(card, PROFILES[args.profile].atr, stats_path=args.stats)
    trio.run(main_async, direct, host, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
