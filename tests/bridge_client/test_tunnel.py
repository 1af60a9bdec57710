"""The tunnel against a scripted server over TLS on memory streams, in exact virtual time."""

from __future__ import annotations

import contextlib
import errno
from typing import Any

import pytest
import trio
import trio.testing
from client_fakes import (
    ATR,
    ATR2,
    CLIENT_NAME,
    SERVER_NAME,
    Certs,
    FakeServer,
    MemoryNet,
    hold_lease,
    make_tunnel,
    open_tunnel,
    wait_until,
)
from structlog.testing import capture_logs

from bridge_client.errors import CardFailure, LeaseError, TunnelDown
from bridge_client.tunnel import NORMAL_LEASE_ENDINGS, Tunnel
from bridge_server.tokens.leases import EndReason
from protocol import ccid, wire
from protocol.errors import CloseCode

PEER = f"{SERVER_NAME}:7447"


def disconnects(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "tunnel.disconnected"]


# -- connecting ------------------------------------------------------------------------------


async def test_welcome_is_answered_with_client_hello_and_the_status_says_connected(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNet()
    tunnel = make_tunnel(certs, net)
    with capture_logs() as logs:
        await nursery.start(tunnel.run)
        server = await FakeServer.accept(net, certs.server_ctx())
        hello = await server.welcome()
        await wait_until(tunnel, lambda: tunnel.status.state == "connected")
    assert hello.version == wire.PROTOCOL_VERSION
    assert hello.software.startswith("tokenbridge-client/")
    assert tunnel.connected
    assert (tunnel.status.identity, tunnel.status.server, tunnel.status.reason) == (
        CLIENT_NAME,
        "fake-server/1",
        "",
    )
    connected = [e for e in logs if e["event"] == "tunnel.connected"]
    assert connected == [
        {
            "event": "tunnel.connected",
            "log_level": "info",
            "peer": PEER,
            "server": "fake-server/1",
            "client_id": CLIENT_NAME,
        }
    ]


async def test_a_refusal_is_logged_with_its_reason_and_retried_after_the_backoff_delay(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNet()
    tunnel = make_tunnel(certs, net)  # backoff 1 s doubling, no jitter
    refusal = wire.Refused(
        version=wire.PROTOCOL_VERSION,
        code=CloseCode.NOT_AUTHORIZED,
        reason="not_allowed",
        message="certificate 'build-vm-01' is on no token's allow list",
    )
    with capture_logs() as logs:
        await nursery.start(tunnel.run)
        for _ in range(3):
            server = await FakeServer.accept(net, certs.server_ctx())
            await server.send(refusal)
            await server.close()
        await wait_until(tunnel, lambda: len(disconnects(logs)) == 3)
    start = net.attempts[0]
    assert [t - start for t in net.attempts] == [0.0, 1.0, 3.0]
    reason = "server refused this client: not_allowed: certificate 'build-vm-01' is on no token's allow list"
    assert [(e["reason"], e["retry_in_s"], e["log_level"]) for e in disconnects(logs)] == [
        (reason, 1.0, "warning"),
        (reason, 2.0, "warning"),
        (reason, 4.0, "warning"),
    ]
    assert (tunnel.status.state, tunnel.status.reason) == ("refused", reason)
    assert not tunnel.connected


async def tls_failure(
    certs: Certs, server_ctx: Any, *, close_notify: bool = False, **tunnel_kwargs: Any
) -> str:
    """Run one connection attempt against a server with `server_ctx`; the logged reason."""
    net = MemoryNet()
    tunnel = make_tunnel(certs, net, **tunnel_kwargs)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.run)
            tls = trio.SSLStream(await net.accept(), server_ctx, server_side=True)
            with contextlib.suppress(trio.BrokenResourceError):
                await tls.do_handshake()
            if close_notify:
                await tls.aclose()  # an orderly TLS close, and not one frame first
            else:
                await trio.aclose_forcefully(tls)
            await wait_until(tunnel, lambda: bool(disconnects(logs)))
            nursery.cancel_scope.cancel()
    assert tunnel.status.state == "retrying"
    assert tunnel.status.reason == disconnects(logs)[0]["reason"]
    return str(disconnects(logs)[0]["reason"])


async def test_a_server_certificate_from_another_ca_is_reported_as_unknown_ca(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    reason = await tls_failure(certs, certs.server_ctx(cert=certs.foreign_server))
    assert reason == f"TLS handshake with {PEER} failed: certificate unknown / not signed by our CA"


@pytest.mark.parametrize(
    ("which", "problem"),
    [
        ("server_no_eku", "has no extended key usage"),
        ("server_both_ekus", "carries both clientAuth and serverAuth"),
    ],
)
async def test_a_server_certificate_not_made_for_serverauth_only_is_refused(
    certs: Certs, autojump_clock: trio.testing.MockClock, which: str, problem: str
) -> None:
    reason = await tls_failure(certs, certs.server_ctx(cert=getattr(certs, which)))
    assert reason == (
        f"TLS handshake with {PEER} failed: server certificate {SERVER_NAME!r} {problem}: a bridge "
        "server certificate must carry serverAuth only; reissue it with `tokenbridge pki issue-server`"
    )


async def test_a_server_certificate_for_another_name_is_reported_as_name_mismatch(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    reason = await tls_failure(certs, certs.server_ctx(), server_name="signing.test")
    assert reason == (
        f"TLS handshake with {PEER} failed: hostname mismatch (the server certificate does not name "
        "'signing.test'; fix server or server_name in the client config)"
    )


async def test_a_server_that_rejects_our_certificate_is_reported_as_refusing_it(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    reason = await tls_failure(certs, certs.server_ctx(ca=certs.foreign_ca))
    assert reason.startswith(f"server {PEER} refused this client: ")
    assert "refused our client certificate" in reason


async def test_a_server_that_closes_cleanly_before_its_first_frame_is_reported_as_refusing_us(
    certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    # What a refusal looks like when the TLS stack reads the close as an orderly end of stream
    # (Debian 12's Python 3.11.2 did, for cut connections too): never "expected Welcome".
    reason = await tls_failure(certs, certs.server_ctx(), close_notify=True)
    assert reason.startswith(f"server {PEER} refused this client: it closed the connection right after")


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            f"connection refused by {PEER} (is tokenbridge-server running and listening there?)",
        ),
        (OSError(errno.EHOSTUNREACH, "No route to host"), f"cannot reach {PEER}: No route to host"),
    ],
)
async def test_an_unreachable_server_is_reported_in_words_and_retried_with_growing_delays(
    nursery: trio.Nursery,
    certs: Certs,
    autojump_clock: trio.testing.MockClock,
    failure: OSError,
    expected: str,
) -> None:
    net = MemoryNet()
    net.failure = failure
    tunnel = make_tunnel(certs, net)
    with capture_logs() as logs:
        await nursery.start(tunnel.run)
        await wait_until(tunnel, lambda: len(disconnects(logs)) == 5)
    assert [e["reason"] for e in disconnects(logs)] == [expected] * 5
    start = net.attempts[0]
    assert [t - start for t in net.attempts[:5]] == [0.0, 1.0, 3.0, 7.0, 15.0]  # 1, 2, 4, 8 (cap 8)
    assert tunnel.status.attempts == 5


async def test_a_server_that_drops_packets_times_out_after_connect_timeout(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    net = MemoryNet()
    net.hang = True
    tunnel = make_tunnel(certs, net, connect_timeout_s=4.0)
    with capture_logs() as logs:
        await nursery.start(tunnel.run)
        await wait_until(tunnel, lambda: len(disconnects(logs)) == 2)
    start = net.attempts[0]
    assert [t - start for t in net.attempts] == [0.0, 5.0]  # 4 s timeout + 1 s backoff
    assert disconnects(logs)[0]["reason"].startswith(f"timed out connecting to {PEER}")


async def test_a_closed_loopback_port_is_reported_as_connection_refused(certs: Certs) -> None:
    """The real connect path (trio.open_tcp_stream wraps the error in a group)."""
    with trio.socket.socket() as sock:  # bound, never listening: nothing accepts on it
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        tunnel = Tunnel(
            host="127.0.0.1",
            port=port,
            server_name=SERVER_NAME,
            ssl_context=certs.client_ctx(),
            token_names=["codesign"],
        )
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(tunnel.run)
                await wait_until(tunnel, lambda: bool(disconnects(logs)))
                nursery.cancel_scope.cancel()
    assert disconnects(logs)[0]["reason"] == (
        f"connection refused by 127.0.0.1:{port} (is tokenbridge-server running and listening there?)"
    )


# -- heartbeat -------------------------------------------------------------------------------


async def test_a_ping_from_the_server_is_answered_with_a_pong_of_the_same_nonce(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    _, server, _ = await open_tunnel(nursery, certs)
    await server.send(wire.Ping(nonce=2**40 + 7))
    assert await server.expect(wire.Pong) == wire.Pong(nonce=2**40 + 7)


async def test_the_client_pings_every_interval_and_measures_the_round_trip(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs, heartbeat=4.0)
    start = trio.current_time()
    pings = []
    for _ in range(3):
        msg = await server.receive()
        assert isinstance(msg, wire.Ping)
        pings.append(trio.current_time() - start)
        await trio.sleep(0.25)  # the server answers 250 ms later (virtual time)
        await server.send(wire.Pong(nonce=msg.nonce))
    assert pings == [4.0, 8.0, 12.0]
    await wait_until(tunnel, lambda: tunnel.status.rtt_ms is not None)
    await trio.testing.wait_all_tasks_blocked()
    assert tunnel.status.rtt_ms == 250.0


async def test_a_silent_server_is_dropped_after_exactly_three_intervals_with_a_goodbye(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    with capture_logs() as logs:
        tunnel, server, net = await open_tunnel(nursery, certs, heartbeat=10.0)
        last_heard = trio.current_time()  # the TokenStatus was the last frame it sent
        while True:  # read (pings) but never answer
            msg = await server.receive()
            if not isinstance(msg, wire.Ping):
                break
        assert msg == wire.Goodbye(code=CloseCode.HEARTBEAT_TIMEOUT, reason="heartbeat_lost")
        assert trio.current_time() - last_heard == 30.0
        await net.accept()  # and it reconnects after the backoff delay
    assert net.attempts[1] - last_heard == 31.0
    lost = [e for e in logs if e["event"] == "tunnel.heartbeat_lost"]
    assert [(e["peer"], e["silent_s"]) for e in lost] == [(PEER, 30.0)]
    assert disconnects(logs)[0]["reason"].startswith("heartbeat lost: nothing heard from the server for 30 s")
    assert not tunnel.tokens["codesign"].present


async def test_a_server_that_keeps_talking_is_never_declared_dead(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, net = await open_tunnel(nursery, certs, heartbeat=10.0)
    for _ in range(20):  # 200 s, one frame every 25 s: each gap < 3 intervals
        await trio.sleep(25)
        await server.send(wire.Ping(nonce=1))
    await trio.testing.wait_all_tasks_blocked()
    assert tunnel.connected
    assert len(net.attempts) == 1


# -- tokens --------------------------------------------------------------------------------


async def test_token_status_updates_the_token_table_and_wakes_waiters(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    with capture_logs() as logs:
        tunnel, server, _ = await open_tunnel(nursery, certs)
        tok = tunnel.tokens["codesign"]
        assert (tok.token_id, tok.present, tok.allowed, tok.atr, tok.server_state) == (
            0,
            True,
            True,
            ATR,
            "idle",
        )
        await server.token(present=False, state="absent")
        await wait_until(tunnel, lambda: not tok.present)
        assert not tok.usable
        assert tok.atr == ATR  # the last known ATR is kept for when it comes back
        await server.token(atr=ATR2, allowed=False, state="leased")
        await wait_until(tunnel, lambda: tok.atr == ATR2)
        assert (tok.present, tok.allowed, tok.usable) == (True, False, False)
        await server.token("someone-elses", token_id=3)  # no reader of ours: ignored
        await server.token(atr=ATR2)
        await wait_until(tunnel, lambda: tok.usable)
    assert "someone-elses" not in tunnel.tokens
    # One line per change of usability: appeared, unplugged, usable again (not allowed-but-present).
    changes = [(e["present"], e["allowed"]) for e in logs if e["event"] == "token.changed"]
    assert changes == [(True, True), (False, True), (True, True)]


# -- leases --------------------------------------------------------------------------------


async def test_a_lease_is_requested_queued_and_granted(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    tok = tunnel.tokens["codesign"]
    got: list[int] = []

    async def acquire() -> None:
        got.append(await tunnel.acquire_lease("codesign"))

    nursery.start_soon(acquire)
    assert await server.expect(wire.LeaseRequest) == wire.LeaseRequest(token_id=0)
    await server.send(wire.LeaseQueued(token_id=0, position=2))
    await trio.testing.wait_all_tasks_blocked()
    assert (tok.queue_position, got) == (2, [])
    for _ in range(3):  # waits in the queue as long as the caller lets it (60 s here)
        await trio.sleep(20)
        await server.send(wire.LeaseQueued(token_id=0, position=1))
    await trio.testing.wait_all_tasks_blocked()
    assert (tok.queue_position, got) == (1, [])
    await server.send(wire.LeaseGranted(token_id=0, epoch=77, atr=ATR2))
    await trio.testing.wait_all_tasks_blocked()
    assert got == [77]
    assert (tok.epoch, tok.queue_position, tok.atr) == (77, None, ATR2)
    # Holding the lease: the next acquire returns at once and sends nothing.
    assert await tunnel.acquire_lease("codesign") == 77
    assert await server.nothing_for(5) == []


async def test_a_grant_arriving_after_the_reader_gave_up_is_handed_straight_back(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    with trio.move_on_after(1) as waited:
        await tunnel.acquire_lease("codesign")
    assert waited.cancelled_caught
    assert await server.expect(wire.LeaseRequest) == wire.LeaseRequest(token_id=0)
    await server.send(wire.LeaseGranted(token_id=0, epoch=91, atr=ATR2))
    assert await server.expect(wire.LeaseRelease) == wire.LeaseRelease(token_id=0, epoch=91)
    assert tunnel.tokens["codesign"].epoch is None


async def test_an_error_message_fails_the_pending_lease_request(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    failures: list[LeaseError] = []

    async def acquire() -> None:
        try:
            await tunnel.acquire_lease("codesign")
        except LeaseError as exc:
            failures.append(exc)

    with capture_logs() as logs:
        nursery.start_soon(acquire)
        await server.expect(wire.LeaseRequest)
        await server.send(wire.ErrorMessage(code="queue_timeout", message="waited 900 s", token_id=0))
        await trio.testing.wait_all_tasks_blocked()
    assert [(f.code, str(f)) for f in failures] == [("queue_timeout", "queue_timeout: waited 900 s")]
    assert [(e["code"], e["token_id"]) for e in logs if e["event"] == "server.error"] == [
        ("queue_timeout", 0)
    ]
    assert tunnel.tokens["codesign"].epoch is None


# -- CCID exchanges ------------------------------------------------------------------------


async def exchange_with(tunnel: Tunnel, server: FakeServer, answer: Any) -> ccid.CcidMessage:
    """Run one XfrBlock; `answer(command)` builds the server's CcidFrame payload."""
    result: list[Any] = []

    async def run() -> None:
        try:
            result.append(
                await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xa4\x04\x00"))
            )
        except Exception as exc:
            result.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        frame = await server.expect(wire.CcidFrame)
        command = ccid.decode_message(frame.message)
        await server.send(wire.CcidFrame(token_id=0, epoch=frame.epoch, message=answer(command)))
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


async def test_an_exchange_goes_under_the_lease_epoch_with_increasing_bseq(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    seen: list[int] = []

    def answer(cmd: ccid.CcidMessage) -> bytes:
        assert cmd.msg_type == ccid.MessageType.PC_to_RDR_XfrBlock
        assert cmd.data == b"\x00\xa4\x04\x00"
        seen.append(cmd.seq)
        return ccid.data_block(cmd.seq, b"\x90\x00").encode()

    first = await exchange_with(tunnel, server, answer)
    second = await exchange_with(tunnel, server, answer)
    assert (first.data, second.data) == (b"\x90\x00", b"\x90\x00")
    assert seen == [seen[0], (seen[0] + 1) % 256]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            lambda cmd: ccid.data_block((cmd.seq + 1) % 256, b"\x90\x00").encode(),
            "does not match command bSeq",
        ),
        (
            lambda cmd: ccid.data_block(
                cmd.seq, icc=ccid.IccStatus.PRESENT_ACTIVE, cmd=ccid.CommandStatus.FAILED, error=0xFE
            ).encode(),
            "reader error from server: bError 0xFE",
        ),
        (lambda cmd: b"\x80\x00\x00\x00\x00\x00\x01\x00\x00\x00\x90", "malformed CCID response"),
    ],
    ids=["wrong-bseq", "failed-status", "malformed"],
)
async def test_a_wrong_response_is_a_card_failure_never_a_status_word(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock, answer: Any, message: str
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server)
    with pytest.raises(CardFailure, match=message):
        await exchange_with(tunnel, server, answer)


async def test_an_exchange_without_a_lease_is_refused_locally(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    with pytest.raises(LeaseError, match="lease_required"):
        await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xa4\x04\x00"))
    assert await server.nothing_for(5) == []


async def test_an_error_message_fails_the_pending_exchange(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server)

    async def stale() -> None:
        await server.expect(wire.CcidFrame)
        await server.send(wire.ErrorMessage(code="stale_epoch", message="epoch 41 ended", token_id=0))

    nursery.start_soon(stale)
    with pytest.raises(LeaseError, match="stale_epoch"):
        await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xa4\x04\x00"))


async def test_a_cancelled_exchange_does_not_block_the_next_one(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server)
    with trio.move_on_after(5):  # the reader gave up (e.g. its vpcd connection closed)
        await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xa4\x04\x00"))
    await server.expect(wire.CcidFrame)  # the unanswered one
    response = await exchange_with(tunnel, server, lambda cmd: ccid.data_block(cmd.seq, b"\x90\x00").encode())
    assert response.data == b"\x90\x00"


# -- the tunnel going down, leases ending ---------------------------------------------------


async def test_a_dropped_tunnel_fails_pending_operations_and_marks_tokens_absent(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, net = await open_tunnel(nursery, certs, token_names=["codesign", "other"])
    await server.token("other", token_id=1)
    await hold_lease(tunnel, server, epoch=41)
    tok, other = tunnel.tokens["codesign"], tunnel.tokens["other"]
    generation = tok.lost_generation
    errors: list[BaseException] = []

    async def run(op: Any) -> None:
        try:
            await op()
        except TunnelDown as exc:
            errors.append(exc)

    nursery.start_soon(
        run, lambda: tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xb0\x00\x00"))
    )
    nursery.start_soon(run, lambda: tunnel.acquire_lease("other"))
    sent = {type(await server.expect(object)) for _ in range(2)}
    assert sent == {wire.CcidFrame, wire.LeaseRequest}
    await server.close()
    await trio.testing.wait_all_tasks_blocked()
    assert [str(e) for e in errors] == ["tunnel to the server is down"] * 2
    assert not tunnel.connected
    assert (tok.present, tok.epoch, tok.token_id, other.present) == (False, None, None, False)
    assert tok.lost_generation == generation + 1
    with pytest.raises(TunnelDown):
        await tunnel.acquire_lease("codesign")
    await net.accept()  # and it reconnects by itself


def test_only_the_clients_own_endings_count_as_normal() -> None:
    """docs/protocol.md §5.3: released and linger_expired; the server's list is the truth."""
    server_reasons = {str(r) for r in EndReason}
    assert server_reasons >= NORMAL_LEASE_ENDINGS
    assert {"released", "linger_expired"} == NORMAL_LEASE_ENDINGS


@pytest.mark.parametrize("reason", sorted(str(r) for r in EndReason))
async def test_a_lease_ending_for_any_other_reason_counts_as_lost(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock, reason: str
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    tok = tunnel.tokens["codesign"]
    generation = tok.lost_generation
    with capture_logs() as logs:
        await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason=reason))
        await wait_until(tunnel, lambda: tok.epoch is None)
    lost = reason not in {"released", "linger_expired"}
    assert tok.lost_generation == generation + (1 if lost else 0)
    assert [(e["reason"], e["lease_epoch"]) for e in logs if e["event"] == "lease.ended"] == [(reason, 41)]


async def test_a_lease_ended_for_an_old_epoch_is_ignored(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    await server.send(wire.LeaseEnded(token_id=0, epoch=40, reason="revoked"))
    await trio.testing.wait_all_tasks_blocked()
    assert tunnel.tokens["codesign"].epoch == 41


async def test_a_lease_ending_mid_exchange_fails_it_with_the_reason(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)

    async def revoke() -> None:
        await server.expect(wire.CcidFrame)
        await server.send(wire.LeaseEnded(token_id=0, epoch=41, reason="revoked"))

    nursery.start_soon(revoke)
    with pytest.raises(LeaseError, match="revoked"):
        await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xa4\x04\x00"))


async def test_a_token_reported_absent_mid_exchange_fails_it_and_ends_the_lease(
    nursery: trio.Nursery, certs: Certs, autojump_clock: trio.testing.MockClock
) -> None:
    tunnel, server, _ = await open_tunnel(nursery, certs)
    await hold_lease(tunnel, server, epoch=41)
    tok = tunnel.tokens["codesign"]
    generation = tok.lost_generation

    async def unplug() -> None:
        await server.expect(wire.CcidFrame)
        await server.token(present=False, state="absent")

    nursery.start_soon(unplug)
    with pytest.raises(LeaseError):
        await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, b"\x00\xa4\x04\x00"))
    assert (tok.epoch, tok.lost_generation) == (None, generation + 1)
