"""What `tokenbridge selftest` learns about a token without sending it an APDU of its own.

`TappedDevice` is the server's `AsyncUsbDevice` with a recorder on the bulk pipes: the
selftest runs the server's unchanged `CcidDriver` over it and reads back which CCID messages
the power-up took (IccPowerOn, SetParameters, the T=1 S(IFS) request) and how long each took.
The recorder never keeps APDU bytes: an XfrBlock is recorded by length, and by its T=1
block kind only when it is an S-block (whose one data byte is the IFS), so a PIN sent later
cannot end up in a report.

The `describe_*` functions turn pyusb descriptors, the CCID class descriptor and the ATR into
plain dicts (the JSON report); `bridge_admin.selftest_report` renders them as text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from bridge_server.usb.ccid_policy import MAX_T1_IFS, t0_parameters, t1_parameters
from bridge_server.usb.transport import AsyncUsbDevice, UsbCcidDevice, find_ccid_interface
from protocol import ccid
from protocol.atr import Atr
from protocol.ccid import CcidClassDescriptor, ExchangeLevel, Feature, MessageType
from protocol.display import format_atr
from protocol.errors import MalformedCcidMessageError

MAX_TRACE: Final = 256  # a bounded recorder: the power-up needs ~5 messages, a replug ~5 more

# libccid's `parse` wording for each dwFeatures bit (as in the reader dumps).
FEATURE_TEXT: Final[dict[int, str]] = {
    0x2: "....02 Automatic parameter configuration based on ATR data",
    0x4: "....04 Automatic activation of ICC on inserting",
    0x8: "....08 Automatic ICC voltage selection",
    0x10: "....10 Automatic ICC clock frequency change according to parameters",
    0x20: "....20 Automatic baud rate change according to frequency and Fi, Di params",
    0x40: "....40 Automatic parameters negotiation made by the CCID",
    0x80: "....80 Automatic PPS made by the CCID",
    0x100: "..01.. CCID can set ICC in clock stop mode",
    0x200: "..02.. NAD value other than 00 accepted (T=1)",
    0x400: "..04.. Automatic IFSD exchange as first exchange (T=1)",
    0x800: "..08.. ICCD token",
}
LEVEL_TEXT: Final[dict[ExchangeLevel, str]] = {
    ExchangeLevel.CHARACTER: "00.... Character level exchange",
    ExchangeLevel.TPDU: "01.... TPDU level exchange",
    ExchangeLevel.SHORT_APDU: "02.... Short APDU level exchange",
    ExchangeLevel.EXTENDED_APDU: "04.... Short and Extended APDU level exchange",
}
# ISO 7816-3 Table 7/8: Fi and Di by their TA1 nibbles (None = RFU).
_FI: Final = (372, 372, 558, 744, 1116, 1488, 1860, None, None, 512, 768, 1024, 1536, 2048, None, None)
_DI: Final = (None, 1, 2, 4, 8, 16, 32, 64, 12, 20, None, None, None, None, None, None)
_S_IFS_WTX: Final = frozenset({0xC1, 0xE1, 0xC3, 0xE3})
_KEEP_DATA: Final = frozenset(
    {MessageType.PC_to_RDR_SetParameters, MessageType.RDR_to_PC_Parameters, MessageType.PC_to_RDR_IccPowerOn}
)


@dataclass
class TraceEntry:
    """One CCID message on the bulk pipes; `data` only where it cannot hold an APDU."""

    direction: str  # "out" (host to token) or "in"
    at_ms: float  # since the recorder started
    message: str
    seq: int
    length: int
    status: int | None = None
    error: int | None = None
    data: str = ""


class TappedDevice(AsyncUsbDevice):
    """`AsyncUsbDevice` that records every bulk message it moves (see the module docstring)."""

    def __init__(self, device: UsbCcidDevice, *, t1_tpdu: bool) -> None:
        super().__init__(device)
        self.usb = device
        self.trace: list[TraceEntry] = []
        self._t1_tpdu = t1_tpdu
        self._t0 = time.perf_counter()
        self._answer_atr = False

    async def transceive(self, data: bytes) -> bytes:
        self._record("out", data)
        raw = await super().transceive(data)
        self._record("in", raw)
        return raw

    async def read(self) -> bytes:
        raw = await super().read()
        self._record("in", raw)
        return raw

    def _record(self, direction: str, raw: bytes) -> None:
        if len(self.trace) >= MAX_TRACE:
            return
        at_ms = round((time.perf_counter() - self._t0) * 1000, 3)
        try:
            msg = ccid.decode_message(raw)
        except MalformedCcidMessageError:
            self.trace.append(TraceEntry(direction, at_ms, "malformed", -1, len(raw)))
            return
        entry = TraceEntry(direction, at_ms, msg.msg_type.name, msg.seq, len(msg.data))
        if direction == "in":
            entry.status, entry.error = msg.b7, msg.b8
        if msg.msg_type in _KEEP_DATA or (direction == "in" and self._answer_atr):
            entry.data = msg.data.hex()
        elif msg.msg_type in (MessageType.PC_to_RDR_XfrBlock, MessageType.RDR_to_PC_DataBlock):
            entry.data = _s_block(msg.data) if self._t1_tpdu else ""
        self._answer_atr = msg.msg_type is MessageType.PC_to_RDR_IccPowerOn
        self.trace.append(entry)


def _s_block(block: bytes) -> str:
    # ISO 7816-3 §11.3.2: NAD PCB LEN INF EDC; S(IFS)/S(WTX) request or response, one INF byte.
    if len(block) in (5, 6) and block[1] in _S_IFS_WTX and block[2] == 1:
        return block.hex()
    return ""


def message_counts(trace: list[TraceEntry]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in trace:
        if entry.direction == "out":
            counts[entry.message] = counts.get(entry.message, 0) + 1
    return counts


def describe_usb(device: UsbCcidDevice) -> dict[str, Any]:
    """The device, configuration, CCID interface and endpoint descriptors, as a dump shows them."""
    dev = device._dev  # the claimed pyusb device; reading descriptors does not touch the card
    found = find_ccid_interface(dev)
    out: dict[str, Any] = {
        "idVendor": f"0x{dev.idVendor:04X}",
        "idProduct": f"0x{dev.idProduct:04X}",
        "bcdUSB": f"{dev.bcdUSB >> 8:x}.{dev.bcdUSB & 0xFF:02x}",
        "bcdDevice": f"{dev.bcdDevice >> 8:x}.{dev.bcdDevice & 0xFF:02x}",
        "iManufacturer": _string(dev, "manufacturer"),
        "iProduct": _string(dev, "product"),
        "iSerialNumber": device.info.serial,
        "bus": device.info.bus,
        "address": device.info.address,
    }
    if found is None:  # cannot happen after UsbCcidDevice.open; kept for a clear report anyway
        return out
    cfg, intf, raw = found
    out["configuration"] = {
        "bConfigurationValue": int(cfg.bConfigurationValue),
        "bmAttributes": f"0x{int(cfg.bmAttributes):02X}",
        "bMaxPower_mA": 2 * int(cfg.bMaxPower),
    }
    out["interface"] = {
        "bInterfaceNumber": int(intf.bInterfaceNumber),
        "bAlternateSetting": int(intf.bAlternateSetting),
        "bNumEndpoints": int(intf.bNumEndpoints),
        "bInterfaceClass": f"0x{int(intf.bInterfaceClass):02X}",
        "bInterfaceSubClass": int(intf.bInterfaceSubClass),
        "bInterfaceProtocol": int(intf.bInterfaceProtocol),
        "iInterface": _interface_string(intf),
    }
    out["endpoints"] = [_endpoint(ep) for ep in intf]
    out["ccid_descriptor_hex"] = raw.hex()
    return out


def _string(dev: Any, attr: str) -> str:
    try:
        return str(getattr(dev, attr) or "")
    except Exception:  # an unreadable string descriptor is itself worth reporting as empty
        return ""


def _interface_string(intf: Any) -> str:
    # The string itself needs a control transfer; the index is enough to tell "none" apart.
    index = int(intf.iInterface)
    return f"string #{index}" if index else "?"


def _endpoint(ep: Any) -> dict[str, Any]:
    kind = {0: "control", 1: "isochronous", 2: "bulk", 3: "interrupt"}[int(ep.bmAttributes) & 0x03]
    direction = "IN" if int(ep.bEndpointAddress) & 0x80 else "OUT"
    return {
        "bEndpointAddress": f"0x{int(ep.bEndpointAddress):02X}",
        "type": f"{kind}-{direction}",
        "wMaxPacketSize": int(ep.wMaxPacketSize),
        "bInterval": int(ep.bInterval),
    }


def describe_ccid(desc: CcidClassDescriptor, features: int) -> dict[str, Any]:
    """Every field of the class descriptor, decoded where the dump decodes it."""
    return {
        "bcdCCID": f"{desc.bcd_ccid >> 8}.{desc.bcd_ccid & 0xFF:02x}",
        "bMaxSlotIndex": desc.max_slot_index,
        "bVoltageSupport": desc.voltage_support,
        "voltages_mv": sorted(desc.supported_voltages_mv, reverse=True),
        "dwProtocols": desc.protocols,
        "protocols": sorted(desc.supported_protocols),
        "dwDefaultClock_khz": desc.default_clock_khz,
        "dwMaximumClock_khz": desc.maximum_clock_khz,
        "bNumClockSupported": desc.num_clock_supported,
        "dwDataRate_bps": desc.data_rate_bps,
        "dwMaxDataRate_bps": desc.max_data_rate_bps,
        "bNumDataRatesSupported": desc.num_data_rates_supported,
        "dwMaxIFSD": desc.max_ifsd,
        "dwSynchProtocols": desc.synch_protocols,
        "dwMechanical": desc.mechanical,
        "dwFeatures": f"0x{desc.features:08X}",
        "features": [text for bit, text in FEATURE_TEXT.items() if desc.features & bit]
        + [LEVEL_TEXT[desc.exchange_level]],
        "effective_features": f"0x{features:08X}",
        "dwMaxCCIDMessageLength": desc.max_ccid_message_length,
        "bClassGetResponse": desc.class_get_response,
        "bClassEnvelope": desc.class_envelope,
        "wLcdLayout": desc.lcd_layout,
        "bPINSupport": desc.pin_support,
        "bMaxCCIDBusySlots": desc.max_ccid_busy_slots,
        "exchange_level": desc.exchange_level.value,
    }


def describe_atr(atr: Atr) -> dict[str, Any]:
    groups = [{k: f"0x{v:02X}" for k, v in group.items()} for group in atr.interface_bytes]
    return {
        "raw": format_atr(atr.raw),  # the ATR as status and the client show it (protocol.display)
        "TS": f"0x{atr.ts:02X} ({'direct' if atr.ts == 0x3B else 'inverse'} convention)",
        "T0": f"0x{atr.t0:02X}",
        "interface_bytes": groups,
        "historical": format_atr(atr.historical),
        "historical_text": "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in atr.historical),
        "TCK": None if atr.tck is None else f"0x{atr.tck:02X}",
        "protocols": list(atr.protocols),
        "specific_mode": atr.specific_mode,
        "TA1": None if atr.ta1 is None else f"0x{atr.ta1:02X}",
        "Fi_Di": _fi_di(atr.ta1),
        "TC1_extra_guard_time": atr.tc1 or 0,
    }


def _fi_di(ta1: int | None) -> str:
    if ta1 is None:
        return "Fi=372 Di=1 (default, no TA1)"
    fi, di = _FI[ta1 >> 4], _DI[ta1 & 0x0F]
    return f"Fi={fi or 'RFU'} Di={di or 'RFU'}"


def describe_t1(atr: Atr, desc: CcidClassDescriptor, features: int, protocol: int) -> dict[str, Any]:
    """T=1 as the card offers it and as the host set it up (who negotiates IFSD, and to what)."""
    level = desc.exchange_level
    by_host = level is ExchangeLevel.TPDU and protocol == 1
    ifsd = min(desc.max_ifsd, MAX_T1_IFS)
    if not by_host:
        ifsd_how = f"by the reader ({level.value} level): the host sees no T=1 blocks"
    elif features & Feature.AUTO_IFSD:
        ifsd_how = "by the reader (dwFeatures AUTO_IFSD or a firmware quirk): no S(IFS) sent"
    else:
        ifsd_how = f"by the host: S(IFS request) with IFSD {ifsd}"
    return {
        "protocol_chosen": protocol,
        "t1_by_host": by_host,
        "IFSC": atr.ifsc,
        "BWI": atr.bwi,
        "CWI": atr.cwi,
        "checksum": atr.checksum.value,
        "IFSD": ifsd,
        "IFSD_negotiated": ifsd_how,
    }


def describe_pps(atr: Atr, features: int, protocol: int) -> dict[str, Any]:
    """tokenbridge never sends a PPS (ccid_driver.py); what applies instead, and why."""
    params = t1_parameters(atr) if protocol == 1 else t0_parameters(atr)
    if features & Feature.AUTO_PPS_PROP:
        who = "the reader negotiates (dwFeatures AUTO_PPS_PROP); no SetParameters sent"
    elif features & Feature.AUTO_PPS_CUR:
        who = "the reader runs a PPS from the SetParameters values (dwFeatures AUTO_PPS_CUR)"
    else:
        who = "none: the card stays at its default Fd/Dd unless in specific mode (TA2)"
    return {
        "pps_sent_by_host": False,
        "pps_by": who,
        "set_parameters": params.hex(" ").upper(),
        "bmFindexDindex": f"0x{params[0]:02X} ({_fi_di(params[0])})",
        "atr_offers": _fi_di(atr.ta1),
    }
