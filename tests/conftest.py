"""Suite-wide test settings.

Hypothesis: no per-example deadline (a 2-core CI machine running pcscd and two daemons has
noisy timing; a deadline would turn load into flaky failures) and derandomised runs in CI so a
red build reproduces; `TOKENBRIDGE_HYPOTHESIS_PROFILE=dev` gives fresh random examples.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(
    os.environ.get("TOKENBRIDGE_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)
