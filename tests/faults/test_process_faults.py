"""Process-level faults (reliability-anchors §7.1 F7, F9, F10) against the real daemons.

- The server is SIGKILLed at seeded random points KILLS times while a CCID-level harness signs
  in a loop over mTLS (one lease per signature), and every REAL_EVERY cycles OpenSC signs
  through the real client daemon, vpcd and pcscd. The test restarts the server each time (in
  production systemd does). A second token's PIN guard is engaged before the first kill and a
  prober presents PINs to it in a loop (F7/P10, issue 18): every one must be refused (6983)
  and none may reach its card. Per run the simulator's event logs (control socket
  `simulator.evidence`) must show no overlapping leases and a card reset between leases; no
  lease epoch is ever handed out twice; both cards' PIN retry counters (their persisted state
  files), the engaged PIN guard and the audit chain survive all kills.
- The client daemon is SIGKILLed (FIN) or SIGSTOPped (silent peer) while holding the lease:
  the server releases it within the heartbeat bound.
- pcscd is restarted (only with CI=true or TOKENBRIDGE_TEST_RESTART_PCSCD=1: it is shared):
  the reader comes back and signs again.

`TOKENBRIDGE_LONG_TESTS=1` runs 200 kills (the anchors' F7 count for the mock).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_stack import VpcdSlot, card_states, reader_name
from inproc import SELECT_PIV, VERIFY_123456, apdu, greet, power_on, request_lease
from procstack import (
    VERIFY_STATUS_QUERY,
    Grant,
    SignerLog,
    ccid_signer,
    client_ssl,
    control,
    overlapping_leases,
    read_json,
    reconnecting,
    verify_signature,
    wait_for,
)

from bridge_admin.local_stack import BridgeStack
from bridge_admin.signing_tools import pkcs11, pkcs11_sign, read_certificate_pem
from bridge_server.guard.flood_limits import REFUSED_COMMANDS
from protocol import ccid, wire
from protocol.runtime.framed import FramedConnection

pytestmark = pytest.mark.e2e

LONG = os.environ.get("TOKENBRIDGE_LONG_TESTS") == "1"
KILLS = 200 if LONG else 50
REAL_EVERY = 25
HEARTBEAT_S = 0.5
PIN = "123456"
GUARDED = 1  # token_id of "token1", the token whose PIN guard is engaged during the kills
WRONG_VERIFY = bytes.fromhex("0020008008") + b"000000\xff\xff"
REFUSED = b"\x69\x83"  # the PIN guard's answer (docs/guardrails.md)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[BridgeStack]:
    s = BridgeStack(
        tmp_path / "stack", profiles=["yubikey5", "safenet-5110"], heartbeat_s=HEARTBEAT_S,
        lease={"linger_s": 0.5, "idle_timeout_s": 60.0},
    )  # fmt: skip
    s.make_pki(["build-vm-01"])
    config = s.write_server_config(allow=["build-vm-01"])
    with config.open("a") as fh:
        fh.write("pin_guard: {state: pin_guard.json}\n")
    try:
        yield s
    finally:
        s.stop()


def holder(stack: BridgeStack) -> object:
    return control(stack, "status")["tokens"][0]["holder"]


async def pin_retries(stack: BridgeStack) -> int:
    """The card's PIN retry counter, from the empty VERIFY status query (spends no retry)."""
    greeted = await greet(client_ssl(stack), stack.server_port)
    client = greeted.conn
    try:
        with trio.fail_after(10):
            granted = await request_lease(client)
            await power_on(client, granted.epoch)
            await apdu(client, granted.epoch, 1, SELECT_PIV)
            sw = await apdu(client, granted.epoch, 2, VERIFY_STATUS_QUERY)
    finally:
        await greeted.aclose()
    assert sw[0] == 0x63 and sw[1] & 0xF0 == 0xC0, sw.hex()
    return sw[1] & 0x0F


async def expect_guarded(client: FramedConnection, cls: type) -> Any:
    """`expect`, letting the guard's notice through (ErrorMessage pin_guard, sent with a refusal)."""
    while True:
        msg = await client.receive()
        if isinstance(msg, cls):
            return msg
        if isinstance(msg, wire.Ping):
            await client.send(wire.Pong(nonce=msg.nonce))
            continue
        if isinstance(msg, wire.ErrorMessage) and msg.code == "pin_guard":
            continue
        assert isinstance(msg, wire.TokenStatus | wire.Pong | wire.LeaseQueued | wire.SpeculationPaths), msg


