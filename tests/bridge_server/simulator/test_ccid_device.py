"""The CCID device side of the simulated token, driven through pyusb's public API."""

from __future__ import annotations

import dataclasses

import pytest
from sim_usb_host import FakeCard, Host, command_data

from bridge_server.simulator.backend import SimulatedToken, SimulatorBackend, open_simulator
from bridge_server.simulator.faults import ApduRecord, Evidence
from bridge_server.simulator.profiles import PROFILES
from protocol.atr import Atr
from protocol.ccid import (
    CcidMessage,
    CommandStatus,
    Feature,
    IccStatus,
    MessageType,
    SlotError,
    abort,
    decode_message,
    escape,
    get_slot_status,
    icc_power_off,
    icc_power_on,
    set_parameters,
    xfr_block,
)
from protocol.errors import MalformedCcidMessageError
from protocol.t1 import ApduComplete, T1Reader

SELECT_PIV = bytes.fromhex("00A4040009A00000030800001000")
GET_CERT_9A = bytes.fromhex("00CB3FFF055C035FC105000000")  # extended Le: the whole object
CERT = bytes(range(256)) * 8  # 2 KB
VERIFY_PIN = bytes.fromhex("0020008008") + b"123456\xff\xff"


def make(name: str, card: FakeCard | None = None, profile=None) -> tuple[SimulatedToken, Host]:
    token = SimulatedToken(profile or PROFILES[name], card=card or FakeCard())
    return token, Host(SimulatorBackend([token]), token)


def failed(resp: CcidMessage, error: int, icc: IccStatus | None = None) -> bool:
    ok = resp.command_status is CommandStatus.FAILED and resp.error == error
    return ok and (icc is None or resp.icc_status is icc)


# -- header, slot and power handling -------------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 0x7F, 0xFF])
def test_every_response_echoes_bseq(seq: int) -> None:
    _, host = make("yubikey5")
    assert host.transact(get_slot_status(seq)).seq == seq
    assert host.transact(icc_power_on(seq)).seq == seq
    assert host.transact(xfr_block(seq, SELECT_PIV)).seq == seq


def test_slot_other_than_zero_fails_with_berror_5() -> None:
    _, host = make("safenet-5110")
    resp = host.transact(get_slot_status(3, slot=1))
    assert resp.msg_type is MessageType.RDR_to_PC_SlotStatus
    assert failed(resp, 5)
    assert resp.slot == 1


def test_xfr_block_while_unpowered_fails_mute_with_present_inactive_status() -> None:
    token, host = make("yubikey5")
    resp = host.transact(xfr_block(1, SELECT_PIV))
    assert resp.msg_type is MessageType.RDR_to_PC_DataBlock
    assert failed(resp, SlotError.ICC_MUTE, IccStatus.PRESENT_INACTIVE)
    assert token.card.apdus == []


def test_dwlength_above_max_message_length_fails_with_berror_1() -> None:
    token, host = make("etoken-fusion")
    host.power_on()
    too_long = token.profile.descriptor.max_ccid_message_length - 10 + 1
    resp = host.transact(xfr_block(4, bytes(too_long)))
    assert failed(resp, 1)
    assert token.card.apdus == []


def test_dwlength_not_matching_the_transfer_fails_with_berror_1() -> None:
    _, host = make("yubikey5")
    raw = bytes.fromhex("6F05000000000900000000A404")  # promises 5 data bytes, carries 3
    host.send(raw)
    resp = host.read()
    assert resp.seq == 9
    assert failed(resp, 1)


@pytest.mark.parametrize(
    ("command", "response"),
    [
        (MessageType.PC_to_RDR_Mechanical, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_IccClock, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_T0APDU, MessageType.RDR_to_PC_SlotStatus),
        (MessageType.PC_to_RDR_Secure, MessageType.RDR_to_PC_DataBlock),
        (MessageType.PC_to_RDR_SetDataRateAndClockFrequency, MessageType.RDR_to_PC_DataRateAndClockFrequency),
    ],
)
def test_unsupported_command_answers_matching_type_with_cmd_not_supported(
    command: MessageType, response: MessageType
) -> None:
    _, host = make("safenet-5110")
    resp = host.transact(CcidMessage(command, 0x21))
    assert resp.msg_type is response
    assert failed(resp, SlotError.CMD_NOT_SUPPORTED)


