"""Suite-wide test settings.

Hypothesis: no per-example deadline (a 2-core CI machine running pcscd and two daemons has
noisy timing; a deadline would turn load into flaky failures) and derandomised runs in CI so a
red build reproduces; `TOKENBRIDGE_HYPOTHESIS_PROFILE=dev` gives fresh random examples.
`fuzz` (what `make fuzz` / bench/fuzz.py selects) is `dev` plus an example database in
`TOKENBRIDGE_FUZZ_DB` (default .hypothesis-fuzz/): failing examples found by one run are
replayed first by the next, while every run draws new inputs from a new seed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "fuzz",
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
    database=DirectoryBasedExampleDatabase(os.environ.get("TOKENBRIDGE_FUZZ_DB", ".hypothesis-fuzz")),
)
settings.load_profile(
    os.environ.get("TOKENBRIDGE_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)
