"""Minimal BER-TLV (ISO 7816-4 §5.2 / X.690 §8.1) for the simulated PIV card.

Tags are kept as their raw bytes (`b"\\x5f\\xc1\\x05"`, `b"\\x7c"`) because PIV names objects by
their encoded tag. Lengths use the definite forms only (short, 81 xx, 82 xx xx), which is all
SP 800-73-4 allows.
"""

from __future__ import annotations

from typing import Final

# SP 800-73-4 objects are at most a few kilobytes; 82 xx xx covers 65535.
MAX_TLV_LENGTH: Final = 0xFFFF


class TlvError(ValueError):
    """A BER-TLV structure is malformed."""


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    if length <= 0xFF:
        return bytes((0x81, length))
    if length <= MAX_TLV_LENGTH:
        return b"\x82" + length.to_bytes(2, "big")
    raise TlvError(f"tlv length too large: {length}")


def tlv(tag: bytes, value: bytes) -> bytes:
    return tag + encode_length(len(value)) + value


def _read_tag(buf: bytes, pos: int) -> int:
    """Index just past the tag starting at pos (X.690 §8.1.2.4: low 5 bits 1F = more bytes)."""
    if pos >= len(buf):
        raise TlvError("tlv truncated in tag")
    end = pos + 1
    if buf[pos] & 0x1F == 0x1F:
        while True:
            if end >= len(buf):
                raise TlvError("tlv truncated in multi-byte tag")
            end += 1
            if not buf[end - 1] & 0x80:
                break
    return end


def _read_length(buf: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise TlvError("tlv truncated in length")
    first = buf[pos]
    if first < 0x80:
        return first, pos + 1
    count = first & 0x7F
    if count not in (1, 2):
        raise TlvError(f"unsupported tlv length form 0x{first:02x}")
    if pos + 1 + count > len(buf):
        raise TlvError("tlv truncated in length")
    return int.from_bytes(buf[pos + 1 : pos + 1 + count], "big"), pos + 1 + count


def parse(buf: bytes) -> list[tuple[bytes, bytes]]:
    """All top-level (tag, value) pairs of buf, in order."""
    items: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(buf):
        tag_end = _read_tag(buf, pos)
        length, value_start = _read_length(buf, tag_end)
        if value_start + length > len(buf):
            raise TlvError(f"tlv value of {length} bytes overruns the {len(buf)}-byte buffer")
        items.append((buf[pos:tag_end], buf[value_start : value_start + length]))
        pos = value_start + length
    return items


def find(buf: bytes, tag: bytes) -> bytes | None:
    """Value of the first top-level tag, or None."""
    for t, v in parse(buf):
        if t == tag:
            return v
    return None
