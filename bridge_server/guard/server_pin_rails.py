"""The server-held PIN on one token's APDU path (issue 16): the glue between `Guardrails` and
the pure `server_pin` module.

`Guardrails` owns one `ServerPinRails` per token and calls it at three points:

1. `screen` (after the command policy and the PIN guard let a PIN command through): refuse what
   `server_pin.decide` refuses, and a listed identity's placeholder while the PIN is missing;
2. `apdu` (the `VirtualReader` rewrite hook, right before the card): the VERIFY with the real PIN,
   as a bytearray the reader wipes after sending; it notes that this exchange was substituted;
3. `after_observe` (the card's answer): the audit's Attempt says `server_pin: true`, and a
   wrong stored PIN (63Cx or 6983) engages the guard at once with `SERVER_PIN_REJECTED`,
   whatever `pin_guard.max_failures` says: the same PIN would be wrong again.

The token task is one loop, so "this exchange was substituted" is one flag set by `apdu` and
consumed by the next `take_substituted` (the answer, or the lost answer, of that same command).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Final

import structlog

from bridge_server.guard.pin_guard import Attempt, Engaged, PinGuard
from bridge_server.guard.server_pin import Decision, Verdict, decide, fill
from bridge_server.guard.server_pin_config import ServerPinConfig

log = structlog.get_logger(__name__)

SERVER_PIN_REJECTED: Final = "server_pin_rejected"
REJECTED_MESSAGE: Final = "server PIN rejected by the card"


class ServerPinRails:
    def __init__(self, token: str, config: ServerPinConfig | None = None) -> None:
        self.token = token
        self.config: ServerPinConfig | None = None
        self._substituted = False
        self.configure(config)

    def configure(self, config: ServerPinConfig | None) -> None:
        """A (re)loaded config: the old PIN is overwritten once nothing uses it any more."""
        old, self.config = self.config, config
        if old is not None and old.pin is not None and (config is None or config.pin is not old.pin):
            old.pin.wipe()
        if config is None:
            return
        if config.pin is None:
            log.error("server_pin.missing", token=self.token, source=config.source, reason=config.problem)
        else:
            log.info("server_pin.loaded", token=self.token, source=config.source)

    def listed(self, names: Iterable[str]) -> bool:
        return self.config is not None and any(n in self.config.identities for n in names)

    def _decide(self, raw: bytes, names: Iterable[str]) -> Decision:
        assert self.config is not None
        pin = self.config.pin
        return decide(
            raw,
            listed=self.listed(names),
            references=self.config.references,
            pin_length=0 if pin is None else len(pin),
        )

    def screen(self, raw: bytes, names: Iterable[str]) -> tuple[str, str] | None:
        """None, or (kind, detail) of a refusal: "server_pin" or "server_pin_missing"."""
        if self.config is None:
            return None
        decision = self._decide(raw, names)
        if decision.verdict is Verdict.REFUSE:
            return "server_pin", decision.detail
        if decision.verdict is Verdict.SUBSTITUTE and self.config.pin is None:
            return "server_pin_missing", self.config.problem
        return None

    def apdu(self, raw: bytes, names: Iterable[str]) -> bytearray | None:
        """The command to send instead of `raw` (the caller wipes it), or None to send `raw`."""
        if self.config is None or self.config.pin is None:
            return None
        if self._decide(raw, names).verdict is not Verdict.SUBSTITUTE:
            return None
        self._substituted = True
        return fill(raw, self.config.pin.value)

    def substitute(self, raw: bytes) -> bytearray:
        """`pin test` (an operator's check, not a client's command): `raw` with the PIN, noted."""
        pin = None if self.config is None else self.config.pin
        assert pin is not None  # pin_check.preflight checked it
        self._substituted = True
        return fill(raw, pin.value)

    def take_substituted(self) -> bool:
        was, self._substituted = self._substituted, False
        return was

    def after_observe(
        self, events: list[Attempt | Engaged], guard: PinGuard, now: float
    ) -> list[Attempt | Engaged]:
        """The guard's events for a substituted VERIFY, marked, plus the engagement if rejected."""
        out: list[Attempt | Engaged] = [
            replace(e, server_pin=True) if isinstance(e, Attempt) else e for e in events
        ]
        rejected = [e for e in out if isinstance(e, Attempt) and e.outcome in ("wrong_pin", "blocked")]
        for attempt in rejected:
            engaged = guard.engage(self.token, attempt.ref, SERVER_PIN_REJECTED, now)
            if engaged is not None:
                out.append(engaged)
                log.error(
                    "server_pin.rejected", token=self.token, sw=f"{attempt.sw:04X}", reason=REJECTED_MESSAGE
                )
        return out

    def status(self, guard: PinGuard) -> dict[str, Any] | None:
        """For `status` (docs/status.md): configured / missing / rejected, never the PIN."""
        cfg = self.config
        if cfg is None:
            return None
        refs = guard.tokens.get(self.token, {}).values()
        rejected = any(r.engaged and r.reason == SERVER_PIN_REJECTED for r in refs)
        state = "rejected" if rejected else "configured" if cfg.pin is not None else "missing"
        message = {
            "rejected": f"{REJECTED_MESSAGE}: fix the stored PIN (tokenbridge pin set {self.token}), "
            f"reload, then tokenbridge pin-guard reset {self.token}",
            "missing": f"no server PIN: {cfg.problem}",
            "configured": "",
        }[state]
        return {
            "state": state,
            "source": cfg.source,
            "for": list(cfg.identities),
            "references": [f"{r:02X}" for r in sorted(cfg.references)],
            "message": message,
        }
