"""Shared knobs for the fuzz targets: the example budget and byte mutators.

`make test` runs each target with its small default budget (the whole folder stays well under
60 s). `TOKENBRIDGE_FUZZ_EXAMPLES=N` overrides every budget for a long run, e.g.
`TOKENBRIDGE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/fuzz -q`. Crashers found
are kept as `@example(...)` on the target, or as files in `tests/fuzz/corpus/<target>/`
(replayed by the target's `test_corpus_*` test).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"
_OVERRIDE = int(os.environ.get("TOKENBRIDGE_FUZZ_EXAMPLES", "0") or 0)


def budget(default: int) -> settings:
    """Hypothesis settings for one fuzz target: `default` examples unless overridden."""
    return settings(
        max_examples=_OVERRIDE or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, *, max_edits: int = 4) -> bytes:
    """`seed` with a few bit flips, byte replacements, insertions, deletions or a truncation."""
    buf = bytearray(seed)
    for _ in range(draw(st.integers(0, max_edits))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "insert" or not buf:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[pos] = draw(st.integers(0, 255))
        elif op == "delete":
            del buf[pos]
        else:
            del buf[pos:]
    return bytes(buf)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split `data` at the given offsets (taken modulo its length, deduplicated, in order)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def corpus_files(target: str) -> list[Path]:
    return sorted((CORPUS / target).glob("*.bin"))
