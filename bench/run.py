"""The benchmark scenarios (DESIGN §9): direct simulator vs the bridge, side by side.

Two vpcd slots are claimed: slot A shows a direct baseline, slot B the same simulated token
through tokenbridge-client -> TLS -> tokenbridge-server -> pyusb -> simulated USB token. Two
baselines take turns in slot A: "card" (the PIV card straight to vpcd, no USB at all) and "usb"
(`--via-usb`: the same simulated USB token and the server's own pyusb/CCID/T=1 host stack, without
the bridge), so "bridge overhead" against "usb" is client + TLS + server only. Every comparison
alternates between A and B in one run, so machine noise hits both alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.pcsc import Card
from bench.stats import rss_mb, summarize_ms
from bridge_admin.local_stack import (
    VPCD_BASE_PORT,
    BridgeStack,
    Daemon,
    card_present,
    claim_vpcd_slot,
    reader_name,
    wait_for,
)
from bridge_admin.signing_tools import minimal_pe, osslsigncode_sign, read_certificate_pem
from bridge_admin.signing_tools import pkcs11_sign as run_pkcs11_sign

REPO = Path(__file__).resolve().parents[1]
PROFILE = "safenet-5110"
PROFILES = ("safenet-5110", "yubikey5")  # TPDU T=1 and extended-APDU level
BASELINES = ("card", "usb")
CLIENT = "bench-vm"
PIN = "123456"
SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")


@dataclass
class Direct:
    slot: int
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def direct_simulator(
    slot: int, workdir: Path, profile: str = PROFILE, baseline: str = "card"
) -> Iterator[Direct]:
    """`python -m bridge_server.simulator --vpcd` on `slot` (the baseline), zero card delay;
    baseline "usb" adds `--via-usb` (the same simulated USB token the bridge server drives)."""
    cmd = [
        sys.executable,
        "-m",
        "bridge_server.simulator",
        "--vpcd",
        f"127.0.0.1:{VPCD_BASE_PORT + slot}",
        "--profile",
        profile,
        "--state",
        str(workdir / "direct-state.json"),
        *(["--via-usb"] if baseline == "usb" else []),
    ]
    with open(workdir / "direct.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: card_present(slot), timeout=30, what=f"the direct card in {reader_name(slot)}")
        yield Direct(slot, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        wait_for(lambda: not card_present(slot), timeout=30, what="the direct card to go")


@contextlib.contextmanager
def bridge(slot: int, workdir: Path, profile: str = PROFILE) -> Iterator[BridgeStack]:
    stack = BridgeStack(workdir / f"stack-{profile}", profiles=[profile], log_level="info")
    try:
        stack.make_pki([CLIENT])
        stack.write_server_config(allow=[CLIENT])
        stack.start_server()
        stack.wait_card(slot, stack.start_client(CLIENT, [slot]))
        yield stack
    finally:
        stack.stop()


def client_daemon(stack: BridgeStack) -> Daemon:
    return next(d for d in stack.daemons if d.name == f"client-{CLIENT}")


@contextlib.contextmanager
def client_via_proxy(stack: BridgeStack, slot: int, delay_ms: float) -> Iterator[Daemon]:
    """Replace the bridge client by one that reaches the server through the fault proxy."""
    old = client_daemon(stack)
    old.stop()
    stack.daemons.remove(old)
    wait_for(lambda: not card_present(slot), timeout=30, what="the bridged card to go")
    proxy = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests/support/faultproxy.py"),
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{stack.server_port}",
            "--delay-ms",
            str(delay_ms),
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        assert proxy.stdout is not None
        port = int(proxy.stdout.readline().split()[-1].rsplit(b":", 1)[-1])
        config = stack.write_client_config(CLIENT, [slot])
        config.write_text(config.read_text().replace(f"127.0.0.1:{stack.server_port}", f"127.0.0.1:{port}"))
        cmd = [sys.executable, "-m", "bridge_client", "--config", str(config), "--log-level", "info"]
        daemon = stack._spawn(f"client-{CLIENT}", cmd)
        stack.wait_card(slot, daemon)
        yield daemon
    finally:
        for d in [d for d in stack.daemons if d.name == f"client-{CLIENT}"]:
            d.stop()
            stack.daemons.remove(d)
        proxy.terminate()
        proxy.wait(timeout=10)
        wait_for(lambda: not card_present(slot), timeout=30, what="the proxied card to go")
        stack.wait_card(slot, stack.start_client(CLIENT, [slot]))


def apdu_samples(slot: int, n: int, *, warmup: int = 20) -> tuple[list[float], float]:
    """Per-APDU wall times of SELECT PIV through PC/SC, and the APDU/s of the timed loop."""
    samples = []
    with Card(reader_name(slot)) as card:
        for _ in range(warmup):
            assert card.transmit(SELECT_PIV)[-2:] == b"\x90\x00"
        started = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            resp = card.transmit(SELECT_PIV)
            samples.append(time.perf_counter() - t0)
            assert resp[-2:] == b"\x90\x00", resp.hex()
        total = time.perf_counter() - started
    return samples, n / total


def interleaved_latency(direct: int, bridged: int, n: int, rounds: int = 5) -> dict[str, object]:
    d: list[float] = []
    b: list[float] = []
    d_rate: list[float] = []
    b_rate: list[float] = []
    for _ in range(rounds):
        s, r = apdu_samples(direct, n // rounds)
        d += s
        d_rate.append(r)
        s, r = apdu_samples(bridged, n // rounds)
        b += s
        b_rate.append(r)
    ds, bs = summarize_ms(d), summarize_ms(b)
    return {
        "direct": ds,
        "bridge": bs,
        "added_p50_ms": round(bs["p50_ms"] - ds["p50_ms"], 4),
        "added_p99_ms": round(bs["p99_ms"] - ds["p99_ms"], 4),
        "direct_apdu_per_s": round(sorted(d_rate)[len(d_rate) // 2]),
        "bridge_apdu_per_s": round(sorted(b_rate)[len(b_rate) // 2]),
    }


def pkcs11_sign(slot: int, workdir: Path) -> float:
    data = workdir / "data.bin"
    data.write_bytes(b"benchmark input " * 64)
    t0 = time.perf_counter()
    run_pkcs11_sign(slot, data, workdir / f"sig-{slot}.bin")
    return time.perf_counter() - t0


def ossl_sign(slot: int, workdir: Path) -> float:
    cert = workdir / f"cert-{slot}.pem"
    if not cert.exists():
        read_certificate_pem(slot, "01", cert)
    program = workdir / "program.exe"
    program.write_bytes(minimal_pe(b"\xc3 tokenbridge benchmark" * 20))
    t0 = time.perf_counter()
    osslsigncode_sign(slot, cert, program, workdir / f"signed-{slot}.exe")
    return time.perf_counter() - t0


@contextlib.contextmanager
def only_reader(slot: int, workdir: Path) -> Iterator[None]:
    """Hide the other vpcd reader from OpenSC: both simulated tokens carry the same PIV serial,
    so a `pkcs11:serial=...` URI would otherwise pick either of them."""
    other = reader_name(1 - slot if slot in (0, 1) else 0)
    conf = workdir / f"opensc-only-{slot}.conf"
    conf.write_text(f'app default {{\n  ignored_readers = "{other}";\n}}\n')
    old = os.environ.get("OPENSC_CONF")
    os.environ["OPENSC_CONF"] = str(conf)
    try:
        yield
    finally:
        if old is None:
            del os.environ["OPENSC_CONF"]
        else:
            os.environ["OPENSC_CONF"] = old


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def side_by_side(fn: object, direct: int, bridged: int, workdir: Path, runs: int) -> dict[str, float]:
    d, b = [], []
    for _ in range(runs):
        with only_reader(direct, workdir):
            d.append(fn(direct, workdir))  # type: ignore[operator]
        with only_reader(bridged, workdir):
            b.append(fn(bridged, workdir))  # type: ignore[operator]
    return {
        "direct_s": round(median(d), 4),
        "bridge_s": round(median(b), 4),
        "ratio": round(median(b) / median(d), 3),
        "runs": runs,
    }


def lease_apdus(stack: BridgeStack) -> tuple[int, int, int]:
    """(leases ended, APDUs in them, round trips in them) so far, from the server's JSON log."""
    assert stack.server is not None
    leases = apdus = trips = 0
    for line in stack.server.log_path.read_text().splitlines():
        if '"lease.ended"' in line:
            with contextlib.suppress(ValueError):
                ended = json.loads(line)
                apdus += int(ended.get("apdus", 0))
                trips += int(ended.get("round_trips", 0))  # issue 17: counted by the server
                leases += 1
    return leases, apdus, trips