def test_unknown_message_type_answers_slot_status_not_supported() -> None:
    _, host = make("safenet-5110")
    host.send(bytes.fromhex("99000000000042000000"))
    resp = host.read()
    assert resp.msg_type is MessageType.RDR_to_PC_SlotStatus
    assert resp.seq == 0x42
    assert failed(resp, 0)


def test_power_cycle_drives_card_and_slot_status_and_counters() -> None:
    token, host = make("yubikey5")
    assert host.transact(get_slot_status(1)).icc_status is IccStatus.PRESENT_INACTIVE
    host.power_on()
    assert host.transact(get_slot_status(2)).icc_status is IccStatus.PRESENT_ACTIVE
    host.power_on()  # warm reset
    off = host.transact(icc_power_off(3))
    assert off.msg_type is MessageType.RDR_to_PC_SlotStatus
    assert off.icc_status is IccStatus.PRESENT_INACTIVE
    assert (token.card.power_ons, token.card.power_offs) == (2, 1)
    counters = token.evidence.snapshot()
    assert (counters.power_ons, counters.warm_resets, counters.power_offs) == (2, 1, 1)


def test_get_parameters_follow_the_atr_of_the_5110() -> None:
    token, host = make("safenet-5110")
    host.power_on()
    resp = host.transact(CcidMessage(MessageType.PC_to_RDR_GetParameters, 5))
    atr = Atr.parse(token.profile.atr)
    # reference §1.9: bmFindexDindex=TA1, bmTCCKST1=0x10|CRC, guard=TC1, BWI<<4|CWI, 0, IFSC, NAD 0
    assert resp.chain_parameter == 1
    assert resp.data[0] == atr.ta1
    assert resp.data[1] == 0x10
    assert resp.data[5] == atr.ifsc


def test_set_parameters_t1_is_recorded_and_returned() -> None:
    token, host = make("safenet-5110")
    host.power_on()
    params = bytes.fromhex("11110000007D00FE00")[:7]
    resp = host.transact(set_parameters(6, 1, params))
    assert resp.msg_type is MessageType.RDR_to_PC_Parameters
    assert resp.command_status is CommandStatus.OK
    assert resp.data == params
    assert token.device.parameters == params
    again = host.transact(CcidMessage(MessageType.PC_to_RDR_GetParameters, 7))
    assert again.data == params


def test_set_parameters_t0_is_refused_at_bprotocolnum() -> None:
    _, host = make("safenet-5110")
    resp = host.transact(set_parameters(6, 0, bytes.fromhex("1100000A00")))
    assert failed(resp, 7)


@pytest.mark.parametrize("name", ["safenet-5110", "yubikey5", "etoken-fusion", "epass2003"])
def test_escape_answers_firmware_features_only_when_the_profile_supports_it(name: str) -> None:
    token, host = make(name)
    resp = host.transact(escape(8, b"\x6a"))
    assert resp.msg_type is MessageType.RDR_to_PC_Escape
    if token.profile.escape_supported:
        assert resp.command_status is CommandStatus.OK
        assert len(resp.data) > 0
    else:
        assert failed(resp, SlotError.CMD_NOT_SUPPORTED)


def test_abort_answers_slot_status_ok() -> None:
    _, host = make("yubikey5")
    resp = host.transact(abort(9))
    assert resp.msg_type is MessageType.RDR_to_PC_SlotStatus
    assert resp.command_status is CommandStatus.OK


# -- APDU level and CCID chaining ----------------------------------------------------------


