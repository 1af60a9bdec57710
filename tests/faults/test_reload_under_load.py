"""F16: certificate and CRL reloads under load (reliability-anchors §7 F16, issue 18 item 5).

Ten clients sign in loops through one token (each signature its own lease: power-on, SELECT,
VERIFY, GENERAL AUTHENTICATE, release) while the server's certificate and key and the CRL are
rewritten five times and picked up by the server's file watcher. A reload must not cost anyone
an APDU: no signature fails, no connection is lost, every client keeps signing, and the file
descriptors the reloads might leak come back to the level before the load.
"""

from __future__ import annotations

from pathlib import Path

import trio
from inproc import open_fds, wait_until
from pki_server import bundle_context, make_pki, make_server
from procstack import SignerLog, reconnecting, sign_once

CLIENTS = tuple(f"build-vm-{i:02d}" for i in range(10))
REWRITES = 5


async def test_ten_signing_clients_lose_nothing_while_the_certificate_and_crl_are_rewritten_five_times(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path, CLIENTS)
    server = make_server(tmp_path, allow=CLIENTS)
    logs = {name: SignerLog() for name in CLIENTS}
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.run))[0].socket.getsockname()[1]
        baseline = open_fds()
        async with trio.open_nursery() as signers:
            for name in CLIENTS:
                ctx = bundle_context(pki, name)
                signers.start_soon(
                    reconnecting, ctx, port, lambda conn, log=logs[name]: sign_once(conn, log), logs[name]
                )
            for rewrite in range(1, REWRITES + 1):
                done = sum(log.signatures for log in logs.values())
                pki.issue_server(["localhost"])  # a new key and certificate, same CA and name
                pki.write_crl()
                await wait_until(lambda r=rewrite: server.reloader.reloads >= r, what="the reload", within=10)
                # Signing goes on across each reload, not only before the first.
                await wait_until(
                    lambda d=done: sum(log.signatures for log in logs.values()) >= d + len(CLIENTS),
                    what="signatures after the reload",
                    within=30,
                )
            await wait_until(
                lambda: all(log.signatures for log in logs.values()), what="every client", within=30
            )
            signers.cancel_scope.cancel()
        await wait_until(lambda: open_fds() <= baseline, what="fds back to the baseline", within=10)
        server.request_shutdown()
    assert server.reloader.reloads >= REWRITES
    assert {name: log.connection_errors for name, log in logs.items()} == dict.fromkeys(CLIENTS, 0)
    assert all(grant.signed for log in logs.values() for grant in log.grants[:-1])
