"""Network faults between the real client and the real server (reliability-anchors §7.1 F1-F4).

The server runs in-process over real TLS on loopback, the client is the real `Tunnel` (or a
bare FramedConnection where a test needs byte-level control), and the fault proxy sits between
them. Heartbeats are short (0.3 s) so the 3-interval bound is asserted numerically in real time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from faultproxy import FaultProxy, open_fault_proxy
from inproc import (
    SELECT_PIV,
    SIGN_9D,
    SW_SECURITY_NOT_SATISFIED,
    VERIFY_123456,
    Pki,
    apdu,
    expect,
    make_tunnel,
    open_fds,
    open_lease,
    power_on,
    raw_client,
    running_server,
    server_config,
    wait_until,
)
from structlog.testing import capture_logs

from bridge_client.errors import TunnelDown
from bridge_client.tunnel import Tunnel
from bridge_client.vpcd_link import VpcdLink
from bridge_server.app import BridgeServer
from protocol import ccid, vpcd, wire

HEARTBEAT_S = 0.3
BOUND_S = 3 * HEARTBEAT_S  # protocol: silence for HEARTBEAT_MISSES intervals ends the session
SLACK_S = 0.25  # timer granularity and one scheduling round on a loaded 2-core CI machine
INS_SIGN = 0x87


@asynccontextmanager
async def proxied(tmp_path: Path) -> AsyncIterator[tuple[Any, FaultProxy]]:
    """The in-process server and a fault proxy in front of it."""
    async with (
        running_server(tmp_path, heartbeat_s=HEARTBEAT_S) as (server, port),
        open_fault_proxy("127.0.0.1", port) as proxy,
    ):
        yield server, proxy


def holder(server: Any) -> Any:
    return server.tokens[0].book.holder


def evidence(server: Any) -> Any:
    return server.tokens[0].simulated.evidence


def powered_off_after(server: Any, epoch: int) -> bool:
    """The card saw a power-off after the last APDU of lease `epoch` (the lease's cold reset)."""
    events = evidence(server).events
    last_apdu = max(i for i, e in enumerate(events) if e[0] == "apdu" and e[1] == epoch)
    return any(e[0] == "power_off" for e in events[last_apdu:])


async def xfr(tunnel: Tunnel, command: bytes) -> bytes:
    response = await tunnel.exchange("codesign", lambda seq: ccid.xfr_block(seq, command))
    return response.data


async def leased_tunnel(nursery: trio.Nursery, pki: Pki, port: int) -> Tunnel:
    tunnel = make_tunnel(pki, port)
    await nursery.start(tunnel.run)
    await wait_until(lambda: tunnel.tokens["codesign"].usable, what="the tunnel to see the token", within=10)
    await tunnel.acquire_lease("codesign")
    await tunnel.exchange("codesign", lambda seq: ccid.icc_power_on(seq))
    assert (await xfr(tunnel, SELECT_PIV))[-2:] == b"\x90\x00"
    return tunnel


@pytest.mark.parametrize("faulted", ["both", "c2s", "s2c"])
async def test_black_hole_and_half_open_peers_are_detected_within_the_heartbeat_bound(
    tmp_path: Path, nursery: trio.Nursery, faulted: str
) -> None:
    """F1/F3: `both` = black hole; `c2s`/`s2c` = one side's peer vanished (half-open)."""
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy), trio.open_nursery() as inner:
        tunnel = await leased_tunnel(inner, pki, proxy.port)
        epoch = holder(server).epoch
        start = time.monotonic()
        if faulted in ("both", "c2s"):
            proxy.c2s.black_hole = True
        if faulted in ("both", "s2c"):
            proxy.s2c.black_hole = True
        # Whoever stops hearing its peer must notice within 3 intervals (+ scheduling slack).
        server_s = await wait_until(lambda: holder(server) is None, what="lease release", within=5)
        client_s = await wait_until(lambda: not tunnel.connected, what="client to drop", within=5)
        if faulted in ("both", "c2s"):
            assert server_s <= BOUND_S + SLACK_S, f"server took {server_s:.2f} s"
        if faulted in ("both", "s2c"):
            assert client_s <= BOUND_S + SLACK_S, f"client took {client_s:.2f} s"
        assert time.monotonic() - start <= BOUND_S + 2 * SLACK_S
        assert tunnel.tokens["codesign"].lost_generation == 1  # the reader shows a removal
        # The card was powered off after the lost lease's last APDU: no state carries over.
        await wait_until(lambda: powered_off_after(server, epoch), what="card power-off", within=2)
        inner.cancel_scope.cancel()


