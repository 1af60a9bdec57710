"""The test command mutmut runs for each mutant: pytest, with every failure reported as exit code 1.

mutmut 2.x counts a mutant as killed only when the test command exits with 1 ("tests failed").
A mutant that breaks an import makes pytest exit with 2 (collection error) or 4, which mutmut
would record as a survivor although the tests did notice it; here any non-zero exit is a kill.
"""

from __future__ import annotations

import sys

import pytest


def main() -> None:
    code = pytest.main(sys.argv[1:])
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