def round_trips(stack: BridgeStack, slot: int, workdir: Path, runs: int) -> dict[str, float]:
    """Round trips (lease request or LeaseExchange, then every CCID frame the client waited for)
    and APDUs per `pkcs11-tool --sign`, from lease.ended; `python -m bench.roundtrips` has more.

    One lease per signature: wait for each lease to end before the next. The first wait also
    collects the lease of earlier measurements, so the median over the runs is reported."""
    per_op = []
    for _ in range(runs):
        before = lease_apdus(stack)
        pkcs11_sign(slot, workdir)
        # The lease ends after pcscd powers the idle card off (its grace period) plus our linger.
        wait_for(lambda n=before[0]: lease_apdus(stack)[0] > n, timeout=60, what="the lease to end")
        after = lease_apdus(stack)
        per_op.append((after[1] - before[1], after[2] - before[2]))
    apdus = median([float(a) for a, _ in per_op])
    trips = median([float(t) for _, t in per_op])
    return {"apdus_per_sign": apdus, "round_trips_per_sign": trips, "runs": runs}


@contextlib.contextmanager
def swarm(stack: BridgeStack, count: int) -> Iterator[subprocess.Popen[bytes]]:
    bundle = stack.pki.folder / "clients" / CLIENT
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.swarm",
            "--server",
            f"127.0.0.1:{stack.server_port}",
            "--bundle",
            str(bundle),
            "--name",
            CLIENT,
            "--count",
            str(count),
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"swarm of {count} clients did not come up: {line!r}")
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def daemon_rss(stack: BridgeStack) -> dict[str, float]:
    assert stack.server is not None
    return {"server_mb": rss_mb(stack.server.proc.pid), "client_mb": rss_mb(client_daemon(stack).proc.pid)}


__all__ = ["bridge", "claim_vpcd_slot", "direct_simulator"]
