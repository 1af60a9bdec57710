"""How an admin answer travels in the wire's `AdminResponse` (docs/status.md, "over the wire").

The wire caps control payloads at 16 KiB, JSON nesting at depth 4 and strings at 1024
characters, and the status document is deeper than that. So the dispatcher's result travels
JSON-encoded and cut into strings, `{"json": ["<part 1>", "<part 2>", ...]}`;
`unwrap_result` joins and decodes it on the admin client.
"""

from __future__ import annotations

import json
from typing import Any, Final

# protocol.wire.MAX_CONTROL_PAYLOAD minus room for the envelope and JSON string escaping.
MAX_WIRE_RESULT: Final = 12000
CHUNK: Final = 1000  # < protocol/_wire_fields.py MAX_STRING_CHARS


def wire_result(ok: bool, result: dict[str, Any], error: str) -> tuple[bool, dict[str, Any], str]:
    text = json.dumps(result, separators=(",", ":"), default=str)
    if len(text) > MAX_WIRE_RESULT:
        return (
            False,
            {},
            (
                f"the answer is {len(text)} bytes, more than the wire carries ({MAX_WIRE_RESULT}); "
                "run the command on the server host (control socket) instead"
            ),
        )
    return ok, {"json": [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]}, error


def unwrap_result(result: dict[str, Any]) -> dict[str, Any]:
    parts = result.get("json")
    if not isinstance(parts, list):
        return result
    doc: dict[str, Any] = json.loads("".join(parts))
    return doc
