"""protocol/speculation.py at its edges: every speculable read, every bound at exactly its value
and one beyond, and the error texts a peer's log shows (what `make mutation` found untested)."""

from __future__ import annotations

import re

import pytest

from protocol._framing import MAX_CCID_MESSAGE, MIN_CCID_MESSAGE
from protocol.speculation import (
    MAX_PATHS,
    MAX_STEP_BYTES,
    MAX_STEPS,
    MAX_STEPS_BYTES,
    SPECULABLE_INS,
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

OK = b"\x90\x00"
# ISO 7816-4 §5.1: SELECT, READ BINARY (both), READ RECORD (both), GET DATA (both), GET RESPONSE.
READS = [0xA4, 0xB0, 0xB1, 0xB2, 0xB3, 0xCA, 0xCB, 0xC0]


def exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


# -- which reads may be answered from a taught path ----------------------------------------------


@pytest.mark.parametrize("ins", READS, ids=lambda ins: f"{ins:02X}")
def test_each_plain_read_is_speculable_even_as_a_bare_header(ins: int) -> None:
    assert speculable_command(bytes((0x00, ins, 0x00, 0x00)))  # case 1: exactly four bytes
    assert not speculable_command(bytes((0x00, ins, 0x00)))


def test_the_speculable_set_is_exactly_the_iso_reads() -> None:
    assert sorted(SPECULABLE_INS) == sorted(READS)


# -- GET RESPONSE -------------------------------------------------------------------------------


def test_a_chained_full_length_link_answered_61xx_is_followed_by_get_response() -> None:
    link = bytes.fromhex("1087079A0B" + "7C0982008105" + "0000000000" + "00")  # CLA 10, Le 256
    assert get_response_for(link, b"\x61\x08") == bytes.fromhex("00C0000008")


def test_an_extended_read_asking_for_65536_bytes_answered_61xx_gets_get_response() -> None:
    read = bytes.fromhex("00B00000000000")  # extended case 2, Le 0000 = 65536
    assert get_response_for(read, b"\x61\x00") == bytes.fromhex("00C0000000")
    assert get_response_for(bytes.fromhex("00B00000000200"), b"\x61\x00") is None  # Le 512: a part only


def test_a_four_byte_get_response_answered_61xx_continues_and_a_one_byte_answer_does_not() -> None:
    assert get_response_for(bytes.fromhex("00C00000"), b"\x61\x05") == bytes.fromhex("00C0000005")
    assert get_response_for(bytes.fromhex("00C000"), b"\x61\x05") is None
    assert get_response_for(bytes.fromhex("00C00000"), b"\x61") is None


# -- step lists: each bound at exactly its value ------------------------------------------------


def test_exactly_max_steps_pack_and_unpack_and_one_more_is_refused_with_its_count() -> None:
    steps: list[Step] = [(b"", b"")] * MAX_STEPS
    assert unpack_steps(pack_steps(steps))[0] == steps
    with pytest.raises(ValueError, match=exactly(f"{MAX_STEPS + 1} steps exceed {MAX_STEPS}")):
        pack_steps([(b"", b"")] * (MAX_STEPS + 1))
    with pytest.raises(ValueError, match=exactly(f"{MAX_STEPS + 1} steps exceed {MAX_STEPS}")):
        unpack_steps((MAX_STEPS + 1).to_bytes(2, "big"))


def test_a_blob_of_exactly_max_step_bytes_packs_and_one_more_is_refused_saying_why() -> None:
    steps = [(bytes(MAX_STEP_BYTES), OK)]
    assert unpack_steps(pack_steps(steps))[0] == steps
    with pytest.raises(ValueError, match=exactly(f"a step holds bytes or more than {MAX_STEP_BYTES} bytes")):
        pack_steps([(OK, bytes(MAX_STEP_BYTES + 1))])
    with pytest.raises(
        ValueError, match=exactly(f"a step holds bytearray or more than {MAX_STEP_BYTES} bytes")
    ):
        pack_steps([(bytearray(OK), OK)])  # type: ignore[list-item]
    too_long = b"\x00\x01" + (MAX_STEP_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(
        ValueError, match=exactly(f"a step of {MAX_STEP_BYTES + 1} bytes is too long or truncated")
    ):
        unpack_steps(too_long)


def _steps_of(total: int) -> list[Step]:
    """Steps holding exactly `total` APDU bytes, each blob within MAX_STEP_BYTES."""
    steps: list[Step] = []
    while total > 0:
        size = min(total, MAX_STEP_BYTES)
        steps.append((bytes(size), b""))
        total -= size
    return steps


def test_step_lists_of_exactly_max_steps_bytes_pass_and_one_byte_more_is_refused() -> None:
    fits = _steps_of(MAX_STEPS_BYTES)
    assert unpack_steps(pack_steps(fits))[0] == fits
    over = _steps_of(MAX_STEPS_BYTES + 1)
    with pytest.raises(
        ValueError, match=exactly(f"steps of {MAX_STEPS_BYTES + 1} bytes exceed {MAX_STEPS_BYTES}")
    ):
        pack_steps(over)
    # the same list built by hand (pack refuses it) is refused by unpack as it reads
    raw = len(over).to_bytes(2, "big") + b"".join(
        len(b).to_bytes(4, "big") + b for step in over for b in step
    )
    with pytest.raises(ValueError, match=exactly(f"steps exceed {MAX_STEPS_BYTES} bytes")):
        unpack_steps(raw)


def test_a_truncated_count_is_refused_as_a_truncated_step_list() -> None:
    with pytest.raises(ValueError, match=exactly("truncated step list")):
        unpack_steps(b"\x00")


# -- merge: the newest path always stays --------------------------------------------------------


def test_the_same_path_taught_again_adds_nothing() -> None:
    path = ((b"\x00\xa4\x04\x00", OK), (b"\x00\xb0\x00\x00", b"1" + OK))
    assert merge_path([path], path) == ([path], False)


def test_a_new_path_alone_is_kept_even_beyond_the_byte_bound() -> None:
    # PathRecorder keeps a path within MAX_STEPS_BYTES; merge itself never drops the newest one
    huge = tuple(_steps_of(MAX_STEPS_BYTES + 1))
    assert merge_path([], huge) == ([huge], False)


def test_two_paths_exactly_at_the_byte_bound_are_both_kept() -> None:
    half = MAX_STEPS_BYTES // 2
    old = ((b"\x00\xb0\x00\x01", bytes(half - 4)),)
    new = ((b"\x00\xb0\x00\x02", bytes(half - 4)),)
    assert merge_path([old], new) == ([new, old], False)


# -- the client's trie --------------------------------------------------------------------------


def test_each_taught_step_gets_its_own_position() -> None:
    a, b, c = (b"\x00\xa4\x04\x00", OK), (b"\x00\xb0\x00\x00", b"1" + OK), (b"\x00\xb0\x00\x01", b"2" + OK)
    trie = PathTrie([(a, b, c), (b,)])
    positions = {PathTrie.ROOT}
    node = PathTrie.ROOT
    for command, response in (a, b, c):
        edge = trie.answer(node, command)
        assert edge is not None and edge[1] == response
        node = edge[0]
        assert node not in positions
        positions.add(node)
    other = trie.answer(PathTrie.ROOT, b[0])
    assert other is not None and other[0] not in positions
    assert trie.answer(other[0], c[0]) is None  # c follows b only after a


# -- the three messages: every field bound, every error text -----------------------------------


def test_token_ids_and_epochs_at_their_limits_round_trip() -> None:
    for msg in (
        SpeculationPaths(token_id=0, paths=()),
        SpeculationPaths(token_id=0xFFFF, paths=()),
        Prefetched(token_id=0xFFFF, epoch=0xFFFF_FFFF, steps=()),
        Prefetched(token_id=0, epoch=0, steps=()),
    ):
        assert decode_payload(type(msg), encode_payload(msg)) == msg


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        (SpeculationPaths(token_id=0x1_0000, paths=()), "token_id: expected an integer 0..65535, got 65536"),
        (SpeculationPaths(token_id=-1, paths=()), "token_id: expected an integer 0..65535, got -1"),
        (SpeculationPaths(token_id=True, paths=()), "token_id: expected an integer 0..65535, got True"),
        (
            Prefetched(token_id=1, epoch=0x1_0000_0000, steps=()),
            "epoch: expected an integer 0..4294967295, got 4294967296",
        ),
    ],
)
def test_fields_out_of_range_are_refused_naming_field_range_and_value(msg: object, text: str) -> None:
    with pytest.raises(ValueError, match=exactly(text)):
        encode_payload(msg)  # type: ignore[arg-type]


