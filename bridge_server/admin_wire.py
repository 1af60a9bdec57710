"""How an admin answer travels in the wire's `AdminResponse` (docs/status.md, "over the wire").

The wire carries an admin `result` as a bounded JSON document (protocol/_wire_fields.py:
depth ≤ 8, ≤ 50,000 values, strings ≤ 1,024 characters; the frame ≤ 1 MiB). The dispatcher's
answers fit those bounds; anything that does not is replaced by a clear error instead of
breaking the admin's session.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import LocalProtocolError
from protocol.wire import AdminResponse, encode_message


def wire_result(ok: bool, result: dict[str, Any], error: str) -> tuple[bool, dict[str, Any], str]:
    try:
        encode_message(AdminResponse(request_id=0, ok=ok, result=result, error=error))
    except LocalProtocolError as exc:
        return (
            False,
            {},
            f"the answer does not fit in the wire's admin response ({exc}); "
            "run the command on the server host (control socket) instead",
        )
    return ok, result, error


def unwrap_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result as sent (kept for symmetry with `wire_result`)."""
    return result
