"""P4/S8: no logging call in the daemons or the protocol passes raw card data except redacted.

STYLE "Logging": per-APDU lines only through the redactor (`protocol.apdu.redact`). A runtime
test can only prove this for the paths it drives; this lint reads every `log.<level>(...)` call
in `protocol/`, `bridge_server/` and `bridge_client/` and refuses an argument that carries raw
bytes: a bytes literal, `bytes()`/`bytearray()`/`memoryview()`, or a value named like card data
(`apdu`, `data`, `payload`, `pin`...) unless it is wrapped in `redact()` or reduced to its length
or to the status word (`rapdu[-2:]`). Formatting does not launder: `.hex()`, `repr()`, `str()`
and f-strings of such a value are refused too.

What it cannot see: a value of type bytes under an innocent name, and exception messages
(`error=str(exc)`) that embed data; the runtime canaries (`e2e/test_no_secrets.py`) cover those
for the paths they drive.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("protocol", "bridge_server", "bridge_client")
LEVELS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "msg", "log"})
LOGGERS = frozenset({"log", "logger", "_log", "structlog"})
# Names that hold card traffic or secrets in this code base (ISO 7816-4 APDUs, CCID/T=1 blocks,
# vpcd frames, PIN material).
RAW_NAMES = frozenset(
    {
        "apdu",
        "capdu",
        "rapdu",
        "command",
        "response",
        "data",
        "raw",
        "payload",
        "frame",
        "block",
        "chunk",
        "buf",
        "buffer",
        "body",
        "pin",
        "puk",
        "secret",
        "message_bytes",
    }
)
# Reducers whose result says nothing about the content.
SAFE_CALLS = frozenset({"redact", "len", "type", "bool", "id"})
BYTES_BUILDERS = frozenset({"bytes", "bytearray", "memoryview"})
# Bytes every PC/SC client may read anyway: the ATR (ISO/IEC 7816-3 §8) is no secret.
PUBLIC_OWNERS = frozenset({"atr"})


def _is_log_call(node: ast.Call) -> bool:
    func = node.func
    if not isinstance(func, ast.Attribute) or func.attr not in LEVELS:
        return False
    receiver = func.value
    while isinstance(receiver, ast.Call | ast.Attribute):  # log.bind(...).info, self.log.info
        if isinstance(receiver, ast.Attribute) and receiver.attr in LOGGERS:
            return True
        receiver = receiver.func if isinstance(receiver, ast.Call) else receiver.value
    return isinstance(receiver, ast.Name) and receiver.id in LOGGERS


def _is_status_word(node: ast.Subscript) -> bool:
    """`x[-2:]`: the two trailing bytes of a response APDU are the status word, data not included."""
    s = node.slice
    return (
        isinstance(s, ast.Slice)
        and s.upper is None
        and s.step is None
        and isinstance(s.lower, ast.UnaryOp)
        and isinstance(s.lower.op, ast.USub)
        and isinstance(s.lower.operand, ast.Constant)
        and s.lower.operand.value == 2
    )


def _leaks(node: ast.AST) -> str | None:
    """Why `node`, used as a log value, may carry raw card data; None when it cannot."""
    if isinstance(node, ast.Constant):
        return "a bytes literal" if isinstance(node.value, bytes) else None
    if isinstance(node, ast.Name):
        return f"raw value {node.id!r}" if node.id.lower() in RAW_NAMES else None
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in PUBLIC_OWNERS:
            return None
        if node.attr.lower() in RAW_NAMES:
            return f"raw value {ast.unparse(node)!r}"
        return None  # `msg.epoch`, `self.name`: a field, not the object's bytes
    if isinstance(node, ast.Subscript):
        if _is_status_word(node):
            return None
        return _leaks(node.value)
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else None
        if name in SAFE_CALLS:
            return None
        if name in BYTES_BUILDERS:
            return f"{name}(...)"
        if isinstance(func, ast.Attribute):
            inner = _leaks(func.value)  # x.hex(), x.decode(), x[..].hex()
            if inner:
                return f"{inner} formatted by .{func.attr}()"
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            inner = _leaks(arg)
            if inner:
                return inner
        return None
    for child in ast.iter_child_nodes(node):  # f-strings, containers, operators, comprehensions
        inner = _leaks(child)
        if inner:
            return inner
    return None


def violations(source: str, filename: str = "<source>") -> Iterator[str]:
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not _is_log_call(node):
            continue
        values = [*node.args[1:], *(k.value for k in node.keywords)]
        for value in values:
            why = _leaks(value)
            if why:
                yield f"{filename}:{node.lineno}: {ast.unparse(node)[:100]} logs {why}"


def _product_files() -> list[Path]:
    return sorted(p for pkg in SCANNED for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize(
    "line",
    [
        'log.debug("apdu.sent", apdu=apdu)',
        'log.debug("apdu.sent", apdu=apdu.hex())',
        'log.info("x", data=msg.data)',
        'log.info("x", data=msg.data[:16].hex())',
        'log.warning("x", frame=f"{frame!r}")',
        'log.warning("x", what=repr(event.payload))',
        'log.error("x", cmd=bytes(c))',
        'log.debug("x", b"\\x00\\x20")',
        'log.bind(token=t).debug("x", pin=pin)',
        'self.log.info("x", items=[chunk for chunk in chunks])',
        'log.debug("x", sw=rapdu[-4:].hex())',
    ],
)
def test_the_lint_refuses_raw_card_data_in_a_log_call(line: str) -> None:
    assert list(violations(line)), f"not flagged: {line}"


@pytest.mark.parametrize(
    "line",
    [
        'log.debug("apdu.sent", apdu=redact(apdu))',
        'log.debug("apdu.received", apdu=redact(event.data))',
        'log.debug("x", length=len(rapdu))',
        'log.debug("x", sw=rapdu[-2:].hex())',
        'log.info("card.powered_on", atr=atr.raw.hex())',
        'log.info("x", lease_epoch=msg.epoch, token=self.name)',
        'log.info("x", reason="message too long")',
        'other.debug("x", apdu=apdu)',
    ],
)
def test_the_lint_accepts_redacted_or_reduced_values(line: str) -> None:
    assert not list(violations(line)), f"wrongly flagged: {line}"


def test_no_log_call_in_the_product_passes_raw_card_data() -> None:
    files = _product_files()
    assert len(files) > 50, "the scan found too few modules; did the layout change?"
    found = [v for p in files for v in violations(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "\n".join(found)


def test_the_scan_sees_the_redacted_apdu_lines() -> None:
    """Guards the lint against matching nothing: the known per-APDU debug lines are log calls."""
    calls = 0
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _is_log_call(node) and "redact(" in ast.unparse(node):
                calls += 1
    assert calls >= 4
