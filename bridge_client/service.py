"""Running tokenbridge-client as a systemd service: readiness, STATUS= lines, SIGHUP reload.

- Readiness (issue 8): `READY=1` once the vpcd readers run and the tunnel's first attempt
  has ended, connected or failed and retrying: "started" means the client is doing its job,
  not that the server is up (a build VM that boots before the token host must not fail).
- `STATUS=` says what the tunnel and each reader are doing, sent whenever it changes.
- SIGHUP re-reads only the config file's `tls` section (`load_tls_files`, not the whole
  file) and builds a new client context for the next connection; the open tunnel keeps its
  session. A broken file keeps the old context and is logged as `reload.failed`. Other
  settings need a restart.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

import structlog
import trio

from bridge_client.config import load_tls_files
from protocol.errors import BridgeError
from protocol.runtime.tls import client_context

log = structlog.get_logger(__name__)

# Tunnel states that end the first attempt (bridge_client.tunnel.TunnelStatus.state).
ATTEMPT_DONE: Final = frozenset({"connected", "retrying", "refused"})
MAX_STATUS_LENGTH: Final = 200


def status_line(tunnel_state: str, reason: str, readers: list[tuple[str, str]]) -> str:
    """One STATUS= text: the tunnel, then `token: reader state` per reader."""
    text = f"tunnel {tunnel_state}" + (f" ({reason})" if reason else "")
    text += "; " + ", ".join(f"{token}: {state}" for token, state in readers)
    return text if len(text) <= MAX_STATUS_LENGTH else text[: MAX_STATUS_LENGTH - 3] + "..."


def app_status(app: Any) -> str:
    st = app.tunnel.status
    readers = [(link.token, link.status.state) for link in app.links]
    readers += [(r.token, f"{r.status.state} (usbip {r.busid})") for r in app.usbip_readers]
    return status_line(st.state, st.reason, readers)


async def wait_first_attempt(tunnel: Any) -> None:
    """Return once the tunnel has connected or failed at least once."""
    while tunnel.status.state not in ATTEMPT_DONE:
        await tunnel.wait_changed()


async def report_status(app: Any, *, interval_s: float = 1.0) -> None:
    """Send `STATUS=` on change. Reader states change without a tunnel event, so also poll."""
    last = ""
    while True:
        text = app_status(app)
        if text != last:
            app.notifier.notify(STATUS=text)
            last = text
        with trio.move_on_after(interval_s):
            await app.tunnel.wait_changed()


def reload_tls(app: Any) -> bool:
    """Build a new client context from the config file's tls files; keep the old on failure."""
    path = app.config.path
    try:
        tls = load_tls_files(path)
        ctx: ssl.SSLContext = client_context(ca=tls.ca, cert=tls.cert, key=tls.key)
    except (BridgeError, OSError, ssl.SSLError, ValueError) as exc:
        log.error(
            "reload.failed",
            what="tls",
            path=str(path),
            reason=str(exc),
            kept="the previous certificate, key and CA stay in use",
        )
        return False
    app.tunnel.ssl_context = ctx
    log.info(
        "reload.applied",
        what="tls",
        files=[str(tls.ca), str(tls.cert), str(tls.key)],
        reason="used from the next connection; the open tunnel keeps its session",
    )
    return True
