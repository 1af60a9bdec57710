"""PIN guard (DESIGN §4, reliability-anchors §4.1): stop a wrong PIN before it locks the token.

Theory of operation
-------------------
The guard is pure policy: the token task shows it every VERIFY-class command (INS 20/21
VERIFY, 24/25 CHANGE REFERENCE DATA, 2C/2D RESET RETRY COUNTER) *before* it reaches the card
(`check`) and the status word that came back (`observe`). It never sends, stores or retries a
PIN; it only ever sees the command header, whether the command carries data, and the SW.

State is kept per token and per reference data: the PIN reference in P2 for VERIFY and
CHANGE REFERENCE DATA, and `"<P2>/reset"` for RESET RETRY COUNTER, whose attempts spend the
reset code's (PUK's) counter rather than the PIN's. For each reference it remembers the
consecutive failures (across leases and restarts), the retries the card last reported
(63Cx) and, once engaged, why and since when.

Per card: which references share one retry counter is the card's business (OpenPGP VERIFY 81
and 82 both spend PW1's; PIV 00 and 80 are two PINs), so the guard counts and engages for the
whole card. Its failures are the sum of the references' consecutive failures; a success clears
only its own reference's (a correct PIN does not restore the PUK's counter). The sum is never
below what any one counter of the card spent since its last reset, so `max_failures` bounds each
of them whatever the aliasing. An engaged reference refuses PIN commands for all references.

It engages when
- the card reports x ≤ `min_retries_left` retries for a reference (63Cx, also from the
  empty-VERIFY status query, so a token that is already low is guarded before anyone tries a PIN);
- the card's failures reach `max_failures` (the card's own counter may be unreadable:
  anchors §4.1 "the guard must also keep its own counter");
- the card answers 6983 (authentication blocked): the token is locked (`locked: true`).

While engaged, VERIFY-class commands carrying data are refused without reaching the card,
answered with `REFUSAL_SW`. The empty-data VERIFY (the ISO 7816-4 / SP 800-73-4 status query,
which never spends a retry) still passes, so middleware can show the card's real counter. Only
an operator clears the state (`reset`).

Chained PIN commands (CLA b5, ISO 7816-4 §5.4.1) are refused with `CHAINING_REFUSAL_SW`, engaged
or not: "has data" and the status word only mean something for a whole command (a card answers
9000 to a link and compares the PIN when the data-less last link arrives).

Counted as a failure: any answer to a data-carrying PIN command other than 9000/61xx, except
the status words that say the card never compared a PIN (wrong length, wrong P1/P2, unknown
reference, unsupported INS): counting unknown answers is the safe side (anchors §4.1 caveat
on wrapped or proprietary status words).

Persistence: `PinGuardStore` writes the whole state as one small JSON document
(write, fsync, rename, fsync the folder), synchronously and before the card's answer goes
back to the client: a crash right after a failure must not forget it. Writes happen when the
state changes (a failure, an engagement, a changed retry count, a reset) and, from
`Guardrails`, once at start and before each data-carrying PIN command; measured on ext4 (virtio
disk): p50 0.6-0.7 ms, p99 12 ms (docs/guardrails.md). If a save fails (a full disk), the store
keeps the reason in `problem` and `Guardrails` refuses every data-carrying PIN command until a
save succeeds again (fail closed: a failure the guard cannot persist would be forgotten by a
restart).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from bridge_server.guard.state_files import read_bytes, write_whole
from protocol.apdu import PIN_INS, SW_AUTH_BLOCKED, SW_CHAINING_NOT_SUPPORTED, retries_left

# What a refused PIN command gets (docs/guardrails.md): 6983 "authentication method blocked",
# which OpenSC maps to SC_ERROR_AUTH_METHOD_BLOCKED -> CKR_PIN_LOCKED, so middleware and CI
# tools stop at once instead of asking for the PIN again (63C0 would read as CKR_PIN_INCORRECT,
# telling the user their correct PIN is wrong).
REFUSAL_SW: Final = SW_AUTH_BLOCKED
# What a chained PIN command gets (DESIGN §4: never judged per chunk): 6884 "command chaining not
# supported", an error to middleware that is about the encoding, not the PIN or the guard's state.
CHAINING_REFUSAL_SW: Final = SW_CHAINING_NOT_SUPPORTED
STATE_VERSION: Final = 1
_VERIFY_INS: Final = frozenset({0x20, 0x21})
_RESET_INS: Final = frozenset({0x2C, 0x2D})
# SWs that mean the card did not compare any reference data: not a spent retry.
_NOT_AN_ATTEMPT: Final = frozenset({0x6700, 0x6A80, 0x6A81, 0x6A86, 0x6A88, 0x6B00, 0x6D00, 0x6E00, 0x6881})


@dataclass(slots=True)
class RefState:
    """What the guard knows about one reference of one token (JSON-serialisable)."""

    failures: int = 0  # consecutive failed attempts
    retries_left: int | None = None  # last 63Cx the card reported
    engaged: bool = False
    locked: bool = False  # the card answered 6983
    reason: str = ""  # why engaged: "retries_low" | "max_failures" | "locked"
    engaged_at: float | None = None  # wall time
    last_failure_by: str = ""  # identity of the holder whose attempt failed last
    last_failure_at: float | None = None
    last_failure_sw: str = ""
    # The card's counter when an operator cleared the guard: staying there is accepted, going
    # lower (another wrong PIN) engages again. Forgotten after a correct PIN.
    acknowledged_retries: int | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one PIN presentation, for the audit log (status word only)."""

    ref: str
    ins: int
    sw: int
    outcome: str  # "ok" | "wrong_pin" | "blocked" | "not_checked" | "failed"
    retries_left: int | None
    failures: int
    server_pin: bool = False  # the server put its own PIN in (issue 16, guard/server_pin.py)


