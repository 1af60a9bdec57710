"""USB/CCID identities of real code-signing tokens, for the simulator.

Descriptor values come from LudovicRousseau/CCID `readers/` dumps (copied in
shared/reference/ccid-readers/, summarised in protocol-reference §5); field names follow
`protocol.ccid.CcidClassDescriptor`. The card behind each is always the simulated PIV
application, so each ATR must (a) offer T=1 only (protocol-reference §2.3, §1.12) and (b) make
OpenSC 0.23 pick its PIV driver; where the real token's ATR is claimed by another OpenSC driver,
the profile uses a PIV-shaped ATR instead and says why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from protocol.ccid import CcidClassDescriptor


@dataclass(frozen=True)
class Profile:
    name: str
    vid: int
    pid: int
    bcd_device: int
    manufacturer: str
    product: str
    serial: str
    interface_number: int
    descriptor: CcidClassDescriptor
    has_interrupt: bool
    atr: bytes
    escape_supported: bool
    note: str = ""
    # Whether the reader sends RDR_to_PC time extensions while the card works (CCID 1.1 §6.2.7).
    sends_time_extensions: bool = True
    # The answer to GET_DATA_RATES (CCID 1.1 §5.3.3); empty: the request stalls, as on most tokens.
    data_rates: tuple[int, ...] = ()


SAFENET_5110: Final = Profile(
    name="safenet-5110",
    vid=0x0529,
    pid=0x0620,
    bcd_device=0x0100,
    manufacturer="SafeNet",
    product="Token JC",
    serial="0247A1B2",
    interface_number=0,
    # readers/SafeNet_Token_JC.txt: TPDU level, T=0/T=1, IFSD 252, 271-byte messages.
    descriptor=CcidClassDescriptor(
        voltage_support=0x07,
        protocols=0x03,
        default_clock_khz=4000,
        maximum_clock_khz=4000,
        data_rate_bps=10752,
        max_data_rate_bps=10752,
        max_ifsd=252,
        features=0x0001023C,
        max_ccid_message_length=271,
    ),
    has_interrupt=True,
    # protocol-reference §1.12: the eToken 5100/5110 ATR with the good firmware (IFSC 254).
    # OpenSC 0.23 has no ATR-matching driver for it, so the PIV driver's APDU probe claims it.
    atr=bytes.fromhex("3B D5 18 00 81 31 FE 7D 80 73 C8 21 10 F4"),
    # libccid sends PC_to_RDR_Escape only to 08E6 devices; the 5110 (0529) answers it anyway.
    escape_supported=True,
)

YUBIKEY5: Final = Profile(
    name="yubikey5",
    vid=0x1050,
    pid=0x0407,
    bcd_device=0x0503,
    manufacturer="Yubico",
    product="YubiKey OTP+FIDO+CCID",
    serial="17331337",
    interface_number=2,  # readers/Yubico_Yubikey_4_OTP+U2F+CCID.txt: CCID on interface 2
    # Extended APDU level, T=1 only, 3072-byte messages, IFSD 3062, class bytes FF (echo).
    descriptor=CcidClassDescriptor(
        bcd_ccid=0x0100,
        voltage_support=0x07,
        protocols=0x02,
        default_clock_khz=4000,
        maximum_clock_khz=4000,
        data_rate_bps=307200,
        max_data_rate_bps=307200,
        max_ifsd=3062,
        features=0x000400FE,
        max_ccid_message_length=3072,
        class_get_response=0xFF,
        class_envelope=0xFF,
    ),
    has_interrupt=True,
    # protocol-reference §1.12: YubiKey 5 ATR; historical compact-TLV tag 5 "YubiKey" makes
    # OpenSC's PIV driver claim it (as YUBIKEY4 type) before the OpenPGP driver.
    atr=bytes.fromhex("3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40"),
    escape_supported=False,
)

ETOKEN_FUSION: Final = Profile(
    name="etoken-fusion",
    vid=0x08E6,
    pid=0x34D2,
    bcd_device=0x0001,
    manufacturer="SafeNet",
    product="eToken Fusion",
    serial="2A7F0C11",
    interface_number=1,  # readers/SafeNet_eToken_Fusion.txt: CCID on interface 1
    # Extended APDU level with only 275-byte messages, so the host must chain (libccid §1.10.4).
    descriptor=CcidClassDescriptor(
        voltage_support=0x02,
        protocols=0x03,
        default_clock_khz=4800,
        maximum_clock_khz=4800,
        data_rate_bps=12903,
        max_data_rate_bps=825806,
        max_ifsd=254,
        features=0x00040472,
        max_ccid_message_length=275,
    ),
    has_interrupt=True,
    # The real Fusion carries an IDPrime chip whose ATR (3B 7F 96 00 00 80 31 80 65 B0 ...) offers
    # T=0 only, and our CCID device side speaks T=1. So the ATR is the 5110-family T=1 shape
    # (IFSC 254) with compact-TLV historical bytes naming the PIV AID (tag F, 9 bytes), which
    # OpenSC 0.23 maps to its PIV_II_HIST card type. Verified: OpenSC picks the PIV driver.
    atr=bytes.fromhex("3B DB 18 00 81 31 FE 7D 80 F9 A0 00 00 03 08 00 00 10 00 32"),
    escape_supported=True,
    note="atr replaced: the real IDPrime ATR offers T=0 only",
    # libccid commit e919724 (2025-10): this reader implements no time extension requests,
    # so a long on-board key generation is silent until the answer comes.
    sends_time_extensions=False,
)

EPASS2003: Final = Profile(
    name="epass2003",
    vid=0x096E,
    pid=0x0807,
    bcd_device=0x0100,
    manufacturer="FS",
    product="USB Token",
    serial="2003B7E5",
    interface_number=0,
    # readers/Feitian_ePass2003_PKI.txt: 2 endpoints (no interrupt-IN), T=1, 5 V, 3.58 MHz,
    # extended APDU with the ICCD-token bit, 2100-byte messages, IFSD 2048, class bytes FF.
    descriptor=CcidClassDescriptor(
        voltage_support=0x01,
        protocols=0x02,
        default_clock_khz=3580,
        maximum_clock_khz=3580,
        data_rate_bps=9600,
        max_data_rate_bps=9600,
        max_ifsd=2048,
        features=0x00040840,
        max_ccid_message_length=2100,
        class_get_response=0xFF,
        class_envelope=0xFF,
    ),
    has_interrupt=False,
    # The real ePass2003 ATR (3B 9F 95 81 31 FE 9F 00 66 46 53 05 ...) is claimed by OpenSC
    # 0.23's epass2003 driver (checked with OPENSC_DEBUG: "matched: epass2003", then its init
    # fails and OpenSC falls back to PIV only after sending secure-messaging APDUs). Same
    # interface bytes (TA1 95, T=1, IFSC FE, BWI/CWI 9F) with "FS PIV" historical bytes instead.
    atr=bytes.fromhex("3B 96 95 81 31 FE 9F 46 53 20 50 49 56 A8"),
    escape_supported=False,
    note="atr replaced: the real ePass2003 ATR selects OpenSC's epass2003 driver",
)

PROFILES: Final[dict[str, Profile]] = {p.name: p for p in (SAFENET_5110, YUBIKEY5, ETOKEN_FUSION, EPASS2003)}


# The reader of the SafeNet eToken 5110+ FIPS as its descriptor dump shows it
# (reference/ccid-readers/SafeNet_eToken_5110+_FIPS.txt): TPDU level, no automatic PPS
# (dwFeatures 0x00010230), 4.8 MHz, 12903 bps by default and up to 825806 bps, and a
# GET_DATA_RATES table (here the part of it up to 300000 bps). libccid negotiates TA1 with a PPS.
SAFENET_5110_FIPS: Final = Profile(
    name="safenet-5110-fips",
    vid=0x08E6,
    pid=0x34CF,
    bcd_device=0x0000,
    manufacturer="SafeNet",
    product="eToken 5110+ FIPS",
    serial="0B5E0F11",
    interface_number=0,
    descriptor=CcidClassDescriptor(
        voltage_support=0x02,
        protocols=0x02,
        default_clock_khz=4800,
        maximum_clock_khz=4800,
        data_rate_bps=12903,
        max_data_rate_bps=825806,
        max_ifsd=254,
        features=0x00010230,
        max_ccid_message_length=271,
    ),
    has_interrupt=True,
    # The real card (IDPrime 940) offers T=0 only, and our CCID device side speaks T=1. So the
    # 5110 ATR with TA1 0x96 (Fi 512, Di 32: 300000 bps at 4.8 MHz, as the IDPrime's TA1).
    atr=bytes.fromhex("3B D5 96 00 81 31 FE 7D 80 73 C8 21 10 7A"),
    escape_supported=True,
    note="atr replaced: the real IDPrime ATR offers T=0 only; rig-only profile",
    data_rates=(12903, 25806, 51613, 103226, 154839, 206452, 300000),
)
# The 5110 reader (TPDU, T=0 and T=1) with a card whose ATR offers T=0 only, as many
# IDPrime-based tokens do: TA1 0x18 like the 5110's, no TD1 (so T=0, no TCK), and the
# historical bytes naming the PIV AID so OpenSC still picks its PIV driver.
SAFENET_5110_T0: Final = dataclasses.replace(
    SAFENET_5110,
    name="safenet-5110-t0",
    serial="0247A1B3",
    atr=bytes.fromhex("3B 1B 18 80 F9 A0 00 00 03 08 00 00 10 00"),
    note="rig-only: a T=0 ATR on the 5110 reader",
)
# Profiles the USB rig offers besides the four default ones (tests iterate PROFILES).
EXTRA_PROFILES: Final = {p.name: p for p in (SAFENET_5110_FIPS, SAFENET_5110_T0)}

YUBICO_VID: Final = 0x1050


def yubikey_serial(profile: Profile, serial: str | None = None) -> int | None:
    """The serial a YubiKey's PIV applet reports to `00 F8 00 00` (None: not a YubiKey)."""
    text = profile.serial if serial is None else serial
    return int(text) if profile.vid == YUBICO_VID and text.isdigit() else None
