"""tokenbridge's sans-I/O protocol codecs, and their small runtime helpers.

The public API is these modules (and the names below); a module whose name starts with `_`
is private: only code inside `protocol/` imports it (tests/protocol/test_public_api.py).
Within a public module, a name that starts with `_` is private too, and a module's
`__all__`, where it has one, is its whole public surface.

Pure (no I/O, clock or concurrency; tests/protocol/test_purity.py):

- `protocol.wire`: bridge frames and messages, `encode_message` / `decode_message`;
- `protocol.vocabulary`: the machine words on the wire (`ErrorCode`, `RefusalReason`,
  `LeaseEndReason`);
- `protocol.connection`: `BridgeConnection`, the h11-style state machine of one bridge
  connection;
- `protocol.errors`: `CloseCode` and the exception hierarchy;
- `protocol.ccid`, `protocol.apdu`, `protocol.atr`, `protocol.t1`: smart-card codecs
  (CCID messages, APDUs, ATRs, the T=1 block protocol for both reader and card);
- `protocol.ccid_stream`: CCID messages assembled from bulk-IN transfers of any size;
- `protocol.vpcd`: vsmartcard's vpcd socket protocol;
- `protocol.display`: how token states, ATRs and durations are shown to people;
- `protocol.speculation`: verified speculation (issue 17): the read-only command rule, GET
  RESPONSE prefetch, taught paths and their binary messages.

Runtime helpers (they do I/O; the daemons share them):

- `protocol.runtime.framed`: `FramedConnection`, a `BridgeConnection` over a trio stream;
- `protocol.runtime.connect`: the one connect-and-greet path, over `protocol.runtime.address`;
- `protocol.runtime.tls`, `protocol.runtime.config` with `protocol.runtime.schema`,
  `protocol.runtime.logging`, `protocol.runtime.sdnotify`, `protocol.runtime.metrics`.

`NEED_DATA` (and its type `NeedData`) is what every sans-I/O decoder's `next_event()` returns
when it needs more bytes.
"""

from protocol._sentinel import NEED_DATA, NeedData

__all__ = ["NEED_DATA", "PUBLIC_MODULES", "NeedData"]

PUBLIC_MODULES = (
    "protocol.apdu",
    "protocol.atr",
    "protocol.ccid",
    "protocol.ccid_stream",
    "protocol.connection",
    "protocol.display",
    "protocol.errors",
    "protocol.speculation",
    "protocol.t1",
    "protocol.vocabulary",
    "protocol.vpcd",
    "protocol.wire",
    "protocol.runtime.address",
    "protocol.runtime.cli",
    "protocol.runtime.config",
    "protocol.runtime.connect",
    "protocol.runtime.framed",
    "protocol.runtime.logging",
    "protocol.runtime.metrics",
    "protocol.runtime.schema",
    "protocol.runtime.sdnotify",
    "protocol.runtime.tls",
)
"""The public modules of this package (everything else in it is private)."""