@dataclass(frozen=True, slots=True)
class Engaged:
    ref: str
    reason: str
    retries_left: int | None
    failures: int


GuardEvent = Attempt | Engaged


def reference_key(ins: int, p2: int) -> str:
    """The state key for a command: `"80"` for the PIN, `"80/reset"` for its reset code."""
    return f"{p2:02X}/reset" if ins in _RESET_INS else f"{p2:02X}"


def is_status_query(ins: int, has_data: bool) -> bool:
    """The empty VERIFY: asks for the retry counter, spends nothing (SP 800-73-4 Part 2 §3.2.1)."""
    return ins in _VERIFY_INS and not has_data


def _outcome(sw: int, *, chained: bool = False) -> str:
    if sw == 0x9000 or sw >> 8 == 0x61:
        # A card answers 9000 to a chain link before it has seen the whole PIN: no verdict.
        return "failed" if chained else "ok"
    if sw == SW_AUTH_BLOCKED:
        return "blocked"
    if sw >> 4 == 0x63C:
        return "wrong_pin"
    if sw in _NOT_AN_ATTEMPT:
        return "not_checked"
    return "failed"


@dataclass(slots=True)
class PinGuard:
    """Per token PIN guard, with per-reference details. See the module docstring."""

    min_retries_left: int = 2
    max_failures: int = 1
    tokens: dict[str, dict[str, RefState]] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------

    def refs(self, token: str) -> dict[str, RefState]:
        return self.tokens.setdefault(token, {})

    def failures(self, token: str) -> int:
        """The card's failures: the sum over its references (see "Per card" above)."""
        return sum(r.failures for r in self.tokens.get(token, {}).values())

    def engaged(self, token: str) -> bool:
        """Whether PIN commands carrying data are refused on the whole card."""
        refs = self.tokens.get(token, {}).values()
        # The second test matters only for a state saved per reference, or a lowered max_failures.
        return any(r.engaged for r in refs) or self.failures(token) >= self.max_failures

    def status(self, token: str) -> dict[str, Any]:
        """For `status`/metrics: no PIN material here, only counters, reasons and identities."""
        refs = self.tokens.get(token, {})
        # Flat on purpose: it travels inside the admin status answer, whose nesting is bounded.
        engaged = [(k, r) for k, r in sorted(refs.items()) if r.engaged]
        known = [r.retries_left for r in refs.values() if r.retries_left is not None]
        last = max(refs.values(), key=lambda r: r.last_failure_at or 0.0, default=None)
        failures = self.failures(token)
        reasons = [f"{k}: {r.reason}" for k, r in engaged]
        if not engaged and failures >= self.max_failures:
            reasons.append("card: max_failures")
        return {
            "engaged": self.engaged(token),
            "locked": any(r.locked for r in refs.values()),
            "reason": ", ".join(reasons),
            "since": min((r.engaged_at for _, r in engaged if r.engaged_at is not None), default=None),
            "failures": failures,
            "retries_left": min(known) if known else None,
            "last_failure_by": last.last_failure_by if last is not None else "",
            "min_retries_left": self.min_retries_left,
            "max_failures": self.max_failures,
        }

    # -- the two hooks ----------------------------------------------------------------------

    def check(self, token: str, ins: int, p2: int, has_data: bool, *, chained: bool = False) -> int | None:
        """None if the command may reach the card, else the status word to answer instead.

        `chained`: the CLA says more links follow (`protocol.apdu.is_chained`). A link is never
        judged on its own ("has data" and the SW belong to the whole command), so it is refused.
        `p2` does not matter: the guard engages per card.
        """
        if ins not in PIN_INS:
            return None
        if chained:
            return CHAINING_REFUSAL_SW
        if is_status_query(ins, has_data):
            return None
        # Per card: which references share a retry counter is the card's secret (p2 does not say).
        return REFUSAL_SW if self.engaged(token) else None

    def observe(
        self,
        token: str,
        ins: int,
        p2: int,
        has_data: bool,
        sw: int,
        *,
        holder: str,
        now: float,
        chained: bool = False,
    ) -> list[GuardEvent]:
        """Learn from the card's answer to a PIN command; returns what the audit should record.

        `check` refuses chain links, so `chained` is only ever True if a link reached the card
        some other way: then the answer is no verdict and is counted as a failure (fail closed).
        """
        if ins not in PIN_INS:
            return []
        key = reference_key(ins, p2)
        state = self.refs(token).setdefault(key, RefState())
        left = retries_left(sw)
        if left is not None:
            state.retries_left = left
        events: list[GuardEvent] = []
        if chained or not is_status_query(ins, has_data):
            self._attempt(state, ins, sw, holder=holder, now=now, chained=chained)
            events.append(
                Attempt(key, ins, sw, _outcome(sw, chained=chained), state.retries_left, self.failures(token))
            )
        if sw == SW_AUTH_BLOCKED:
            state.locked = True
        reason = self._engage_reason(token, state)
        if reason and not state.engaged:
            state.engaged, state.reason, state.engaged_at = True, reason, now
            events.append(Engaged(key, reason, state.retries_left, self.failures(token)))
        return events

    def _attempt(self, state: RefState, ins: int, sw: int, *, holder: str, now: float, chained: bool) -> None:
        outcome = _outcome(sw, chained=chained)
        if outcome == "ok":
            # Only this reference's failures: a correct PIN does not restore the PUK's counter.
            state.failures = 0
            if ins in _VERIFY_INS:
                state.retries_left = None  # a success resets the card's counter to its maximum
                state.acknowledged_retries = None
        elif outcome != "not_checked":
            state.failures += 1
            state.last_failure_by, state.last_failure_at, state.last_failure_sw = holder, now, f"{sw:04X}"

    def _engage_reason(self, token: str, state: RefState) -> str:
        if state.locked:
            return "locked"
        left, acked = state.retries_left, state.acknowledged_retries
        if left is not None and left <= self.min_retries_left and (acked is None or left < acked):
            return "retries_low"
        refs = self.tokens.get(token, {}).values()
        if self.failures(token) >= self.max_failures and not any(r.engaged for r in refs):
            return "max_failures"  # once per card, on the reference whose failure crossed the line
        return ""

    def engage(self, token: str, ref: str, reason: str, now: float) -> Engaged | None:
        """Engage for `reason` whatever the counters say (a server-held PIN the card rejected:
        trying it again cannot help). None if `ref` was already engaged for that reason."""
        state = self.refs(token).setdefault(ref, RefState())
        if state.engaged and state.reason == reason:
            return None
        state.engaged, state.reason = True, reason
        state.engaged_at = state.engaged_at if state.engaged_at is not None else now
        return Engaged(ref, reason, state.retries_left, self.failures(token))

    # -- operator ----------------------------------------------------------------------------

    def reset(self, token: str) -> dict[str, RefState]:
        """Operator: disengage `token`; returns what there was (for the operator's checklist).

        The card's current counter is acknowledged: a token already at the floor would otherwise
        re-engage on the next status query. The next failure engages again (`max_failures`, or
        a counter below the acknowledged one).
        """
        before = self.tokens.pop(token, {})
        self.tokens[token] = {
            k: RefState(retries_left=v.retries_left, acknowledged_retries=v.retries_left)
            for k, v in before.items()
            if v.retries_left is not None
        }
        return before

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> str:
        doc = {
            "version": STATE_VERSION,
            "tokens": {t: {k: asdict(v) for k, v in refs.items()} for t, refs in self.tokens.items() if refs},
        }
        return json.dumps(doc, indent=1, sort_keys=True)

    def load_json(self, text: str) -> None:
        """Replace the state with a saved document. Raises ValueError for a foreign document."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError(f"the pin guard state is a JSON {type(doc).__name__}, not an object")
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported pin guard state version {doc.get('version')!r}")
        tokens = doc.get("tokens")
        # Every level an object: anything else would escape open_guard as an AttributeError.
        if not isinstance(tokens, dict) or not all(
            isinstance(refs, dict) and all(isinstance(ref, dict) for ref in refs.values())
            for refs in tokens.values()
        ):
            raise ValueError("the pin guard state's tokens are not objects of objects")
        known = set(RefState.__dataclass_fields__)
        self.tokens = {
            str(t): {
                str(k): RefState(**{f: v for f, v in ref.items() if f in known}) for k, ref in refs.items()
            }
            for t, refs in tokens.items()
        }


def checklist(token: str, before: dict[str, RefState]) -> list[str]:
    """What an operator must check before (and after) clearing the guard of `token`."""
    if not before:
        return [
            f"the PIN guard of {token!r} was not engaged and had no failures recorded; nothing was cleared"
        ]
    items: list[str] = []
    for key, st in sorted(before.items()):
        who = (
            f" (last failure by {st.last_failure_by!r}, SW {st.last_failure_sw})"
            if st.last_failure_by
            else ""
        )
        left = "unknown" if st.retries_left is None else str(st.retries_left)
        items.append(
            f"reference {key}: {st.failures} consecutive failure(s){who}; "
            f"the card reported {left} retries left"
        )
        if st.locked:
            items.append(
                f"reference {key} is LOCKED on the card (6983): clearing the guard does not unlock it; "
                "unblock it with the PUK/administrator PIN, "
                "or re-initialise the token and re-issue the certificate"
            )
    items += [
        "fix the PIN stored in the CI secret of every client allowed on this token before re-running jobs",
        "stop retried/queued jobs first: each wrong PIN now spends one of the card's remaining retries",
        "after one successful signing, check `tokenbridge status` shows 0 failures for this token",
    ]
    return items


class PinGuardStore:
    """The guard's state file: loaded at start, rewritten whole (`write_whole`) on every change.

    `problem` is why the last save failed ("" once a save succeeded): while it is set the
    guard's state is not on disk, and `Guardrails` refuses PIN commands (fail closed).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.problem = ""
        self._lock = threading.Lock()

    def status(self) -> dict[str, str | None]:
        return {"path": None if self.path is None else str(self.path), "problem": self.problem}

    def load(self, guard: PinGuard) -> None:
        """Fill `guard` from the file if it exists. Raises ValueError/OSError for an unreadable file."""
        raw = None if self.path is None else read_bytes(self.path)
        if raw is not None:
            guard.load_json(raw.decode("utf-8"))

    def save(self, guard: PinGuard) -> None:
        """Write the whole state, or raise OSError and keep the old file (`problem` says why)."""
        if self.path is None:
            return
        text = guard.to_json()
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_whole(self.path, text.encode())
            except OSError as exc:
                self.problem = f"cannot save the PIN guard state to {self.path}: {exc.strerror or exc}"
                raise
            self.problem = ""
