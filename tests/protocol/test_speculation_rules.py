"""protocol/speculation.py: the read-only rule, GET RESPONSE, step codec, path merge and trie."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol._framing import MAX_SPECULATION_PAYLOAD
from protocol.ccid import MAX_DATA_LENGTH
from protocol.speculation import (
    MAX_PATHS,
    MAX_STEP_BYTES,
    MAX_STEPS,
    MAX_STEPS_BYTES,
    LeaseExchange,
    PathTrie,
    Prefetched,
    SpeculationPaths,
    Step,
    decode_payload,
    encode_payload,
    get_response_for,
    merge_path,
    pack_steps,
    speculable_command,
    unpack_steps,
)

SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")
GET_CHUID = bytes.fromhex("00CB3FFF055C035FC10200")
VERIFY_EMPTY = bytes.fromhex("00200080")
VERIFY_PIN = bytes.fromhex("002000800831323334353600FF")


# -- which commands may ever be answered from a taught path ---------------------------------------


@pytest.mark.parametrize(
    "apdu",
    [
        SELECT_PIV,
        GET_CHUID,
        bytes.fromhex("00B0000000"),
        bytes.fromhex("00CA7F6800"),
        bytes.fromhex("00C0000000"),
    ],
)
def test_plain_interindustry_reads_are_speculable(apdu: bytes) -> None:
    assert speculable_command(apdu)


@pytest.mark.parametrize(
    ("apdu", "why"),
    [
        (VERIFY_EMPTY, "VERIFY, even the status query without a PIN"),
        (VERIFY_PIN, "VERIFY with a PIN"),
        (bytes.fromhex("0084000008"), "GET CHALLENGE: randomness"),
        (bytes.fromhex("00870700"), "GENERAL AUTHENTICATE: crypto"),
        (bytes.fromhex("002A9E9A00"), "PSO: crypto"),
        (bytes.fromhex("00DB3FFF00"), "PUT DATA: management"),
        (bytes.fromhex("00470000"), "GENERATE KEY: management"),
        (bytes.fromhex("10CB3FFF00"), "a chained read (CLA 10)"),
        (bytes.fromhex("0CB0000000"), "secure messaging (CLA 0C)"),
        (bytes.fromhex("01A4040000"), "a logical channel (CLA 01)"),
        (bytes.fromhex("80CB3FFF00"), "a proprietary class (CLA 80)"),
        (bytes.fromhex("00A404"), "shorter than a header"),
    ],
)
def test_everything_else_ends_a_path(apdu: bytes, why: str) -> None:
    assert not speculable_command(apdu), why


# -- GET RESPONSE prefetch rule -------------------------------------------------------------------


def test_a_full_length_read_answered_61xx_is_followed_by_get_response_with_le_sw2() -> None:
    # ISO 7816-4 §5.1.3; the trace of pkcs11-tool: `00 CB ... Le=256` -> 6199 -> `00 C0 00 00 99`
    assert get_response_for(GET_CHUID, bytes(256) + b"\x61\x99") == bytes.fromhex("00C0000099")
    assert get_response_for(GET_CHUID, bytes(256) + b"\x61\x00") == bytes.fromhex("00C0000000")


def test_a_get_response_answered_61xx_continues_the_chain() -> None:
    assert get_response_for(bytes.fromhex("00C0000000"), bytes(256) + b"\x61\x26") == bytes.fromhex(
        "00C0000026"
    )


def test_a_short_read_answered_61xx_gets_no_get_response() -> None:
    # OpenSC's PIV driver reads 8 bytes to learn an object's length, then reads it whole afresh
    assert get_response_for(bytes.fromhex("00CB3FFF055C035FC10508"), bytes(8) + b"\x61\x00") is None


@pytest.mark.parametrize(
    ("command", "response"),
    [
        (GET_CHUID, b"\x90\x00"),
        (GET_CHUID, b"\x6c\x10"),
        (GET_CHUID, b"\x61"),
        (bytes.fromhex("0CCB3FFF00"), b"\x61\x10"),  # secure messaging
        (bytes.fromhex("00CB3F"), b"\x61\x10"),  # no header
        (bytes.fromhex("00CB3FFF05"), b"\x61\x10"),  # malformed: Lc 5 with no data
    ],
)
def test_no_get_response_without_61xx_or_for_a_command_it_does_not_fit(
    command: bytes, response: bytes
) -> None:
    assert get_response_for(command, response) is None


def test_the_last_link_of_a_chained_signature_is_followed_by_its_get_response() -> None:
    ga = bytes.fromhex("0087079A0B" + "7C0982008105" + "0000000000" + "00")  # Lc 11, Le 256
    assert get_response_for(ga, b"\x61\x08") == bytes.fromhex("00C0000008")


# -- step lists on the wire -----------------------------------------------------------------------

steps_strategy = st.lists(st.tuples(st.binary(max_size=64), st.binary(max_size=64)), max_size=8)


@given(steps=steps_strategy, prefix=st.binary(max_size=8))
def test_unpack_of_pack_is_identity_at_any_offset(steps: list[Step], prefix: bytes) -> None:
    buf = prefix + pack_steps(steps) + b"tail"
    got, end = unpack_steps(buf, len(prefix))
    assert got == steps
    assert buf[end:] == b"tail"


@given(steps=steps_strategy.filter(bool))
def test_every_truncation_of_a_step_list_is_refused(steps: list[Step]) -> None:
    buf = pack_steps(steps)
    for cut in range(len(buf)):
        with pytest.raises(ValueError):
            unpack_steps(buf[:cut])


def test_step_list_bounds_hold_in_both_directions() -> None:
    with pytest.raises(ValueError, match="steps exceed"):
        pack_steps([(b"", b"")] * (MAX_STEPS + 1))
    with pytest.raises(ValueError, match="steps exceed"):
        unpack_steps((MAX_STEPS + 1).to_bytes(2, "big"))
    with pytest.raises(ValueError, match="bytes"):
        pack_steps([(bytes(MAX_STEP_BYTES + 1), b"")])
    # a length field above the bound is refused before any payload is sliced
    with pytest.raises(ValueError, match="too long or truncated"):
        unpack_steps(b"\x00\x01" + (MAX_STEP_BYTES + 1).to_bytes(4, "big"))
    big = [(bytes(60_000), bytes(60_000))] * 3  # 360,000 > 256 KiB
    with pytest.raises(ValueError, match="exceed"):
        pack_steps(big)
    fits = [(bytes(60_000), bytes(60_000))] * 2
    assert unpack_steps(pack_steps(fits))[0] == fits


def test_the_frame_limit_is_the_sum_of_the_message_bounds() -> None:
    assert MAX_STEP_BYTES == MAX_DATA_LENGTH + 10
    largest_paths = MAX_STEPS_BYTES + MAX_PATHS * (2 + 8 * MAX_STEPS) + 4
    assert largest_paths <= MAX_SPECULATION_PAYLOAD
    assert (
        MAX_SPECULATION_PAYLOAD
        == MAX_STEPS_BYTES + MAX_PATHS * (2 + 8 * MAX_STEPS) + 8 + 10 + MAX_DATA_LENGTH
    )


@pytest.mark.parametrize(
    "msg",
    [
        LeaseExchange(token_id=3, deferred=((SELECT_PIV, b"\x90\x00"),), message=bytes(10)),
        Prefetched(token_id=3, epoch=9, steps=((bytes.fromhex("00C0000002"), b"\x01\x02\x90\x00"),)),
        SpeculationPaths(token_id=3, paths=(((SELECT_PIV, b"\x90\x00"),), ())),
        SpeculationPaths(token_id=3, paths=()),
    ],
)
def test_each_message_decodes_to_itself_and_refuses_a_byte_more_or_less(msg: object) -> None:
    cls = type(msg)
    payload = encode_payload(msg)  # type: ignore[arg-type]
    assert decode_payload(cls, payload) == msg  # type: ignore[arg-type]
    if cls is not LeaseExchange:  # its CCID message runs to the end: one byte more is a longer message
        with pytest.raises(ValueError):
            decode_payload(cls, payload + b"\x00")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode_payload(cls, payload[:-1] if cls is not LeaseExchange else payload[:-10])  # type: ignore[arg-type]


def test_encode_refuses_fields_out_of_range() -> None:
    with pytest.raises(ValueError, match="token_id"):
        encode_payload(SpeculationPaths(token_id=70000, paths=()))
    with pytest.raises(ValueError, match="epoch"):
        encode_payload(Prefetched(token_id=1, epoch=-1, steps=()))
    with pytest.raises(ValueError, match="CCID message"):
        encode_payload(LeaseExchange(token_id=1, deferred=(), message=bytes(9)))
    with pytest.raises(ValueError, match="paths"):
        encode_payload(SpeculationPaths(token_id=1, paths=((),) * (MAX_PATHS + 1)))
    with pytest.raises(ValueError, match="paths exceed"):
        decode_payload(SpeculationPaths, b"\x00\x01" + (MAX_PATHS + 1).to_bytes(2, "big"))


# -- the server's path merge ----------------------------------------------------------------------

A = (SELECT_PIV, b"\x90\x00")
B = (GET_CHUID, b"\x53\x01\x00\x90\x00")
B_NEW = (GET_CHUID, b"\x53\x01\x01\x90\x00")  # the same read, another answer: the card changed
C = (bytes.fromhex("00CB3FFF055C035FC10500"), b"\x6a\x82")


def test_a_new_path_is_kept_first_and_a_path_it_extends_goes() -> None:
    kept, conflict = merge_path([(A,)], (A, B))
    assert (kept, conflict) == ([(A, B)], False)


def test_a_prefix_of_a_known_path_adds_nothing() -> None:
    assert merge_path([(A, B)], (A,)) == ([(A, B)], False)
    assert merge_path([(A, B)], ()) == ([(A, B)], False)


def test_a_branch_is_kept_beside_the_known_path() -> None:
    kept, conflict = merge_path([(A, B)], (A, C))
    assert (kept, conflict) == ([(A, C), (A, B)], False)


def test_another_answer_to_the_same_commands_replaces_every_path() -> None:
    kept, conflict = merge_path([(A, B), (A, C)], (A, B_NEW))
    assert (kept, conflict) == ([(A, B_NEW)], True)


def test_the_oldest_paths_go_beyond_the_bounds() -> None:
    paths: list[tuple[Step, ...]] = []
    for i in range(MAX_PATHS + 3):
        paths, _ = merge_path(paths, (A, (bytes([0, 0xB0, 0, i, 0]), b"\x90\x00")))
    assert len(paths) == MAX_PATHS
    assert paths[0][1][0][3] == MAX_PATHS + 2  # the newest first
    big = tuple((bytes([0, 0xB0, 0, i]), bytes(40_000)) for i in range(4))
    huge = tuple((bytes([0, 0xB1, 0, i]), bytes(40_000)) for i in range(4))
    kept, _ = merge_path([big], huge)
    assert kept == [huge]  # 320 KB together: over 256 KiB, the older goes


# -- the client's trie --------------------------------------------------------------------------


def test_the_trie_answers_along_each_taught_path_and_nowhere_else() -> None:
    trie = PathTrie([(A, B), (A, C)])
    assert len(trie) == 3
    first = trie.answer(PathTrie.ROOT, A[0])
    assert first is not None and first[1] == A[1]
    assert trie.answer(first[0], B[0])[1] == B[1]  # type: ignore[index]
    assert trie.answer(first[0], C[0])[1] == C[1]  # type: ignore[index]
    assert trie.answer(PathTrie.ROOT, B[0]) is None  # B only after A: paths run from power-on
    assert trie.answer(first[0], SELECT_PIV + b"\x00") is None


def test_a_contradicting_path_never_changes_a_taught_answer() -> None:
    trie = PathTrie([(A, B), (A, B_NEW)])
    node, _ = trie.answer(PathTrie.ROOT, A[0])  # type: ignore[misc]
    assert trie.answer(node, B[0])[1] == B[1]  # type: ignore[index]