def test_a_lease_exchange_carries_ccid_messages_of_exactly_the_smallest_and_largest_size() -> None:
    for size in (MIN_CCID_MESSAGE, MAX_CCID_MESSAGE):
        msg = LeaseExchange(token_id=1, deferred=(), message=bytes(size))
        assert decode_payload(LeaseExchange, encode_payload(msg)) == msg
    text = f"message: a CCID message of {MIN_CCID_MESSAGE}..{MAX_CCID_MESSAGE} bytes expected"
    for size in (MIN_CCID_MESSAGE - 1, MAX_CCID_MESSAGE + 1):
        with pytest.raises(ValueError, match=exactly(text)):
            encode_payload(LeaseExchange(token_id=1, deferred=(), message=bytes(size)))
    with pytest.raises(ValueError, match=exactly(text)):
        encode_payload(LeaseExchange(token_id=1, deferred=(), message=bytearray(10)))  # type: ignore[arg-type]
    payload = b"\x00\x01" + pack_steps([]) + bytes(MAX_CCID_MESSAGE + 1)
    with pytest.raises(
        ValueError, match=exactly(f"message of {MAX_CCID_MESSAGE + 1} bytes is not a CCID message")
    ):
        decode_payload(LeaseExchange, payload)


def test_exactly_max_paths_round_trip_and_one_more_is_refused_both_ways() -> None:
    paths = tuple(((bytes((0, 0xB0, 0, i)), OK),) for i in range(MAX_PATHS))
    msg = SpeculationPaths(token_id=1, paths=paths)
    assert decode_payload(SpeculationPaths, encode_payload(msg)) == msg
    text = f"paths: more than {MAX_PATHS} paths or {MAX_STEPS_BYTES} bytes"
    with pytest.raises(ValueError, match=exactly(text)):
        encode_payload(SpeculationPaths(token_id=1, paths=(*paths, ())))
    with pytest.raises(ValueError, match=exactly(f"{MAX_PATHS + 1} paths exceed {MAX_PATHS}")):
        decode_payload(SpeculationPaths, b"\x00\x01" + (MAX_PATHS + 1).to_bytes(2, "big"))


