"""Every audit line about a client says who it was: identity, certificate names and fingerprint (S11).

An auditor who finds a refused PUT DATA must be able to tell which certificate sent it, even when
two build machines share an identity name; a line without the names or the fingerprint cannot be
attributed. A holder whose certificate fingerprint is not known (a refusal outside a lease, built
without one) still gets the field, as an empty string, so a reader of the JSON never meets a null.
"""

from __future__ import annotations

import json
from pathlib import Path

from rails_fakes import make_rails

from bridge_server.guard.guardrails import Holder

PUT_DATA = bytes.fromhex("00DB3FFF03 5C0141")
FINGERPRINT = "9f" * 32  # a SHA-256, hex


def _audit(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]


async def test_a_refusal_is_audited_with_the_certificates_names_and_fingerprint(tmp_path: Path) -> None:
    holder = Holder("vm1", ("vm1", "vm1.ci.example"), admin=False, epoch=7, fingerprint=FINGERPRINT)
    rails = make_rails(tmp_path)
    refused = rails.screen(PUT_DATA, holder)
    assert refused is not None
    await rails.record_refusal(refused, holder)
    (line,) = _audit(tmp_path)
    assert (line["client_id"], line["names"], line["fingerprint"]) == (
        "vm1",
        ["vm1", "vm1.ci.example"],
        FINGERPRINT,
    )


async def test_a_holder_without_a_known_fingerprint_is_audited_with_an_empty_one(tmp_path: Path) -> None:
    holder = Holder("vm2", ("vm2",), admin=False)
    rails = make_rails(tmp_path)
    refused = rails.screen(PUT_DATA, holder)
    assert refused is not None
    await rails.record_refusal(refused, holder)
    (line,) = _audit(tmp_path)
    assert (line["names"], line["fingerprint"]) == (["vm2"], "")
