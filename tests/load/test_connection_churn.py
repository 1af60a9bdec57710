"""1,000 connect/disconnect cycles over real TLS (reliability-anchors §7.4 L2, ghostunnel churn).

File descriptors and trio tasks return to their baseline, and there is no slowdown trend.
`TOKENBRIDGE_LONG_TESTS=1` runs 10,000 cycles.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio
from inproc import Pki, expect, hello, open_fds, open_lease, raw_client, running_server, wait_until

from protocol import wire

CYCLES = 10_000 if os.environ.get("TOKENBRIDGE_LONG_TESTS") == "1" else 1_000


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def test_connect_disconnect_churn_returns_fds_and_tasks_to_baseline(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with running_server(tmp_path, heartbeat_s=5.0) as (server, port):
        for _ in range(3):  # warm-up: lazily created fds, caches
            async with raw_client(pki, port) as client:
                await hello(client)
        await wait_until(lambda: len(list(server.hub)) == 0, what="sessions to close", within=5)
        fds, tasks = open_fds(), task_count()
        durations: list[float] = []
        for i in range(CYCLES):
            start = time.monotonic()
            async with raw_client(pki, port) as client:
                if i % 10 == 0:  # every tenth cycle also takes and drops a lease
                    await open_lease(client)
                else:
                    await hello(client)
                    await expect(client, wire.TokenStatus)
            durations.append(time.monotonic() - start)
        await wait_until(lambda: len(list(server.hub)) == 0, what="sessions to close", within=10)
        await wait_until(lambda: server.tokens[0].book.holder is None, what="lease release", within=10)
        await wait_until(lambda: open_fds() <= fds, what=f"fds back to {fds} (now {open_fds()})", within=10)
        await wait_until(lambda: task_count() <= tasks, what=f"tasks back to {tasks}", within=10)
    first, last = sorted(durations[:100]), sorted(durations[-100:])
    # No slowdown trend: the median of the last 100 cycles within 2x of the first 100.
    assert last[50] <= 2 * first[50] + 0.002, (first[50], last[50])
