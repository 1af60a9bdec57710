"""The server's half of verified speculation (issue 17; theory in protocol/speculation.py).

Plain sync bookkeeping beside the token task:

- `PathRecorder`, one per lease: the steps the card gave from the grant's cold reset up to,
  not including, the first command that is not a plain read (VERIFY of any kind, GET
  CHALLENGE, crypto, management, anything the policy refused) or a power event. What it keeps
  is what any client allowed on the token reads without a PIN.
- `SpeculationBook`, one per token: the paths learnt from those recordings, keyed by the card's
  identity (its ATR, and its content: a contradicting answer replaces every path; a command
  that may change the content, a re-plug or an admin reset withdraws them all).
- `replay_matches`: the one rule of the replay check. A deferred step stands only if the card,
  asked again, gave byte for byte the answer the client already gave its application.
"""

from __future__ import annotations

from typing import Any, Final

from protocol.speculation import (
    MAX_STEP_BYTES,
    MAX_STEPS,
    MAX_STEPS_BYTES,
    SpeculationPaths,
    Step,
    merge_path,
    paths_size,
    speculable_command,
)

# INS after which every read still answers as before (ISO 7816-4/-8): reads, PIN verification
# (volatile security state), authentication and crypto with a key, GET CHALLENGE, MANAGE
# SECURITY ENVIRONMENT, and the YubiKey's GET VERSION / GET SERIAL. Any other instruction
# that reaches the card (PUT DATA, GENERATE KEY, CHANGE REFERENCE DATA, IMPORT KEY, ...) may
# change what the card answers, so the paths are withdrawn.
CONTENT_SAFE_INS: Final = frozenset(
    {
        0xA4,
        0xB0,
        0xB1,
        0xB2,
        0xB3,
        0xCA,
        0xCB,
        0xC0,
        0x20,
        0x21,
        0x84,
        0x86,
        0x87,
        0x88,
        0x2A,
        0x22,
        0xFD,
        0xF8,
    }
)


def may_change_content(command: bytes) -> bool:
    """True when `command`, having reached the card, may change what a later read returns."""
    return len(command) < 2 or command[1] not in CONTENT_SAFE_INS


def replay_matches(promised: bytes, answered: bytes | None) -> bool:
    """A deferred step stands only if the card answered (`answered` is not None: no refusal,
    no device failure) exactly what the client promised."""
    return answered is not None and answered == promised


class PathRecorder:
    """One lease's steps from power-on; see the module docstring."""

    def __init__(self, atr: bytes) -> None:
        self.atr = atr
        self.steps: list[Step] = []
        self.open = True
        self.content_changed = False
        self._bytes = 0

    def note(self, command: bytes, response: bytes | None) -> None:
        """One command of this lease; `response` None: it did not reach the card (refused)."""
        if response is not None and may_change_content(command):
            self.content_changed = True
        if not self.open:
            return
        size = self._bytes + len(command) + len(response or b"")
        if response is None or not speculable_command(command) or len(self.steps) >= MAX_STEPS:
            self.open = False  # the card's state may now depend on more than its content
            return
        if size > MAX_STEPS_BYTES or max(len(command), len(response)) > MAX_STEP_BYTES:
            self.open = False  # a path must fit one SpeculationPaths message (protocol/speculation.py)
            return
        self._bytes = size
        self.steps.append((command, response))

    def interrupt(self) -> None:
        """A power event or anything but an APDU: later steps no longer follow from power-on."""
        self.open = False


class SpeculationBook:
    """One token's taught paths and counters; see the module docstring."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.atr = b""
        self.paths: list[tuple[Step, ...]] = []
        self.hits = 0  # deferred steps that the replay confirmed
        self.mismatches = 0  # replays that ended a lease as card_changed
        self.prefetched = 0  # GET RESPONSEs the server ran ahead of the client
        self.withdrawals = 0  # times every path was dropped (content changed, re-plug, reset, off)

    def learn(self, recorder: PathRecorder) -> bool:
        """Take a finished lease's recording; True when the paths changed (teach them again)."""
        if recorder.content_changed or not self.enabled:
            return self.forget()
        changed = False
        if recorder.atr != self.atr:
            changed = self.forget()
            self.atr = recorder.atr
        kept, conflict = merge_path(self.paths, tuple(recorder.steps))
        if conflict:
            self.withdrawals += 1
        if kept != self.paths:
            self.paths, changed = kept, True
        return changed

    def forget(self) -> bool:
        """Withdraw every path; True if there were any."""
        if not self.paths:
            return False
        self.paths = []
        self.withdrawals += 1
        return True

    def message(self, token_id: int) -> SpeculationPaths:
        return SpeculationPaths(token_id=token_id, paths=tuple(self.paths) if self.enabled else ())

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "paths": len(self.paths),
            "steps": sum(len(p) for p in self.paths),
            "bytes": paths_size(self.paths),
            "hits": self.hits,
            "mismatches": self.mismatches,
            "prefetched": self.prefetched,
            "withdrawals": self.withdrawals,
        }