async def token_apdu(client: FramedConnection, token_id: int, epoch: int, seq: int, command: bytes) -> bytes:
    """One XfrBlock to `token_id` under `epoch`; its answer's data (the reader must not fail it)."""
    frame = ccid.xfr_block(seq, command).encode()
    await client.send(wire.CcidFrame(token_id=token_id, epoch=epoch, message=frame))
    resp = ccid.decode_message((await expect_guarded(client, wire.CcidFrame)).message)
    assert resp.command_status is ccid.CommandStatus.OK, resp
    return resp.data


async def guarded_lease(client: FramedConnection, log: ProbeLog) -> int:
    """Lease the guarded token, cold power-on, SELECT; returns the epoch."""
    await client.send(wire.LeaseRequest(token_id=GUARDED))
    granted = await expect_guarded(client, wire.LeaseGranted)
    log.grants.append(Grant(log.run, granted.epoch))
    await client.send(
        wire.CcidFrame(token_id=GUARDED, epoch=granted.epoch, message=ccid.icc_power_on(0).encode())
    )
    await expect_guarded(client, wire.CcidFrame)
    assert (await token_apdu(client, GUARDED, granted.epoch, 1, SELECT_PIV))[-2:] == b"\x90\x00"
    return int(granted.epoch)


# Two refusals per probe at most every PROBE_INTERVAL_S: half the refused-command rate limit.
PROBE_INTERVAL_S = 2 / (REFUSED_COMMANDS["rate_per_s"] / 2)


@dataclass
class ProbeLog:
    """What the PIN prober saw: its leases and every answer to a PIN it presented."""

    run: int = 0
    grants: list[Grant] = field(default_factory=list)
    answers: Counter[bytes] = field(default_factory=Counter)
    connection_errors: int = 0


async def probe_once(client: FramedConnection, log: ProbeLog) -> None:
    """Lease the guarded token, present a wrong and the right PIN, release."""
    epoch = await guarded_lease(client, log)
    for seq, command in enumerate((WRONG_VERIFY, VERIFY_123456), start=2):
        log.answers[await token_apdu(client, GUARDED, epoch, seq, command)] += 1
    log.grants[-1].signed = True  # the probe completed
    await client.send(wire.LeaseRelease(token_id=GUARDED, epoch=epoch))
    await expect_guarded(client, wire.LeaseEnded)


async def pin_prober(stack: BridgeStack, log: ProbeLog) -> None:
    """Present PINs to the guarded token forever, one lease per probe, reconnecting after failures."""
    await reconnecting(client_ssl(stack), stack.server_port, lambda conn: probe_paced(conn, log), log)


async def probe_paced(client: FramedConnection, log: ProbeLog) -> None:
    """One probe, then a pause: each probe is two refused PIN commands, and a client that repeats
    refused commands faster than REFUSED_COMMANDS allows is ejected (guard/flood_limits.py), which
    is right for a real client but not what this test is about."""
    await probe_once(client, log)
    await trio.sleep(PROBE_INTERVAL_S)


async def engage_guard(stack: BridgeStack) -> list[bytes]:
    """Wrong PINs to the guarded token until its guard answers 6983 (at most three)."""
    log = ProbeLog()
    answers: list[bytes] = []
    greeted = await greet(client_ssl(stack), stack.server_port)
    client = greeted.conn
    try:
        with trio.fail_after(10):
            epoch = await guarded_lease(client, log)
            for seq in range(2, 5):
                answers.append(await token_apdu(client, GUARDED, epoch, seq, WRONG_VERIFY))
                if answers[-1] == REFUSED:
                    break
    finally:
        await greeted.aclose()
    return answers


def card_pin_counters(stack: BridgeStack) -> dict[str, int]:
    """Every simulated card's own PIN retry counter, from its persisted state file (by serial)."""
    states = sorted((stack.workdir / "state").glob("*.json"))
    assert len(states) == len(stack.profiles), states
    return {p.stem: int(json.loads(p.read_text())["pin_left"]) for p in states}


def leases_problems(stack: BridgeStack, cycle: int) -> list[str]:
    """Overlaps and missing resets on both tokens, and any PIN that reached the guarded card."""
    problems = []
    for name in stack.token_names:
        evidence = control(stack, "simulator.evidence", token=name)
        problems += [f"run {cycle} {name}: {p}" for p in overlapping_leases(evidence["events"])]
        if name == stack.token_names[GUARDED] and evidence["counters"]["pin_attempts"]:
            problems.append(
                f"run {cycle}: {evidence['counters']['pin_attempts']} PIN(s) reached the guarded card"
            )
    return problems


