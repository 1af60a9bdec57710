# ruff: noqa: E501  (the reviewed reasons read best one per line)
"""P5: every await on the network or on USB in the daemons has a deadline, or a reviewed reason.

reliability-anchors §8 P5 ("no await on network or USB is unbounded") and §6 row 13 ask for a
lint. STYLE forbids `timeout=` parameters on async functions: deadlines are cancel scopes set
by a caller, often several frames up, which a lexical lint cannot follow. So this is the honest
narrower version: it finds every await of a network or USB primitive in `bridge_server/`
(the test simulator excluded), `bridge_client/`, `protocol/runtime/` and the admin CLI's
network side in `bridge_admin/`, and each one must be
either lexically inside `trio.fail_after` / `move_on_after` / `fail_at` / `move_on_at` /
`CancelScope(deadline=...)` in its own function, or listed in `REVIEWED` below with who bounds
it. A new unbounded await fails the test until someone bounds it or reviews it; a reviewed
entry whose await is gone fails it too, so the list stays true. Entries starting `gap:` are
known unbounded waits, listed in docs/reliability.md (P5).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("bridge_server", "bridge_client", "protocol/runtime", "bridge_admin")
EXCLUDED = ("bridge_server/simulator/",)  # the test token and its USB link, not a daemon path
NETWORK = frozenset(
    {
        "receive_some",
        "send_all",
        "do_handshake",
        "unwrap",
        "wait_send_all_might_not_block",
        "open_tcp_stream",
        "open_ssl_over_tcp_stream",
        "open_unix_socket",
    }
)
# FramedConnection.send/receive (protocol/runtime/framed.py) under the names the daemons use
# for it; memory channels have the same method names and other receivers.
FRAMED_RECEIVERS = frozenset({"conn", "framed", "self.framed", "self.conn", "self._conn"})
USB_FOLDER = "bridge_server/usb/"
DEADLINES = frozenset({"fail_after", "move_on_after", "fail_at", "move_on_at"})

_HEARTBEAT = "the session's cancel scope: a client that stops reading stops answering Pings and is cut after the heartbeat misses (F1/F3 tests)"
_LIBUSB = "libusb's own timeout: the thread call passes timeout_ms/poll_ms to pyusb, and the driver's exchange deadline (max wait) cancels between polls (F12, B3 tests)"
REVIEWED: dict[str, str] = {
    # protocol/runtime: primitives; the deadline belongs to whoever calls them.
    "protocol/runtime/framed.py::send::send_all": "delegation: FramedConnection.send; callers bound it (entries below)",
    "protocol/runtime/framed.py::receive::receive_some": "delegation: FramedConnection.receive; callers bound it",
    "protocol/runtime/connect.py::connect::send": "caller: every connect() runs under fail_after (tunnel connect_timeout_s, doctor SERVER_TIMEOUT_S, admin client CONNECT_TIMEOUT_S: faults/test_admin_connect_deadline.py)",
    "protocol/runtime/connect.py::_handshake::do_handshake": "caller: connect() is run under fail_after by every caller",
    "protocol/runtime/connect.py::_greeting::receive": "caller: connect() is run under fail_after by every caller",
    # bridge_server/net
    "bridge_server/net/listener.py::receive_some::receive_some": "delegation: PrefixedStream, used only inside the handshake's fail_after",
    "bridge_server/net/listener.py::send_all::send_all": "delegation: PrefixedStream; the session's writes are bounded as below",
    "bridge_server/net/listener.py::wait_send_all_might_not_block::wait_send_all_might_not_block": "delegation: PrefixedStream",
    "bridge_server/net/listener.py::read_first_record::receive_some": "caller: _run_handshake wraps it in move_on_after(first flight) inside fail_after(handshake_timeout_s)",
    "bridge_server/net/listener.py::_run_handshake::do_handshake": "caller: _handshake runs _run_handshake under fail_after(handshake_timeout_s) (B7 tests)",
    "bridge_server/net/session.py::_writer::send": _HEARTBEAT,
    "bridge_server/net/session.py::_receive::receive": _HEARTBEAT,
    # bridge_server/usb: blocking pyusb calls in a worker thread.
    "bridge_server/usb/transport.py::write::run_sync": _LIBUSB,
    "bridge_server/usb/transport.py::transceive::run_sync": _LIBUSB,
    "bridge_server/usb/transport.py::read::run_sync": _LIBUSB,
    "bridge_server/usb/transport.py::read_interrupt::run_sync": _LIBUSB,
    "bridge_server/usb/transport.py::abort_request::run_sync": _LIBUSB,
    "bridge_server/usb/transport.py::usb_reset::run_sync": "libusb: the usbfs reset ioctl returns when the kernel has reset the port; the driver's recovery runs each step under the exchange cap (bridge_server/test_ccid_recovery.py)",
    "bridge_server/usb/transport.py::open::run_sync": "gap: opening the device (enumeration, claim) has no deadline of ours; libusb's control transfers carry their own default timeouts",
    # bridge_admin (the CLI's network side)
    "bridge_admin/client.py::_socket_request::send_all": "caller: request() runs it under fail_after(REQUEST_TIMEOUT_S)",
    "bridge_admin/client.py::_socket_request::receive_some": "caller: request() runs it under fail_after(REQUEST_TIMEOUT_S)",
    # bridge_client
    "bridge_client/tunnel.py::_heartbeat::send": "the tunnel's receive loop: a server that stops reading stops answering, and the loop's move_on_after(silence) ends the tunnel, cancelling the pinger",
    "bridge_client/tunnel.py::_dispatch::send": "caller: _receive_loop runs _dispatch under move_on_after(silence) (bridge_client/test_tunnel_send_deadline.py)",
    "bridge_client/tunnel.py::acquire_lease::send": "caller: vpcd_link runs acquire_lease under fail_after(queue_timeout_s)",
    "bridge_client/tunnel.py::lease_exchange::send": "caller: vpcd_link runs lease_exchange under fail_after(queue_timeout_s)",
    "bridge_client/tunnel.py::release_lease::send": "gap: best-effort release; a server that stopped reading blocks it until the tunnel's heartbeat loss tears the connection down",
    "bridge_client/tunnel.py::exchange::send": "gap: the exchange waits for the server's answer as long as the tunnel lives (a slow card may take long); bounded by heartbeat loss, not by a deadline",
    "bridge_client/usbip/reader.py::send_loop::send_all": "the attachment: answers queue in a bounded channel; an importer that stops reading fills it, emit() raises and the attachment's scope is cancelled (bridge_client/test_usbip_reader.py)",
    "bridge_client/usbip/reader.py::receive_loop::receive_some": "by design: waiting for the importer's next URB is idle time, as with vpcd; a closed socket ends it",
    "bridge_client/vpcd_link.py::_receive::receive_some": "by design: waiting for pcscd's next command is idle time, not an operation; a closed vpcd socket ends it",
}


def _deadline_context(expr: ast.expr) -> bool:
    if not isinstance(expr, ast.Call):
        return False
    func = expr.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in DEADLINES:
        return True
    return name == "CancelScope" and any(k.arg == "deadline" for k in expr.keywords)


def _primitive(call: ast.Call, path: str) -> str | None:
    func = call.func
    if not isinstance(func, ast.Attribute):
        return None
    if func.attr in NETWORK:
        return func.attr
    if func.attr in {"send", "receive"} and ast.unparse(func.value) in FRAMED_RECEIVERS:
        return func.attr
    if (
        func.attr == "run_sync"
        and ast.unparse(func.value).endswith("to_thread")
        and path.startswith(USB_FOLDER)
    ):
        return "run_sync"
    return None


def unbounded_awaits(source: str, path: str) -> Iterator[tuple[str, int]]:
    """(`path::function::primitive`, line) for each primitive await outside a deadline scope."""

    def visit(node: ast.AST, function: str, bounded: bool) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            fn, inside = function, bounded
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                fn, inside = getattr(child, "name", function), False
            elif isinstance(child, ast.With | ast.AsyncWith):
                inside = bounded or any(_deadline_context(item.context_expr) for item in child.items)
            elif isinstance(child, ast.Await) and isinstance(child.value, ast.Call) and not bounded:
                prim = _primitive(child.value, path)
                if prim:
                    yield f"{path}::{function}::{prim}", child.lineno
            yield from visit(child, fn, inside)

    yield from visit(ast.parse(source), "<module>", False)


def _scan() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for pkg in SCANNED:
        for file in sorted((REPO / pkg).rglob("*.py")):
            rel = file.relative_to(REPO).as_posix()
            if rel.startswith(EXCLUDED):
                continue
            for key, line in unbounded_awaits(file.read_text(), rel):
                found.setdefault(key, []).append(line)
    return found


@pytest.mark.parametrize(
    "body",
    [
        "async def f(stream):\n    await stream.receive_some(10)\n",
        "async def f(conn):\n    await conn.send(msg)\n",
        "async def f(stream):\n    with trio.CancelScope():\n        await stream.send_all(b'')\n",
        "async def f(stream):\n    with trio.move_on_after(1):\n        pass\n    await stream.do_handshake()\n",
        "async def f(s):\n    with trio.fail_after(1):\n        async def g():\n            await s.receive_some(1)\n",
    ],
)
def test_the_lint_finds_a_network_await_without_a_deadline(body: str) -> None:
    assert list(unbounded_awaits(body, "bridge_server/x.py")), body


@pytest.mark.parametrize(
    "body",
    [
        "async def f(stream):\n    with trio.fail_after(5):\n        await stream.receive_some(10)\n",
        "async def f(conn):\n    with trio.move_on_after(1), other():\n        await conn.receive()\n",
        "async def f(s):\n    with trio.CancelScope(deadline=d):\n        await s.send_all(b'')\n",
        "async def f(chan):\n    await chan.send(msg)\n",  # a memory channel, not the network
    ],
)
def test_the_lint_accepts_awaits_under_a_deadline(body: str) -> None:
    assert not list(unbounded_awaits(body, "bridge_server/x.py")), body


def test_a_blocking_usb_call_in_a_thread_counts_only_in_the_usb_package() -> None:
    body = "async def f(dev):\n    await trio.to_thread.run_sync(dev.read, 10)\n"
    assert list(unbounded_awaits(body, "bridge_server/usb/transport.py"))
    assert not list(unbounded_awaits(body, "bridge_server/guard/audit.py"))


def test_every_network_and_usb_await_in_the_daemons_has_a_deadline_or_a_reviewed_reason() -> None:
    found = _scan()
    assert len(found) >= 10, "the scan found too few awaits; did the layout change?"
    unreviewed = {key: lines for key, lines in found.items() if key not in REVIEWED}
    assert not unreviewed, (
        "awaits on the network or USB with no deadline in their function; wrap them in "
        f"trio.fail_after/move_on_after or review them in REVIEWED: {unreviewed}"
    )


def test_every_reviewed_exception_still_exists() -> None:
    stale = sorted(set(REVIEWED) - set(_scan()))
    assert not stale, f"REVIEWED names awaits that are gone or now bounded; remove them: {stale}"


def test_the_known_gaps_are_the_ones_docs_reliability_lists() -> None:
    gaps = sorted(key for key, why in REVIEWED.items() if why.startswith("gap:"))
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [key for key in gaps if f"`{key}`" not in doc]
    assert not missing, f"docs/reliability.md P5 should list the known unbounded awaits: {missing}"
