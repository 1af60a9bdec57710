"""The machine words on the wire: every value a peer may put in a word field (docs/protocol.md).

Three fields carry a word from a closed, documented vocabulary:

| field | enum | docs/protocol.md |
|---|---|---|
| `ErrorMessage.code` | `ErrorCode` | §6 |
| `Refused.reason` | `RefusalReason` | §4.2 |
| `LeaseEnded.reason` | `LeaseEndReason` | §5.3 |

The codec (`protocol/_wire_fields.py`) holds both ends to one rule, the forward-compatibility
rule of docs/protocol.md §6:

- **a sender speaks only the vocabulary**: encoding a value that is not a member (or the text
  of one) is a `LocalProtocolError`. A new word is added here, in the docs table, and shipped
  before anyone sends it;
- **a receiver accepts words it does not know**: a newer peer may send one. Decoding returns
  the enum member for a known word and the plain `str` otherwise (any valid `text`), so
  `msg.code == ErrorCode.STALE_EPOCH` works either way and unknown words are only logged.

`Goodbye.reason`, `Refused.message` and `ErrorMessage.message` are text for a human, not
words: the machine word of a `Goodbye` is its close code (`protocol.errors.CloseCode`, §7).
`tests/protocol/test_vocabulary.py` compares every enum here with its table in
docs/protocol.md, in both directions.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["WORD_ENUMS", "ErrorCode", "LeaseEndReason", "RefusalReason"]


class ErrorCode(StrEnum):  # ruff S105 below: "token" in a name is a USB token, not a secret
    """`ErrorMessage.code`: why a request was refused; the connection stays open (§6)."""

    LEASE_REQUIRED = "lease_required"
    STALE_EPOCH = "stale_epoch"
    QUEUE_TIMEOUT = "queue_timeout"
    NOT_ALLOWED = "not_allowed"
    UNKNOWN_TOKEN = "unknown_token"  # noqa: S105
    ALREADY_LEASED = "already_leased"
    PIN_GUARD = "pin_guard"
    COMMAND_REFUSED = "command_refused"
    BAD_CCID = "bad_ccid"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    SHUTTING_DOWN = "shutting_down"
    SHUTDOWN = "shutdown"


class RefusalReason(StrEnum):
    """`Refused.reason`: why the server will not open this connection (§4.2)."""

    NOT_ALLOWED = "not_allowed"
    CERTIFICATE_PURPOSE = "certificate_purpose"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TOO_MANY_REQUESTS = "too_many_requests"


class LeaseEndReason(StrEnum):
    """`LeaseEnded.reason` values (§5.3), also the server's own lease bookkeeping.

    `released` and `linger_expired` are endings the client asked for; every other reason means
    the card was taken away from a holder that may still believe it is logged in.
    `disconnected`, `heartbeat_lost` and `queue_timeout` end a lease or a wait whose client
    cannot be told with a `LeaseEnded`; they appear in logs and the audit trail.
    """

    RELEASED = "released"
    LINGER_EXPIRED = "linger_expired"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_HOLD = "max_hold"
    DISCONNECTED = "disconnected"
    HEARTBEAT_LOST = "heartbeat_lost"
    TOKEN_GONE = "token_gone"  # noqa: S105
    DEVICE_ERROR = "device_error"
    REVOKED = "revoked"
    QUEUE_TIMEOUT = "queue_timeout"
    SHUTDOWN = "shutdown"
    CARD_CHANGED = "card_changed"  # a replayed deferred APDU got another answer (issue 17)


WORD_ENUMS: tuple[type[StrEnum], ...] = (ErrorCode, RefusalReason, LeaseEndReason)
