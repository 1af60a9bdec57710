"""`tokenbridge pin test TOKEN`: check the server-held PIN against the card without risking it.

Run by the token task between leases (`CheckServerPin`), so nothing else talks to the card:

1. refuse at once if the token has no server PIN, it is missing, or the PIN guard is engaged;
2. cold-reset the card and SELECT the PIV application (SP 800-73-4 Part 2 §3.1.1); only the
   PIV families are checked (their application and PIN references are known);
3. read the retry counter with the empty VERIFY (§3.2.1: spends nothing; 63Cx says x retries,
   9000 "already verified", which a card fresh from a reset never says); refuse when x is at or
   below `pin_guard.min_retries_left`, or the answer is not a counter;
4. VERIFY with the server-held PIN, through the same guard as a client's (counted, audited as
   `server_pin: true`, a rejection engages the guard at once), then power the card off.

The result says what happened; it never carries the PIN.
"""

from __future__ import annotations

from typing import Any, Final

from bridge_server.errors import DeviceError
from bridge_server.guard.guardrails import Guardrails, Holder
from bridge_server.guard.server_pin import PAD_BYTE, PLACEHOLDER, wipe
from bridge_server.tokens.virtual_reader import CardDriver
from protocol.apdu import SW_UNKNOWN, describe_sw, retries_left

PIV_SELECT: Final = bytes.fromhex("00A4040009A00000030800001000")  # PIV AID, SP 800-73-4 Part 2 §3.1.1
PIV_FAMILIES: Final = ("piv", "yubikey")
PIV_PIN_FIELD: Final = 8


class PinCheckRefused(Exception):
    """The check did not present the PIN; the message says why and what to do."""


def _sw(rapdu: bytes) -> int:
    return rapdu[-2] << 8 | rapdu[-1] if len(rapdu) >= 2 else SW_UNKNOWN


def preflight(rails: Guardrails, family: str) -> int:
    """The reference to check, or PinCheckRefused before the card is touched."""
    config = rails.server_pin.config
    if config is None:
        raise PinCheckRefused(f"token {rails.token!r} has no server_pin section (docs/ops.md)")
    if config.pin is None:
        raise PinCheckRefused(f"token {rails.token!r} has no server PIN loaded: {config.problem}")
    if family not in PIV_FAMILIES:
        raise PinCheckRefused(f"pin test knows the PIV application only; token {rails.token!r} is {family!r}")
    if rails.guard.engaged(rails.token):
        raise PinCheckRefused(
            f"the PIN guard of {rails.token!r} is engaged ({rails.guard.status(rails.token)['reason']}); "
            f"fix the cause, then `tokenbridge pin-guard reset {rails.token}` before testing"
        )
    return min(config.references)


async def answer_check(
    driver: CardDriver | None, rails: Guardrails, actor: str, family: str, busy: str | None
) -> tuple[dict[str, Any], DeviceError | None]:
    """The token task's `CheckServerPin`: the answer for the admin, audited, and a device failure
    the task must handle (`busy`: why the card cannot be used now, e.g. "leased by build-vm-01")."""
    failure = None
    try:
        if driver is None or busy is not None:
            raise PinCheckRefused(
                f"token {rails.token!r} is {busy}; run pin test when it is present and free"
            )
        answer = await check_server_pin(driver, rails, Holder(actor, (actor,), admin=True), family)
    except PinCheckRefused as exc:
        answer = {"token": rails.token, "ok": False, "refused": True, "message": str(exc)}
    except DeviceError as exc:
        answer = {"token": rails.token, "ok": False, "refused": False, "message": f"the card failed: {exc}"}
        failure = exc
    await rails.record("server_pin.tested", actor=actor, ok=answer["ok"], message=answer["message"])
    return answer, failure


async def check_server_pin(
    driver: CardDriver, rails: Guardrails, actor: Holder, family: str
) -> dict[str, Any]:
    """Steps 1-4 of the module docstring. Raises PinCheckRefused or DeviceError."""
    ref = preflight(rails, family)
    await driver.power_off()
    await driver.power_on()
    try:
        select = _sw(await driver.transmit(PIV_SELECT))
        if select != 0x9000 and select >> 8 != 0x61:
            raise PinCheckRefused(f"the card did not select the PIV application ({describe_sw(select)})")
        query = bytes((0x00, 0x20, 0x00, ref))
        answer = await driver.transmit(query)
        await rails.record_guard_events(rails.observe(query, answer, actor), actor)
        left = retries_left(_sw(answer))
        if left is None or left <= rails.guard.min_retries_left:
            raise PinCheckRefused(
                f"the card answers the retry query with {describe_sw(_sw(answer))}; at or below "
                f"pin_guard.min_retries_left ({rails.guard.min_retries_left}), or unknown: "
                "not risking a retry"
            )
        return await _verify(driver, rails, actor, ref, left)
    finally:
        await driver.power_off()


async def _verify(
    driver: CardDriver, rails: Guardrails, actor: Holder, ref: int, left: int
) -> dict[str, Any]:
    placeholder = bytes((0x00, 0x20, 0x00, ref, PIV_PIN_FIELD)) + PLACEHOLDER.ljust(
        PIV_PIN_FIELD, bytes((PAD_BYTE,))
    )
    if rails.guard.check(rails.token, 0x20, ref, True) is not None or not rails.state_saved():
        raise PinCheckRefused("the PIN guard refuses PIN commands now (see `tokenbridge status`)")
    secret = rails.server_pin.substitute(placeholder)
    try:
        answer = await driver.transmit(bytes(secret))
    except DeviceError:
        # The card may have compared it: counted as a failed attempt, like a client's lost answer.
        await rails.record_guard_events(
            rails.observe(placeholder, SW_UNKNOWN.to_bytes(2, "big"), actor), actor
        )
        raise
    finally:
        wipe(secret)
    await rails.record_guard_events(rails.observe(placeholder, answer, actor), actor)
    sw = _sw(answer)
    ok = sw == 0x9000
    return {
        "token": rails.token,
        "ok": ok,
        "refused": False,
        "retries_before": left,
        "sw": f"{sw:04X}",
        "message": (
            f"the server-held PIN of {rails.token!r} is correct (the card had {left} retries left; now full)"
            if ok
            else f"the card rejected the server-held PIN ({describe_sw(sw)}); the PIN guard is engaged: "
            f"fix it with `tokenbridge pin set {rails.token}`, reload, then `tokenbridge pin-guard reset "
            f"{rails.token}`"
        ),
    }