def test_paths_of_exactly_max_steps_bytes_round_trip_and_one_byte_more_is_refused_both_ways() -> None:
    fits = (tuple(_steps_of(MAX_STEPS_BYTES // 2)), tuple(_steps_of(MAX_STEPS_BYTES // 2)))
    msg = SpeculationPaths(token_id=1, paths=fits)
    assert decode_payload(SpeculationPaths, encode_payload(msg)) == msg
    over = (fits[0], tuple(_steps_of(MAX_STEPS_BYTES // 2 + 1)))
    with pytest.raises(
        ValueError, match=exactly(f"paths: more than {MAX_PATHS} paths or {MAX_STEPS_BYTES} bytes")
    ):
        encode_payload(SpeculationPaths(token_id=1, paths=over))
    payload = b"\x00\x01\x00\x02" + b"".join(pack_steps(p) for p in over)
    with pytest.raises(ValueError, match=exactly(f"paths exceed {MAX_STEPS_BYTES} bytes")):
        decode_payload(SpeculationPaths, payload)


@pytest.mark.parametrize(("cls", "fixed"), [(LeaseExchange, 2), (Prefetched, 6), (SpeculationPaths, 4)])
def test_a_payload_shorter_than_its_fixed_fields_is_refused_saying_so(cls: type, fixed: int) -> None:
    with pytest.raises(
        ValueError, match=exactly(f"payload of {fixed - 1} bytes is shorter than its fixed fields")
    ):
        decode_payload(cls, bytes(fixed - 1))
    if cls is not SpeculationPaths:  # its fixed fields end with the path count: 0 paths is complete
        with pytest.raises(ValueError, match=exactly("truncated step list")):
            decode_payload(cls, bytes(fixed))  # the fixed fields, then not even a step count


def test_bytes_after_the_last_step_are_refused_with_their_count() -> None:
    payload = encode_payload(Prefetched(token_id=1, epoch=2, steps=())) + b"\x00\x00\x00"
    with pytest.raises(ValueError, match=exactly("3 bytes after the last step")):
        decode_payload(Prefetched, payload)