def epoch_repeats(grants: list[Grant]) -> list[str]:
    """Epochs must only go up, across server processes too (each log is one token, in grant order)."""
    return [
        f"epoch {b.epoch} (run {b.run}) after epoch {a.epoch} (run {a.run})"
        for a, b in itertools.pairwise(grants)
        if b.epoch <= a.epoch
    ]


def real_stack_sign(slot: VpcdSlot, tmp_path: Path, cert: Path, n: int) -> None:
    """pkcs11-tool signs through client daemon + vpcd + pcscd; the signature verifies."""
    data, sig = tmp_path / f"data{n}.bin", tmp_path / f"sig{n}.bin"
    data.write_bytes(f"artefact {n}".encode() * 20)
    pkcs11_sign(slot.index, data, sig, timeout=60)
    verify_signature(cert, data.read_bytes(), sig.read_bytes())


async def test_server_sigkilled_at_random_points_restarts_without_overlap_or_state_loss(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    run = trio.to_thread.run_sync
    await run(stack.start_server)
    # The guarded token: one wrong PIN reaches its card, then the guard refuses (6983). The
    # first kill comes right after, so the engaged state must already be on disk.
    engaged = await engage_guard(stack)
    assert engaged[-1] == REFUSED and len(engaged) >= 2, engaged
    assert stack.server is not None
    stack.server.proc.send_signal(signal.SIGKILL)
    await run(stack.server.proc.wait)
    await run(stack.start_server)
    daemon = stack.start_client("build-vm-01", [vpcd_slot.index])
    await run(lambda: stack.wait_card(vpcd_slot.index, daemon))
    cert = await run(lambda: read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert.pem"))
    retries_before = await pin_retries(stack)
    counters_before = card_pin_counters(stack)
    rng = random.Random(20261126)
    log, probes = SignerLog(), ProbeLog()
    problems: list[str] = []
    real_signatures = 0
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ccid_signer, client_ssl(stack), stack.server_port, log)
        nursery.start_soon(pin_prober, stack, probes)
        for cycle in range(KILLS):
            log.run = probes.run = cycle
            if cycle:
                await run(stack.start_server)
            if cycle % REAL_EVERY == REAL_EVERY - 1:
                await run(lambda: stack.wait_card(vpcd_slot.index, daemon, timeout=20))
                await run(real_stack_sign, vpcd_slot, tmp_path, cert, cycle)
                real_signatures += 1
            # The kill point: seeded, anywhere in handshake / grant / APDU / release of the loops.
            await trio.sleep(rng.uniform(0.02, 0.25))
            problems += await run(leases_problems, stack, cycle)
            await trio.sleep(rng.uniform(0.0, 0.05))
            assert stack.server is not None
            stack.server.proc.send_signal(signal.SIGKILL)
            await run(stack.server.proc.wait)
        log.run = probes.run = KILLS
        await run(stack.start_server)  # the restarted server must serve from the persisted state
        signed, probed = log.signatures, probes.answers.total()
        await run(lambda: wait_for(lambda: log.signatures > signed, within=10, what="a signature"))
        await run(lambda: wait_for(lambda: probes.answers.total() > probed, within=10, what="a PIN probe"))
        nursery.cancel_scope.cancel()
    problems += await run(leases_problems, stack, KILLS)
    elapsed = time.monotonic() - started
    print(f"\n{KILLS} kills in {elapsed:.1f} s; {log.signatures} CCID-level signatures, "
          f"{real_signatures} pkcs11-tool signatures, {log.connection_errors} reconnects; "
          f"{probes.answers.total()} PINs presented to the guarded token")  # fmt: skip
    assert problems == []
    # No epoch is ever handed out twice, by the same server process or a later one.
    assert epoch_repeats(log.grants) == []
    assert epoch_repeats(probes.grants) == []
    runs_that_signed = {g.run for g in log.grants if g.signed}
    assert len(runs_that_signed) >= KILLS // 2, f"only {len(runs_that_signed)} runs signed: no reconnects?"
    runs_that_probed = {g.run for g in probes.grants if g.signed}
    assert len(runs_that_probed) >= KILLS // 2, f"only {len(runs_that_probed)} runs probed the guard"
    # Every PIN presented to the guarded token during and after the kills was refused by the guard.
    assert set(probes.answers) == {REFUSED}, probes.answers
    assert KILLS in runs_that_probed  # ... the last (restarted) server process included
    # State that must survive the SIGKILLs: the cards' PIN counters, the guard, the audit chain.
    assert card_pin_counters(stack) == counters_before
    assert await pin_retries(stack) == retries_before
    guard = read_json(stack.workdir / "pin_guard.json")
    assert guard, "the PIN guard state file is empty"
    tokens = control(stack, "status")["tokens"]
    assert [t["pin_guard"].get("engaged") for t in tokens] == [False, True], tokens
    audit = verify_audit(stack.workdir / "audit.jsonl")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def verify_audit(path: Path) -> subprocess.CompletedProcess[str]:
    """`tokenbridge audit verify` on the audit log (hash chain intact)."""
    cmd = [sys.executable, "-m", "bridge_admin.cli", "audit", "verify", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_client_daemon_killed_while_holding_the_lease_is_released_within_the_heartbeat_bound(
    tmp_path: Path, vpcd_slot: VpcdSlot, how: signal.Signals
) -> None:
    stack = BridgeStack(
        tmp_path / "stack", profiles=["yubikey5"], heartbeat_s=HEARTBEAT_S,
        lease={"linger_s": 60.0, "idle_timeout_s": 60.0},  # the lease stays held after OpenSC exits
    )  # fmt: skip
    try:
        stack.make_pki(["build-vm-01"])
        stack.write_server_config(allow=["build-vm-01"])
        stack.start_server()
        daemon = stack.start_client("build-vm-01", [vpcd_slot.index])
        stack.wait_card(vpcd_slot.index, daemon)
        pkcs11("-L", slot=vpcd_slot.index)  # OpenSC talks to the card: the client takes the lease
        wait_for(lambda: holder(stack) is not None, within=10, what="the client to hold the lease")
        os.kill(daemon.proc.pid, how)
        took = wait_for(lambda: holder(stack) is None, within=10, what="the server to release the lease")
        # SIGKILL closes the socket (FIN): immediate. SIGSTOP is a silent peer: 3 heartbeats.
        assert took <= 3 * HEARTBEAT_S + 0.5, f"lease released after {took:.2f} s"
    finally:
        if how == signal.SIGSTOP:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        stack.stop()


def _restart_allowed() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("TOKENBRIDGE_TEST_RESTART_PCSCD") == "1"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running_pcscd() -> tuple[int, list[str]]:
    """The live pcscd's pid and command line (zombies left by other test sessions skipped)."""
    out = subprocess.run(["pgrep", "-x", "pcscd"], capture_output=True, text=True, check=False).stdout.split()
    live = []
    for pid in map(int, out):
        if _alive(pid):
            live.append(pid)
    assert len(live) == 1, f"expected one running pcscd, found pids {live}"
    argv = Path(f"/proc/{live[0]}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    return live[0], [a.decode() for a in argv]


_RESTARTED: list[subprocess.Popen[bytes]] = []


def restart_pcscd() -> None:
    """Stop the running pcscd and start it again with the same command line."""
    pid, argv = _running_pcscd()
    if "pcscd.service" in Path(f"/proc/{pid}/cgroup").read_text():  # systemd runs it
        subprocess.run(["systemctl", "restart", "pcscd.service"], check=True, timeout=30)
        wait_for(lambda: reader_name(0) in card_states(), within=20, what="pcscd to list its readers again")
        return
    ours = _parent(pid) == os.getpid()  # the pcscd fixture started it for this session
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not _alive(pid), within=10, what="pcscd to exit")
    if "--foreground" in argv or "-f" in argv:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _RESTARTED.append(proc)  # kept: it outlives the test, as the pcscd it replaced would have ...
        if ours:  # ... and ends with the session, as the fixture's would have
            atexit.register(proc.terminate)
    else:
        subprocess.run(argv, check=True, timeout=10)  # pcscd daemonizes
    wait_for(lambda: reader_name(0) in card_states(), within=20, what="pcscd to list its readers again")


@pytest.mark.skipif(not _restart_allowed(), reason="restarts the shared pcscd: set CI=true or "
                    "TOKENBRIDGE_TEST_RESTART_PCSCD=1")  # fmt: skip
def test_pcscd_restart_brings_the_reader_back_and_it_signs_again(
    stack: BridgeStack, vpcd_slot: VpcdSlot, tmp_path: Path
) -> None:
    stack.start_server()
    daemon = stack.start_client("build-vm-01", [vpcd_slot.index])
    stack.wait_card(vpcd_slot.index, daemon)
    cert = read_certificate_pem(vpcd_slot.index, "01", tmp_path / "cert.pem")
    restart_pcscd()
    stack.wait_card(vpcd_slot.index, daemon, timeout=30)  # the client re-attached to vpcd
    wait_for(lambda: holder(stack) is None, within=10, what="no lease held while pcscd was away")
    real_stack_sign(vpcd_slot, tmp_path, cert, 0)
