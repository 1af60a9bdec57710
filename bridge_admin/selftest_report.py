"""Text form of a `tokenbridge selftest` report (the dict `selftest.run_selftest` returns).

The USB part follows the layout of libccid's reader dumps (`parse`), so a report can be put
beside the dump of the same reader model and compared line by line.
"""

from __future__ import annotations

from typing import Any

ATTACH_HINT = "To report a problem: run `tokenbridge selftest --json > selftest.json` and attach the file."


def render_text(report: dict[str, Any]) -> str:
    lines = [f"tokenbridge selftest: {report['result'].upper()} ({report['target']})", ""]
    lines += _steps(report["steps"])
    if "usb" in report and "ccid" in report:
        lines += ["", "USB and CCID descriptors", *usb_dump(report["usb"], report["ccid"])]
    if "atr" in report:
        lines += ["", *_atr(report)]
    if report.get("power_on_messages"):
        lines += ["", "power-on, as the server's CCID driver did it"]
        for m in report["power_on_messages"]:
            status = f"bStatus 0x{m['bStatus']:02X} bError 0x{m['bError']:02X}"
            lines.append(f"  {m['command']:<40} {m['ms']:>9.3f} ms  {status}")
    if report["apdus"]:
        lines += ["", "APDUs (header and status word only)"]
        lines += [
            f"  {a['header']}  ->  {a['sw']}  {a['response_length']:>5} bytes  {a['ms']:>9.3f} ms"
            for a in report["apdus"]
        ]
    for key in ("select_round", "select_round_after_replug", "replug", "login", "signature"):
        if key in report:
            lines += ["", key.replace("_", " ")] + [f"  {k}: {v}" for k, v in report[key].items()]
    host = report["host"]
    lines += ["", "host: " + ", ".join(f"{k} {v}" for k, v in host.items()), "", ATTACH_HINT]
    return "\n".join(lines)


def _steps(steps: list[dict[str, Any]]) -> list[str]:
    out = [f"  {'STEP':<26} {'RESULT':<8} {'MS':>10}  DETAIL"]
    for s in steps:
        out.append(f"  {s['step']:<26} {s['status']:<8} {s['ms']:>10.3f}  {s['detail']}")
    return out


def usb_dump(usb: dict[str, Any], ccid: dict[str, Any]) -> list[str]:
    """The device and its CCID class descriptor in the reader-dump layout."""
    intf, eps = usb.get("interface", {}), usb.get("endpoints", [])
    kinds = [e["type"] for e in eps]
    pipes = "bulk-IN, bulk-OUT and Interrupt-IN" if "interrupt-IN" in kinds else "bulk-IN and bulk-OUT"
    bcd = usb["bcdDevice"]
    out = [
        f" idVendor: {usb['idVendor']}",
        f"  iManufacturer: {usb['iManufacturer']}",
        f" idProduct: {usb['idProduct']}",
        f"  iProduct: {usb['iProduct']}",
        f" bcdDevice: {bcd} (firmware release?)",
        f" iSerialNumber: {usb['iSerialNumber']}",
        f" bInterfaceNumber: {intf.get('bInterfaceNumber')}",
        f" bAlternateSetting: {intf.get('bAlternateSetting')}",
        f" bNumEndpoints: {intf.get('bNumEndpoints')}",
        f"  {pipes}",
        f" bInterfaceClass: {intf.get('bInterfaceClass')}",
        f" iInterface: {intf.get('iInterface')}",
    ]
    out += [f"  endpoint {e['bEndpointAddress']} {e['type']} max packet {e['wMaxPacketSize']}" for e in eps]
    return out + _ccid_dump(ccid)


def _ccid_dump(c: dict[str, Any]) -> list[str]:
    out = [
        " CCID Class Descriptor",
        f"  bcdCCID: {c['bcdCCID']}",
        f"  bMaxSlotIndex: 0x{c['bMaxSlotIndex']:02X}",
        f"  bVoltageSupport: 0x{c['bVoltageSupport']:02X}",
        *(f"   {mv / 1000:.1f}V" for mv in c["voltages_mv"]),
        f"  dwProtocols: 0x{c['dwProtocols'] >> 16:04X} 0x{c['dwProtocols'] & 0xFFFF:04X}",
        *(f"   T={t}" for t in c["protocols"]),
        f"  dwDefaultClock: {c['dwDefaultClock_khz'] / 1000:.3f} MHz",
        f"  dwMaximumClock: {c['dwMaximumClock_khz'] / 1000:.3f} MHz",
        f"  bNumClockSupported: {c['bNumClockSupported']}",
        f"  dwDataRate: {c['dwDataRate_bps']} bps",
        f"  dwMaxDataRate: {c['dwMaxDataRate_bps']} bps",
        f"  bNumDataRatesSupported: {c['bNumDataRatesSupported']}",
        f"  dwMaxIFSD: {c['dwMaxIFSD']}",
        f"  dwSynchProtocols: 0x{c['dwSynchProtocols']:08X}",
        f"  dwMechanical: 0x{c['dwMechanical']:08X}",
        f"  dwFeatures: {c['dwFeatures']}",
        *(f"   {text}" for text in c["features"]),
        f"  dwMaxCCIDMessageLength: {c['dwMaxCCIDMessageLength']} bytes",
        f"  bClassGetResponse: 0x{c['bClassGetResponse']:02X}",
        f"  bClassEnvelope: 0x{c['bClassEnvelope']:02X}",
        f"  wLcdLayout: 0x{c['wLcdLayout']:04X}",
        f"  bPINSupport: 0x{c['bPINSupport']:02X}",
        f"  bMaxCCIDBusySlots: {c['bMaxCCIDBusySlots']}",
    ]
    if c["effective_features"] != c["dwFeatures"]:
        out.append(f"  (tokenbridge applies a quirk: features used {c['effective_features']})")
    return out


def _atr(report: dict[str, Any]) -> list[str]:
    atr, t1, pps = report["atr"], report["t1"], report["pps"]
    out = ["ATR " + atr["raw"]]
    out += [f"  {k}: {v}" for k, v in atr.items() if k != "raw"]
    out += ["T=1 / protocol"] + [f"  {k}: {v}" for k, v in t1.items()]
    out += ["PPS"] + [f"  {k}: {v}" for k, v in pps.items()]
    return out