async def test_drop_after_the_apdu_reached_the_token_is_a_reader_error_and_the_card_is_reset(
    tmp_path: Path,
) -> None:
    """F2: the response never comes back; the client must not invent a status word."""
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy), trio.open_nursery() as inner:
        tunnel = await leased_tunnel(inner, pki, proxy.port)
        epoch = holder(server).epoch
        assert await xfr(tunnel, VERIFY_123456) == b"\x90\x00"
        # A sign frame is ~100 bytes on the wire; Pings/Pongs are well under 80.
        proxy.drop_after_next_client_write(min_bytes=80)
        start = time.monotonic()
        with pytest.raises(TunnelDown):
            await xfr(tunnel, SIGN_9D)
        assert time.monotonic() - start <= BOUND_S + SLACK_S
        assert proxy.dropped.is_set()
        # The APDU did reach the card under the lost lease ...
        signed = [e for e in evidence(server).events if e == ("apdu", epoch, INS_SIGN)]
        assert len(signed) == 1
        await wait_until(lambda: holder(server) is None, what="lease release", within=5)
        proxy.pass_through()
        # ... and the next lease sees a cold card: PIN state gone, signing refused.
        await wait_until(lambda: tunnel.tokens["codesign"].usable, what="reconnect", within=10)
        await tunnel.acquire_lease("codesign")
        await tunnel.exchange("codesign", lambda seq: ccid.icc_power_on(seq))
        await xfr(tunnel, SELECT_PIV)
        assert await xfr(tunnel, SIGN_9D) == SW_SECURITY_NOT_SATISFIED
        assert powered_off_after(server, epoch)  # between the lost lease's sign and this lease
        inner.cancel_scope.cancel()


@pytest.mark.parametrize("at_record_boundary", [True, False])
async def test_tls_truncation_to_the_client_is_an_error_not_a_clean_end(
    tmp_path: Path, at_record_boundary: bool
) -> None:
    """F4: a FIN without close_notify must not read as an orderly close."""
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy), raw_client(pki, proxy.port) as client:
        granted = await open_lease(client)
        await power_on(client, granted.epoch)
        proxy.truncate_after(0 if at_record_boundary else 3, "s2c")  # 3: inside a record header
        await client.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=_select(1)))
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
            await expect(client, wire.CcidFrame)
        await wait_until(lambda: holder(server) is None, what="lease release", within=5)


async def test_tls_truncation_to_the_server_ends_the_session_as_lost_not_closed(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    with capture_logs() as logs:
        async with proxied(tmp_path) as (server, proxy), raw_client(pki, proxy.port) as client:
            granted = await open_lease(client)
            proxy.truncate_after(3, "c2s")
            await client.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=_select(0)))
            await wait_until(lambda: holder(server) is None, what="lease release", within=5)
    closed = [e for e in logs if e["event"] == "session.closed"]
    assert [e["reason"] for e in closed] == ["connection_lost"]
    ended = [e for e in logs if e["event"] == "lease.ended"]
    assert [e["reason"] for e in ended] == ["disconnected"]


def _select(seq: int) -> bytes:
    return ccid.xfr_block(seq, SELECT_PIV).encode()


async def _flip_next_record(proxy: FaultProxy, direction: str, offset_in_record: int) -> None:
    [current] = proxy.stream_offsets(direction)  # type: ignore[arg-type]
    proxy.flip_bits(direction, offset=current + offset_in_record)  # type: ignore[arg-type]


@pytest.mark.parametrize("offset_in_record", [0, 2, 4, 10, 30])
async def test_a_flipped_bit_towards_the_server_never_reaches_the_card(
    tmp_path: Path, offset_in_record: int
) -> None:
    """Bit flips in the record carrying a sign APDU: header (0-4) or ciphertext/tag (>= 5)."""
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy), raw_client(pki, proxy.port) as client:
        granted = await open_lease(client)
        await power_on(client, granted.epoch)
        assert (await apdu(client, granted.epoch, 1, VERIFY_123456))[-2:] == b"\x90\x00"
        before = evidence(server).apdu_count
        await _flip_next_record(proxy, "c2s", offset_in_record)
        sign = ccid.xfr_block(2, SIGN_9D).encode()
        await client.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=sign))
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
            while True:  # the server drops the connection; a Goodbye may not even decrypt
                msg = await expect(client, wire.CcidFrame | wire.Goodbye | wire.ConnectionClosed)
                assert not isinstance(msg, wire.CcidFrame), "a corrupted command was answered"
                if isinstance(msg, wire.ConnectionClosed):
                    raise trio.BrokenResourceError("closed")
        await wait_until(lambda: holder(server) is None, what="lease release", within=5)
        assert evidence(server).apdu_count == before
        assert evidence(server).signatures == 0


async def test_a_flipped_bit_towards_the_client_is_rejected_by_tls(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy), raw_client(pki, proxy.port) as client:
        granted = await open_lease(client)
        await _flip_next_record(proxy, "s2c", 20)
        await client.send(wire.CcidFrame(token_id=0, epoch=granted.epoch, message=_select(0)))
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
            await expect(client, wire.CcidFrame)
        await wait_until(lambda: holder(server) is None, what="lease release", within=5)


