"""The one admin dispatcher: the local control socket and the wire's AdminRequest both land here.

Who may ask is decided before: the control socket is trusted by its file permissions (actor
`local:<uid>`), the wire only forwards requests from identities on `admins` (actor = the
certificate name). Every action is logged as `admin.action_done` / `admin.action_failed` with the
actor. Answers are `(ok, result, error)`; an error says what was wrong and what to do.

Actions: `status`, `lease.revoke {token}`, `token.reset {token}`, `pin-guard.reset {token}`,
`server-pin.test {token}` (issue 16),
and for simulator tokens only `simulator.unplug {token}`, `simulator.replug {token, serial?}`,
`simulator.evidence {token}` (test hooks).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from bridge_server.observe.status import build_status
from bridge_server.tokens.manager import TokenManager
from bridge_server.view import ServerView
from protocol.errors import LocalProtocolError
from protocol.wire import AdminResponse, encode_message

if TYPE_CHECKING:  # the simulator is a test and demo feature: no import at run time
    from bridge_server.simulator.usb_token import SimulatedToken

log = structlog.get_logger(__name__)

Answer = tuple[bool, dict[str, Any], str]
PIN_TEST_TIMEOUT_S: Final = 10.0  # below the admin client's 15 s request timeout


class AdminError(Exception):
    """A request that cannot be honoured; the message goes back to the admin."""


class AdminDispatcher:
    """Maps action names to handlers on a running `BridgeServer`."""

    def __init__(self, server: ServerView) -> None:
        self.server = server
        self._actions: dict[str, Callable[[Mapping[str, Any], str], Awaitable[dict[str, Any]]]] = {
            "status": self._status,
            "lease.revoke": self._lease_revoke,
            "token.reset": self._token_reset,
            "pin-guard.reset": self._pin_guard_reset,
            "server-pin.test": self._server_pin_test,
            "simulator.unplug": self._sim_unplug,
            "simulator.replug": self._sim_replug,
            "simulator.evidence": self._sim_evidence,
        }

    @property
    def actions(self) -> tuple[str, ...]:
        return tuple(self._actions)

    async def handle(self, action: str, args: Mapping[str, Any] | None, *, actor: str) -> Answer:
        handler = self._actions.get(action)
        if handler is None:
            known = ", ".join(self._actions)
            return False, {}, f"unknown action {action[:64]!r}; known actions: {known}"
        if not isinstance(args, Mapping):
            return False, {}, "args must be a JSON object"
        try:
            result = await handler(args, actor)
        except AdminError as exc:
            log.warning("admin.action_failed", action=action, actor=actor, error=str(exc))
            return False, {}, str(exc)
        if action != "status" and action != "simulator.evidence":
            log.info("admin.action_done", action=action, actor=actor, token=args.get("token"))
        return True, result, ""

    # -- helpers -------------------------------------------------------------------------------

    def _token(self, args: Mapping[str, Any]) -> TokenManager:
        name = args.get("token")
        if not isinstance(name, str) or not name:
            raise AdminError("missing argument 'token' (a token name from the server config)")
        for tok in self.server.tokens:
            if tok.name == name:
                return tok
        known = ", ".join(t.name for t in self.server.tokens) or "none"
        raise AdminError(f"no token named {name!r} on this server; configured tokens: {known}")

    def _simulated(self, args: Mapping[str, Any]) -> tuple[TokenManager, SimulatedToken]:
        tok = self._token(args)
        if tok.simulated is None:
            raise AdminError(
                f"token {tok.name!r} is a real device; simulator actions only work on simulate: tokens"
            )
        return tok, tok.simulated

    # -- actions -------------------------------------------------------------------------------

    async def _status(self, _args: Mapping[str, Any], _actor: str) -> dict[str, Any]:
        return build_status(self.server)

    async def _lease_revoke(self, args: Mapping[str, Any], _actor: str) -> dict[str, Any]:
        tok = self._token(args)
        holder = tok.book.holder
        if holder is None:
            return {"token": tok.name, "revoked": None, "message": f"token {tok.name!r} had no lease"}
        await tok.revoke_lease()
        return {
            "token": tok.name,
            "revoked": {"identity": holder.identity, "epoch": holder.epoch, "conn_id": holder.conn_id},
            "message": f"lease of {holder.identity} (epoch {holder.epoch}) revoked; the next waiter gets it",
        }

    async def _token_reset(self, args: Mapping[str, Any], _actor: str) -> dict[str, Any]:
        tok = self._token(args)
        holder = tok.book.holder
        await tok.reset_token()
        return {
            "token": tok.name,
            "revoked": holder.identity if holder else None,
            "message": f"token {tok.name!r}: lease ended, usb device released and reopened (cold reset)",
        }

    async def _pin_guard_reset(self, args: Mapping[str, Any], actor: str) -> dict[str, Any]:
        tok = self._token(args)
        return self.server.reset_pin_guard(tok.name, actor)

    async def _server_pin_test(self, args: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """`tokenbridge pin test`: the token task checks the server-held PIN (tokens/pin_check.py)."""
        tok = self._token(args)
        with trio.move_on_after(PIN_TEST_TIMEOUT_S):
            try:
                return await tok.check_server_pin(actor)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise AdminError(f"token {tok.name!r} is shutting down; nothing was tested") from None
        raise AdminError(f"token {tok.name!r} did not answer the PIN test within {PIN_TEST_TIMEOUT_S:g} s")

    async def _sim_unplug(self, args: Mapping[str, Any], _actor: str) -> dict[str, Any]:
        tok, sim = self._simulated(args)
        sim.unplug()
        return {"token": tok.name, "plugged": False}

    async def _sim_replug(self, args: Mapping[str, Any], _actor: str) -> dict[str, Any]:
        tok, sim = self._simulated(args)
        serial = args.get("serial")
        if serial is not None and not isinstance(serial, str):
            raise AdminError("'serial' must be a string")
        sim.replug(serial=serial)
        return {"token": tok.name, "plugged": True, "serial": sim.serial}

    async def _sim_evidence(self, args: Mapping[str, Any], _actor: str) -> dict[str, Any]:
        tok, sim = self._simulated(args)
        ev = sim.evidence
        c = ev.snapshot()
        return {
            "token": tok.name,
            "apdus": [[r.epoch, r.ins] for r in ev.apdus],
            "events": [list(e) for e in ev.events],
            "counters": {
                "power_ons": c.power_ons,
                "power_offs": c.power_offs,
                "warm_resets": c.warm_resets,
                "pin_attempts": c.pin_attempts,
                "signatures": c.signatures,
                "apdus": c.apdus,
            },
        }


# The wire carries an admin `result` as a bounded JSON document (protocol/_wire_fields.py: depth
# <= 8, <= 50,000 values, strings <= 1,024 characters; the frame <= 1 MiB). An answer that does
# not fit is replaced by a clear error instead of breaking the admin's session.
def wire_result(ok: bool, result: dict[str, Any], error: str) -> Answer:
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
