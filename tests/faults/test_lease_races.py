"""Lease races found by the soak (bench/soak.py): a late frame's error vs a queued lease request.

A CCID frame sent just as the lease lingered out earns an ErrorMessage(lease_required). If the
client has meanwhile queued for a new lease, that error must fail only the frame, not the
lease request; otherwise the reader is removed, re-inserted, re-requests while still queued,
gets `already_leased`, and loops removing and inserting the card until the grant arrives.
"""

from __future__ import annotations

from pathlib import Path

import trio
from inproc import Pki, make_tunnel, open_lease, raw_client, running_server, wait_until
from structlog.testing import capture_logs

from protocol import ccid, wire


async def test_an_error_for_a_late_frame_does_not_cancel_a_queued_lease_request(tmp_path: Path) -> None:
    pki = Pki(tmp_path, clients=("build-vm-01", "build-vm-02"))
    allow = ("build-vm-01", "build-vm-02")
    with capture_logs() as logs:
        async with running_server(tmp_path, allow=allow) as (server, port), trio.open_nursery() as nursery:
            tunnel = make_tunnel(pki, port)
            await nursery.start(tunnel.run)
            await wait_until(lambda: tunnel.tokens["codesign"].usable, what="token visible", within=10)
            old_epoch = await tunnel.acquire_lease("codesign")
            await tunnel.release_lease("codesign")
            await wait_until(lambda: server.tokens[0].book.holder is None, what="release", within=5)
            async with raw_client(pki, port, stem="build-vm-02") as other:
                granted = await open_lease(other)  # someone else holds the token now
                acquired: list[int] = []

                async def acquire() -> None:
                    acquired.append(await tunnel.acquire_lease("codesign"))

                nursery.start_soon(acquire)
                await wait_until(lambda: server.tokens[0].book.waiting, what="queued", within=5)
                # A frame from the old lease, arriving late: the server answers lease_required.
                assert tunnel._conn is not None
                late = ccid.icc_power_off(0).encode()
                await tunnel._conn.send(wire.CcidFrame(token_id=0, epoch=old_epoch, message=late))
                await wait_until(
                    lambda: any(e.get("code") == "lease_required" for e in logs), what="the error", within=5
                )
                await other.send(wire.LeaseRelease(token_id=0, epoch=granted.epoch))
                await wait_until(lambda: acquired, what="the queued request to be granted", within=5)
            assert acquired[0] > granted.epoch
            nursery.cancel_scope.cancel()
    requests = [e for e in logs if e["event"] == "lease.requested"]
    assert len(requests) == 2  # the first lease, then one queued request: no re-request loop
