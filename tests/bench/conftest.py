"""The bench smoke test needs pcscd with the vpcd readers (same rules as tests/e2e: start it only
when it is not running, and stop only the one we started)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from e2e_stack import _pcscd_running, card_states, reader_name, wait_for


@pytest.fixture(scope="module")
def pcscd() -> Iterator[None]:
    started = None
    if not _pcscd_running():
        started = subprocess.Popen(
            ["pcscd", "--foreground"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    try:
        wait_for(lambda: reader_name(0) in card_states(), timeout=20, what="pcscd to list the vpcd readers")
        yield
    finally:
        if started is not None:
            started.terminate()
            started.wait(timeout=10)
