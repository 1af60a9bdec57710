"""The NEED_DATA sentinel returned by every sans-I/O decoder's next_event()."""

from __future__ import annotations

import enum
from typing import Final, Literal


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
NeedData = Literal[_Sentinel.NEED_DATA]