def test_fusion_chains_a_266_byte_general_authenticate_and_its_long_response() -> None:
    token, host = make("etoken-fusion", FakeCard(lambda apdu: command_data(apdu) * 3 + b"\x90\x00"))
    host.power_on()
    payload = bytes(i & 0xFF for i in range(257))
    # extended case 4: header, 00 Lc-hi Lc-lo, data, Le 00 00 (ISO 7816-4 §5.1)
    apdu = bytes.fromhex("00870700") + b"\x00" + len(payload).to_bytes(2, "big") + payload + b"\x00\x00"
    assert len(apdu) == 266 > 265
    first = host.transact(xfr_block(host.next_seq(), apdu[:265], level_parameter=0x01))
    assert first.data == b""
    assert first.chain_parameter == 0x10  # "send the next chunk"
    assert token.card.apdus == []
    resp = host.transact(xfr_block(host.next_seq(), apdu[265:], level_parameter=0x02))
    assert token.card.apdus == [apdu]
    chains = [resp.chain_parameter]
    out = resp.data
    while resp.chain_parameter in (0x01, 0x03):
        resp = host.transact(xfr_block(host.next_seq(), b"", level_parameter=0x10))
        chains.append(resp.chain_parameter)
        out += resp.data
    assert out == payload * 3 + b"\x90\x00"
    assert chains[0] == 0x01
    assert chains[-1] == 0x02
    assert set(chains[1:-1]) <= {0x03}
    assert len(chains) == -(-len(out) // 265)


def test_fusion_266_byte_apdu_through_the_host_helper() -> None:
    token, host = make("etoken-fusion")
    host.power_on()
    data = bytes(range(256)) + bytes(44)
    apdu = bytes.fromhex("0087070000") + len(data).to_bytes(2, "big") + data + b"\x00\x00"
    assert len(apdu) == 309
    assert host.transmit_apdu(apdu) == command_data(apdu)[::-1] + b"\x90\x00"
    assert token.card.apdus == [apdu]


def test_continuation_request_with_nothing_pending_fails_with_berror_8() -> None:
    _, host = make("etoken-fusion")
    host.power_on()
    resp = host.transact(xfr_block(1, b"", level_parameter=0x10))
    assert failed(resp, 8)


def test_middle_chunk_without_a_beginning_fails_with_berror_8() -> None:
    _, host = make("etoken-fusion")
    host.power_on()
    resp = host.transact(xfr_block(1, b"\x00\xa4", level_parameter=0x03))
    assert failed(resp, 8)


def test_chained_command_beyond_the_largest_apdu_overruns() -> None:
    _, host = make("yubikey5")
    host.power_on()
    chunk = bytes(3062)
    resp = host.transact(xfr_block(1, chunk, level_parameter=0x01))
    for _ in range(21):
        resp = host.transact(xfr_block(2, chunk, level_parameter=0x03))
        if resp.command_status is CommandStatus.FAILED:
            break
    assert failed(resp, SlotError.XFR_OVERRUN)


def test_short_apdu_level_takes_whole_apdus_and_refuses_chaining() -> None:
    base = PROFILES["epass2003"]
    features = (base.descriptor.features & ~0x70000) | Feature.SHORT_APDU
    profile = dataclasses.replace(base, descriptor=dataclasses.replace(base.descriptor, features=features))
    _token, host = make("epass2003", profile=profile)
    host.power_on()
    assert host.transact(xfr_block(1, SELECT_PIV)).data == command_data(SELECT_PIV)[::-1] + b"\x90\x00"
    assert failed(host.transact(xfr_block(2, SELECT_PIV, level_parameter=1)), 8)


# -- TPDU level: T=1 -----------------------------------------------------------------------


def t1_transmit(host: Host, reader: T1Reader, first: bytes) -> bytes:
    """The host T=1 loop: one block per XfrBlock, bBWI = pending WTX multiplier."""
    block, wtx = first, 0
    while True:
        resp = host.transact(xfr_block(host.next_seq(), block, bwi=wtx))
        assert resp.command_status is CommandStatus.OK, resp
        event = reader.receive(resp.data)
        if isinstance(event, ApduComplete):
            return event.apdu
        block, wtx = event.block, event.wtx


def t1_reader(host: Host, atr: bytes) -> T1Reader:
    parsed = Atr.parse(atr)
    reader = T1Reader(ifsc=parsed.ifsc, checksum=parsed.checksum)
    assert t1_transmit(host, reader, reader.begin_ifs(host.descriptor.max_ifsd)) == b""
    return reader


def test_safenet_reads_a_2kb_certificate_through_t1_chaining() -> None:
    card = FakeCard(lambda apdu: CERT + b"\x90\x00" if apdu[1] == 0xCB else b"\x90\x00")
    token, host = make("safenet-5110", card)
    reader = t1_reader(host, host.power_on())
    assert t1_transmit(host, reader, reader.begin_apdu(GET_CERT_9A)) == CERT + b"\x90\x00"
    assert card.apdus == [GET_CERT_9A]
    # a fresh power-on resets the card's T=1 state (ISO 7816-3 §11.6.3)
    reader = t1_reader(host, host.power_on())
    assert t1_transmit(host, reader, reader.begin_apdu(SELECT_PIV)) == b"\x90\x00"
    assert token.evidence.apdu_count == 2


def test_safenet_selects_piv_on_the_real_card_over_t1() -> None:
    backend, tokens = open_simulator(["safenet-5110"])
    host = Host(backend, tokens[0])
    reader = t1_reader(host, host.power_on())
    rapdu = t1_transmit(host, reader, reader.begin_apdu(SELECT_PIV))
    assert rapdu[-2:] == b"\x90\x00"


def test_safenet_slow_signature_can_ask_for_wtx_blocks() -> None:
    token, host = make("safenet-5110")
    reader = t1_reader(host, host.power_on())
    token.faults.slow_sign_s = 0.01
    token.faults.wtx_blocks = True
    sign = bytes.fromhex("0087070004") + b"abcd"
    resp = host.transact(xfr_block(host.next_seq(), reader.begin_apdu(sign)))
    event = reader.receive(resp.data)
    assert not isinstance(event, ApduComplete)
    assert event.wtx == token.faults.wtx_multiplier  # the card sent S(WTX request)
    assert t1_transmit(host, reader, event.block) == b"dcba\x90\x00"


# -- faults and evidence -------------------------------------------------------------------


def test_delay_is_announced_with_time_extension_frames_before_the_answer() -> None:
    token, host = make("yubikey5")
    host.power_on()
    token.faults.delay_next_s = 0.06
    resp, extensions = host.transact_te(xfr_block(0x33, SELECT_PIV))
    assert resp.command_status is CommandStatus.OK
    assert resp.data.endswith(b"\x90\x00")
    assert len(extensions) >= 1
    for te in extensions:
        assert te.b7 & 0xC0 == 0x80  # bmCommandStatus 2 (CCID 1.1 §6.2.7)
        assert te.error == token.faults.wtx_multiplier
        assert te.seq == 0x33
    # one-shot: the next command is answered at once
    assert host.transact_te(xfr_block(0x34, SELECT_PIV))[1] == []


def test_slow_signature_is_announced_with_time_extensions_every_time() -> None:
    token, host = make("epass2003")
    host.power_on()
    token.faults.slow_sign_s = 0.02
    for seq in (1, 2):
        _, extensions = host.transact_te(xfr_block(seq, bytes.fromhex("0087070002beef")))
        assert extensions
    assert host.transact_te(xfr_block(3, SELECT_PIV))[1] == []


def test_malformed_next_truncates_one_response() -> None:
    token, host = make("yubikey5")
    token.faults.malformed_next = True
    host.send(icc_power_on(1))
    with pytest.raises(MalformedCcidMessageError):
        decode_message(host.read_raw())
    assert host.transact(get_slot_status(2)).icc_status is IccStatus.PRESENT_ACTIVE


def test_wrong_seq_next_sends_a_stray_frame_before_the_right_one() -> None:
    token, host = make("yubikey5")
    token.faults.wrong_seq_next = True
    host.send(get_slot_status(0x10))
    assert host.read().seq == 0x0F
    assert host.read().seq == 0x10


def test_evidence_records_epoch_ins_and_counts_pins_and_signatures() -> None:
    token, host = make("epass2003")
    host.power_on()
    token.current_epoch = 7
    host.transmit_apdu(SELECT_PIV)
    host.transmit_apdu(VERIFY_PIN)
    host.transmit_apdu(bytes.fromhex("00200080"))  # status probe: no PIN sent
    token.current_epoch = 8
    host.transmit_apdu(bytes.fromhex("0087070002beef"))
    assert token.evidence.apdus == [
        ApduRecord(7, 0xA4, 0x00),
        ApduRecord(7, 0x20, 0x00),
        ApduRecord(7, 0x20, 0x00),
        ApduRecord(8, 0x87, 0x00),
    ]
    counters = token.evidence.snapshot()
    assert (counters.pin_attempts, counters.signatures, counters.apdus) == (1, 1, 4)


def test_evidence_list_is_bounded_but_counters_keep_counting() -> None:
    evidence = Evidence(max_records=3)
    for i in range(5):
        evidence.record_apdu(bytes([0, 0xA4 + i, 4, 0]), epoch=i)
    assert [r.epoch for r in evidence.apdus] == [2, 3, 4]
    assert evidence.apdu_count == 5
