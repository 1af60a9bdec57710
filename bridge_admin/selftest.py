"""`tokenbridge selftest`: check a token on the token host and write what a bug report needs.

Run it with the server stopped (or the token out of service): it finds and claims the token
exactly as tokenbridge-server does (`bridge_server.usb.transport.UsbCcidDevice.open`, the
server's `CcidDriver`, the same config `match`), then reports, each step timed:

  USB identity and descriptors  ->  CCID class descriptor and exchange level  ->  slot status
  ->  power-on (ATR parsed, T=1 parameters, IFSD, PPS, every CCID message of it)
  ->  SELECT / GET DATA  ->  unplug and replug (only if the user agrees at the prompt)
  ->  with --pin-from: login and a signature verified against the card's certificate.

No PIN is ever sent unless one is given; then it goes into exactly one VERIFY (see
`selftest_card`). The report is a dict (`--json`) or text (`selftest_report.render_text`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import trio

from bridge_admin.selftest_card import CardStepError, login, select_round, sign_and_verify
from bridge_admin.selftest_probe import (
    TappedDevice,
    describe_atr,
    describe_ccid,
    describe_pps,
    describe_t1,
    describe_usb,
)
from bridge_admin.selftest_target import Target, read_pin, resolve_target
from bridge_server.errors import DeviceBusyError, DeviceError
from bridge_server.usb.ccid_driver import CcidDriver
from bridge_server.usb.ccid_policy import choose_protocol, effective_features
from bridge_server.usb.transport import UsbCcidDevice, list_ccid_devices
from protocol.atr import Atr
from protocol.ccid import ExchangeLevel
from protocol.errors import BridgeError
from protocol.runtime.logging import configure_logging

REPORT_FORMAT: Final = 1
REPLUG_WAIT_S: Final = 60.0
POLL_S: Final = 0.25
SERVER_HOLDS_IT: Final = (
    "tokenbridge-server (or pcscd) has the token claimed: stop the server "
    "(systemctl stop tokenbridge-server) or take this token out of its config, then run selftest again"
)
_T = TypeVar("_T")


class Prompter(Protocol):
    """Asks the person at the token host; `event` names what they are asked to do."""

    def confirm(self, question: str) -> bool: ...
    def say(self, event: str, text: str) -> None: ...


class TtyPrompter:
    def confirm(self, question: str) -> bool:
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip().lower() in ("y", "yes")

    def say(self, event: str, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


@dataclass
class Options:
    pin: bytearray | None = None
    pin_source: str = ""
    key_ref: int = 0x9C
    prompter: Prompter | None = None  # None: the replug step is skipped
    skip_replug_reason: str = ""
    replug_wait_s: float = REPLUG_WAIT_S


class _Stop(Exception):
    """A step the rest depends on failed; the report is complete as it stands."""


@dataclass
class Report:
    target: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    apdus: list[dict[str, Any]] = field(default_factory=list)

    async def step(self, name: str, fn: Callable[[], Awaitable[_T]], *, fatal: bool = False) -> _T | None:
        started = time.perf_counter()
        try:
            value = await fn()
        except (BridgeError, CardStepError, OSError, ValueError) as exc:
            self._add(name, "fail", started, _explain(exc))
            if fatal:
                raise _Stop from exc
            return None
        self._add(name, "ok", started, "")
        return value

    def skip(self, name: str, reason: str) -> None:
        self.steps.append({"step": name, "status": "skipped", "ms": 0.0, "detail": reason})

    def _add(self, name: str, status: str, started: float, detail: str) -> None:
        ms = round((time.perf_counter() - started) * 1000, 3)
        self.steps.append({"step": name, "status": status, "ms": ms, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        failed = [s["step"] for s in self.steps if s["status"] == "fail"]
        return {
            "tokenbridge_selftest": REPORT_FORMAT,
            "result": "fail" if failed else "ok",
            "failed_steps": failed,
            "host": _host(),
            "target": self.target,
            "steps": self.steps,
            **self.sections,
            "apdus": self.apdus,
        }


def _explain(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return f"{text}; {SERVER_HOLDS_IT}" if isinstance(exc, DeviceBusyError) else text


def _host() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "tokenbridge": version("tokenbridge"),
        "pyusb": version("pyusb"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---- the run ----


async def run_selftest(target: Target, options: Options) -> dict[str, Any]:
    report = Report(target.source)
    holder: dict[str, Any] = {}
    try:
        await _run(report, target, options, holder)
    except _Stop:
        pass
    finally:
        driver, device = holder.get("driver"), holder.get("device")
        if driver is not None:
            await report.step("power off", driver.power_off)
        if device is not None:
            await device.aclose()
    return report.to_dict()


async def _run(report: Report, target: Target, options: Options, holder: dict[str, Any]) -> None:
    seen = await report.step("enumerate", lambda: _sync(list_ccid_devices, target.backend), fatal=True)
    report.sections["ccid_devices_seen"] = [info.describe() for info in seen or []]
    device, driver = await _open(report, target, holder, "open")
    report.sections["usb"] = describe_usb(device.usb)
    desc, info = device.descriptor, device.info
    features = effective_features(desc, info)
    report.sections["ccid"] = describe_ccid(desc, features)
    await _power_on(report, driver, device, features)
    await report.step("select / get data", lambda: _round(report, driver, "select_round"))
    await _replug(report, target, options, holder)
    driver = holder["driver"]
    if options.pin is None:
        report.skip("login", "no PIN given (--pin-from FILE|env:VAR); no PIN was sent")
        report.skip("signature", "needs the login")
        return
    transmit = _recording(report, driver.transmit)
    done = await report.step("login", lambda: login(transmit, options.pin or bytearray()))
    report.sections["login"] = {"pin_from": options.pin_source, **(done or {"verified": False})}
    if done is None:
        report.skip("signature", "login failed")
        return
    signed = await report.step("signature", lambda: sign_and_verify(transmit, options.key_ref))
    report.sections["signature"] = signed or {"verified": False}


async def _sync(fn: Callable[..., _T], *args: Any) -> _T:
    return await trio.to_thread.run_sync(fn, *args)


async def _open(
    report: Report, target: Target, holder: dict[str, Any], name: str
) -> tuple[TappedDevice, CcidDriver]:
    usb = await report.step(
        name, lambda: _sync(lambda: UsbCcidDevice.open(target.match, backend=target.backend)), fatal=True
    )
    assert usb is not None
    device = TappedDevice(usb, t1_tpdu=usb.descriptor.exchange_level is ExchangeLevel.TPDU)
    holder["device"] = device

    async def make_driver() -> CcidDriver:
        return CcidDriver(device)

    driver = await report.step("ccid driver", make_driver, fatal=True)
    assert driver is not None
    holder["driver"] = driver
    return device, driver


async def _power_on(report: Report, driver: CcidDriver, device: TappedDevice, features: int) -> None:
    async def present() -> None:
        if not await driver.slot_present():
            raise DeviceError("the reader reports no card in its slot (GetSlotStatus: absent)")

    await report.step("slot status", present, fatal=True)
    mark = len(device.trace)
    raw = await report.step("power on", driver.power_on, fatal=True)
    assert raw is not None
    atr = Atr.parse(raw)
    protocol = choose_protocol(atr, device.descriptor)
    report.sections["atr"] = describe_atr(atr)
    report.sections["t1"] = describe_t1(atr, device.descriptor, features, protocol)
    report.sections["pps"] = describe_pps(atr, features, protocol)
    report.sections["power_on_messages"] = _paired(device, mark)
    report.sections["ccid_trace"] = [asdict(e) for e in device.trace]


def _paired(device: TappedDevice, start: int) -> list[dict[str, Any]]:
    """Each command of the power-up with its answer and the time between them."""
    out, pending = [], {}
    for entry in device.trace[start:]:
        if entry.direction == "out":
            pending[entry.seq] = entry
        elif entry.seq in pending and entry.status is not None and entry.status & 0xC0 != 0x80:
            sent = pending.pop(entry.seq)
            name = sent.message.removeprefix("PC_to_RDR_")
            if sent.data and name == "XfrBlock":
                name = f"XfrBlock T=1 S-block {sent.data}"  # S(IFS request): the IFSD
            ms = round(entry.at_ms - sent.at_ms, 3)
            out.append({"command": name, "ms": ms, "bStatus": entry.status, "bError": entry.error})
    return out


async def _round(report: Report, driver: CcidDriver, key: str) -> None:
    report.sections[key] = await select_round(_recording(report, driver.transmit))


def _recording(report: Report, transmit: Callable[[bytes], Awaitable[bytes]]) -> Any:
    async def send(apdu: bytes) -> bytes:
        started = time.perf_counter()
        rapdu = await transmit(apdu)
        report.apdus.append(
            {
                "header": apdu[:4].hex(" ").upper(),  # never the data: a VERIFY carries the PIN
                "sw": rapdu[-2:].hex().upper(),
                "response_length": max(0, len(rapdu) - 2),
                "ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )
        return rapdu

    return send


async def _replug(report: Report, target: Target, options: Options, holder: dict[str, Any]) -> None:
    prompter = options.prompter
    if prompter is None:
        report.skip("replug", options.skip_replug_reason or "not asked")
        return
    question = "Unplug/replug test: unplug the token when told and plug it back in. Run it?"
    if not await trio.to_thread.run_sync(prompter.confirm, question):
        report.skip("replug", "declined at the prompt")
        return
    await report.step("power off before unplug", holder.pop("driver").power_off)
    await holder.pop("device").aclose()
    prompter.say("unplug_now", f"unplug the token now (waiting up to {options.replug_wait_s:g} s)")
    await report.step("unplug seen", lambda: _wait_for(target, False, options.replug_wait_s), fatal=True)
    prompter.say("replug_now", f"plug it back in now (waiting up to {options.replug_wait_s:g} s)")
    await report.step("replug seen", lambda: _wait_for(target, True, options.replug_wait_s), fatal=True)
    device, driver = await _open(report, target, holder, "reopen")
    features = effective_features(device.descriptor, device.info)
    await _power_on_again(report, driver, device, features)


async def _power_on_again(report: Report, driver: CcidDriver, device: TappedDevice, features: int) -> None:
    mark = len(device.trace)
    atr = await report.step("power on after replug", driver.power_on, fatal=True)
    report.sections["replug"] = {
        "atr_unchanged": atr == bytes.fromhex(report.sections["atr"]["raw"]),
        "power_on_messages": _paired(device, mark),
    }
    await report.step("select after replug", lambda: _round(report, driver, "select_round_after_replug"))


async def _wait_for(target: Target, present: bool, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        while True:
            seen = await _sync(list_ccid_devices, target.backend)
            if any(target.match.matches(info) for info in seen) == present:
                return
            await trio.sleep(POLL_S)
    state = "plugged in" if present else "unplugged"
    raise DeviceError(f"the token was not {state} within {timeout_s:g} s ({target.match.describe()})")


# ---- command line ----


def add_selftest_parser(sub: Any) -> None:
    p = sub.add_parser(
        "selftest",
        help="check a token on the token host (server stopped) and print a report for bug reports",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="server config to find the token by (default: /etc/tokenbridge/server.yaml)",
    )
    p.add_argument("--token", help="which token of the config (default: the only one)")
    p.add_argument("--simulate", metavar="PROFILE", help="test a simulated token instead (CI, no hardware)")
    p.add_argument("--pin-from", metavar="FILE|env:VAR", help="log in and sign with the PIN read from here")
    p.add_argument("--key", default="9c", choices=["9a", "9c", "9d", "9e"], help="PIV key to sign with")
    p.add_argument("--no-replug", action="store_true", help="skip the unplug/replug prompt")
    p.add_argument("--json", action="store_true", help="print the report as JSON (attach it to an issue)")


def run_selftest_command(args: argparse.Namespace) -> int:
    from bridge_admin.selftest_report import render_text

    # stdout carries the report (--json must stay parseable); the driver's log goes to stderr.
    configure_logging(level="warning", stream=sys.stderr)
    target = resolve_target(args.config, args.token, args.simulate)
    options = Options(key_ref=int(args.key, 16))
    if args.pin_from:
        options.pin, options.pin_source, warning = read_pin(args.pin_from)
        if warning:
            print(f"tokenbridge selftest: warning: {warning}", file=sys.stderr)
    if args.no_replug:
        options.skip_replug_reason = "--no-replug"
    elif not sys.stdin.isatty():
        options.skip_replug_reason = "stdin is not a terminal (nobody to unplug the token)"
    else:
        options.prompter = TtyPrompter()
    try:
        report = trio.run(run_selftest, target, options)
    finally:
        if options.pin is not None:
            options.pin[:] = b"\x00" * len(options.pin)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0 if report["result"] == "ok" else 1
