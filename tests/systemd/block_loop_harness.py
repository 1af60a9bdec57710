"""tokenbridge-server with a test-only hook: SIGUSR1 blocks its trio loop with a sync sleep.

Used by test_notify.py to prove the watchdog pings come from the event loop (a wedged loop
stops them, so systemd would restart the daemon). The hook lives here, not in the product.

    python block_loop_harness.py --config server.yaml [--block-s 1.5]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bridge_server.app import serve_forever
from bridge_server.config import load_server_config
from protocol.runtime.logging import configure_logging


async def block_on_sigusr1(block_s: float) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            print(f"harness: blocking the event loop for {block_s} s", flush=True)
            time.sleep(block_s)  # on purpose: a sync call that wedges the loop  # noqa: ASYNC251
            print("harness: event loop released", flush=True)


async def main(config_path: Path, block_s: float) -> None:
    config = load_server_config(config_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(block_on_sigusr1, block_s)
        await serve_forever(config)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--block-s", type=float, default=1.5)
    args = parser.parse_args()
    configure_logging(level="info", json=True)
    trio.run(main, args.config, args.block_s)