async def test_random_bit_flips_either_kill_the_connection_or_change_nothing(tmp_path: Path) -> None:
    """Seeded random corruption across whole sessions: no corrupted frame is ever accepted."""
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy):
        for seed in range(6):
            proxy.flip_bits("c2s", rate=0.002, seed=seed)
            proxy.flip_bits("s2c", rate=0.002, seed=100 + seed)
            answered = 0
            try:
                async with raw_client(pki, proxy.port) as client:
                    with trio.fail_after(10):
                        granted = await open_lease(client)
                        await power_on(client, granted.epoch)
                        for seq in range(1, 20):
                            assert (await apdu(client, granted.epoch, seq, SELECT_PIV))[-2:] == b"\x90\x00"
                            answered += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            # Every APDU the card saw was a well-formed SELECT; nothing else got through.
            assert {r.ins for r in evidence(server).apdus} <= {0xA4}
            await wait_until(lambda: holder(server) is None, what="lease release", within=5)


async def test_fault_cycles_leave_no_file_descriptors_behind(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with proxied(tmp_path) as (server, proxy):
        async with raw_client(pki, proxy.port) as client:  # warm up lazily created fds
            await open_lease(client)
        await wait_until(lambda: proxy.open_connections == 0, what="proxy idle", within=5)
        baseline = open_fds()
        for i in range(6):
            try:
                async with raw_client(pki, proxy.port) as client:
                    await open_lease(client)
                    [proxy.black_hole, proxy.reset_all, lambda: proxy.truncate_after(2, "s2c")][i % 3]()
                    await wait_until(lambda: holder(server) is None, what="lease release", within=5)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            proxy.pass_through()
        await wait_until(lambda: proxy.open_connections == 0, what="proxy idle", within=5)
        await wait_until(lambda: open_fds() <= baseline, what=f"fds back to {baseline}", within=5)


async def test_lease_epochs_are_never_repeated_across_a_restart(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    clock = [1_800_000_000.0]
    seen: list[int] = []
    for _restart in range(2):
        config = server_config(
            tmp_path, heartbeat_s=HEARTBEAT_S, allow=("build-vm-01",), audit={"path": "audit.jsonl"}
        )
        server = BridgeServer(config, wall_time=lambda: clock[0])
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.run)
            async with raw_client(pki, listeners[0].socket.getsockname()[1]) as client:
                granted = await open_lease(client)
                seen.append(granted.epoch)
                for _ in range(4):  # five leases within the same second of wall time
                    await client.send(wire.LeaseRelease(token_id=0, epoch=seen[-1]))
                    await expect(client, wire.LeaseEnded)
                    await client.send(wire.LeaseRequest(token_id=0))
                    seen.append((await expect(client, wire.LeaseGranted)).epoch)
            server.request_shutdown()
        clock[0] += 1.0  # restarted one second later
    assert len(seen) == len(set(seen)), f"epochs repeated across the restart: {seen}"


async def test_drop_mid_apdu_closes_the_vm_reader_instead_of_answering(tmp_path: Path) -> None:
    """F2 at the VM's reader: vpcd (played here) sees the card connection close, never a status word."""
    pki = Pki(tmp_path)
    vpcd_listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with proxied(tmp_path) as (server, proxy), trio.open_nursery() as inner:
        tunnel = make_tunnel(pki, proxy.port)
        await inner.start(tunnel.run)
        link = VpcdLink(tunnel, "codesign", port=vpcd_listener.socket.getsockname()[1])
        await inner.start(link.run)
        with trio.fail_after(10):
            card = await vpcd_listener.accept()
        reader = vpcd.VpcdReaderSide()

        async def ask(payload: bytes) -> bytes | None:
            """The card's answer, or None when the card connection closed (removal)."""
            await card.send_all(payload)
            while True:
                event = reader.next_event()
                if isinstance(event, vpcd.Response):
                    return event.data
                if isinstance(event, vpcd.Closed):
                    return None
                try:
                    data = await card.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                reader.receive_data(data)

        with trio.fail_after(10):
            assert await ask(reader.send_control(vpcd.VpcdControl.GET_ATR))
            await card.send_all(reader.send_control(vpcd.VpcdControl.POWER_ON))
            assert await ask(reader.send_apdu(SELECT_PIV)) is not None
            assert await ask(reader.send_apdu(VERIFY_123456)) == b"\x90\x00"
            proxy.drop_after_next_client_write(min_bytes=80)
            start = time.monotonic()
            assert await ask(reader.send_apdu(SIGN_9D)) is None  # removed: no invented status word
        assert time.monotonic() - start <= BOUND_S + SLACK_S
        assert proxy.dropped.is_set()
        assert evidence(server).signatures == 1  # the command did reach the token
        await card.aclose()
        inner.cancel_scope.cancel()
    await vpcd_listener.aclose()
