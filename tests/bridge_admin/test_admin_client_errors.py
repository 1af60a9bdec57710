"""Issue 19 #5: a connection broken mid-request is an AdminClientError (one line), not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from bridge_admin.client import AdminClientError, AdminSession, Target
from protocol.runtime.address import Address


class _Broken:
    """A stream or framed connection the peer has reset (a revoked certificate, a restart)."""

    async def send_all(self, data: bytes) -> None:
        raise trio.BrokenResourceError("peer reset")

    async def send(self, msg: Any) -> None:
        raise trio.BrokenResourceError("peer reset")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("over", ["socket", "tls"])
async def test_a_broken_connection_is_an_admin_client_error(over: str) -> None:
    if over == "socket":
        session = AdminSession(Target(socket=Path("/run/tokenbridge/control.sock")))
        session._stream = _Broken()  # type: ignore[assignment]
    else:
        session = AdminSession(Target(address=Address("127.0.0.1", 7447)))
        session._framed = _Broken()
    with pytest.raises(AdminClientError, match=r"lost the connection .*peer reset"):
        await session.request("status")
