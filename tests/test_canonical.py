"""Attacks on trusthop.canonical: one value, one encoding, strict base64url."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest

from trusthop.canonical import (
    EncodingError,
    b64url_decode,
    b64url_encode,
    pack,
    unpack_canonical,
)

VALUES: list[Any] = [
    0, 1, -1, 127, 128, 255, 256, -32, -33, 2**32, -(2**63), 2**64 - 1,
    "", "a", "é", "x" * 31, "x" * 32, "x" * 300,
    b"", b"\x00", b"\xff" * 300,
    [], [1, "a", b"b"], {}, {1: "a", 0: "b"}, {"b": 1, "a": 2}, {b"k": 1},
    None, True, False, [[[{2: [1]}]]],
]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:20] for v in VALUES])
def test_round_trip(value: Any) -> None:
    assert unpack_canonical(pack(value)) == value


def test_pack_sorts_map_keys_at_every_level() -> None:
    assert pack({2: {"b": 1, "a": 0}, 1: 0}) == bytes.fromhex("82 01 00 02 82 a1 61 00 a1 62 01")
    assert pack({"b": 1, "a": 2}) == pack({"a": 2, "b": 1})


def test_pack_uses_bin_for_bytes_and_str_for_text() -> None:
    assert pack(b"a") == b"\xc4\x01a"
    assert pack("a") == b"\xa1a"
    assert pack((1, 2)) == pack([1, 2])


def unsorted_map(*pairs: tuple[Any, Any]) -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    out = packer.pack_map_header(len(pairs))
    for key, value in pairs:
        out += packer.pack(key) + packer.pack(value)
    return out


NON_CANONICAL: dict[str, bytes] = {
    "unsorted-int-keys": unsorted_map((2, 0), (1, 0)),
    "unsorted-str-keys": unsorted_map(("b", 0), ("a", 0)),
    "duplicate-keys": unsorted_map((1, "a"), (1, "b")),
    "duplicate-keys-same-value": unsorted_map((1, "a"), (1, "a")),
    "uint8-for-fixint": b"\xcc\x05",
    "uint16-for-uint8": b"\xcd\x00\xff",
    "uint32-for-uint16": b"\xce\x00\x00\xff\xff",
    "uint64-for-uint32": b"\xcf\x00\x00\x00\x00\xff\xff\xff\xff",
    "int8-for-positive": b"\xd0\x05",
    "int16-for-negative-fixint": b"\xd1\xff\xff",
    "int64-for-small": b"\xd3" + (1).to_bytes(8, "big"),
    "str8-for-fixstr": b"\xd9\x01a",
    "str16-for-str8": b"\xda\x00\x01a",
    "bin16-for-bin8": b"\xc5\x00\x01a",
    "array16-for-fixarray": b"\xdc\x00\x01\x01",
    "map16-for-fixmap": b"\xde\x00\x01\x01\x01",
    "invalid-utf8-in-str": b"\xa1\xff",
    "surrogate-in-str": b"\xa3\xed\xa0\x80",
}


@pytest.mark.parametrize("data", list(NON_CANONICAL.values()), ids=list(NON_CANONICAL))
def test_non_canonical_encodings(data: bytes) -> None:
    with pytest.raises(EncodingError):
        unpack_canonical(data)


def test_duplicate_keys_do_not_collapse_silently() -> None:
    data = unsorted_map((1, "a"), (1, "b"))
    assert msgpack.unpackb(data, strict_map_key=False) == {1: "b"}  # what a lax decoder sees
    with pytest.raises(EncodingError, match="canonical"):
        unpack_canonical(data)


@pytest.mark.parametrize("data", [
    b"\xca" + struct.pack(">f", 1.5),
    b"\xcb" + struct.pack(">d", 1.5),
    b"\xcb" + struct.pack(">d", 1.0),
    b"\x91\xcb" + struct.pack(">d", float("nan")),
    b"\x81\xcb" + struct.pack(">d", 1.0) + b"\x00",  # float map key
    b"\x81\x01\xcb" + struct.pack(">d", 0.0),
], ids=["f32", "f64", "f64-integral", "nan-in-array", "float-key", "float-value"])
def test_floats_are_refused(data: bytes) -> None:
    with pytest.raises(EncodingError, match="float"):
        unpack_canonical(data)


@pytest.mark.parametrize("data", [
    b"\xd4\x01\x00", b"\xd5\x01\x00\x00", b"\xd6\xff\x00\x00\x00\x00",
    b"\xd7\xff" + bytes(8), b"\xc7\x01\x01\x00", b"\xc8\x00\x01\x01\x00",
    b"\xc9\x00\x00\x00\x01\x01\x00", b"\x91\xd4\x01\x00",
])
def test_extension_types_are_refused(data: bytes) -> None:
    with pytest.raises(EncodingError):
        unpack_canonical(data)


@pytest.mark.parametrize("data", [b"", b"\x91", b"\xa2a", b"\xc4\x02a", b"\xc1", b"\x01\x02",
                                  b"\x90\x90"])
def test_truncated_reserved_or_trailing(data: bytes) -> None:
    with pytest.raises(EncodingError):
        unpack_canonical(data)


@pytest.mark.parametrize("depth", [33, 100, 499, 500, 999, 1000, 1023, 1024, 5000, 100000])
def test_deep_nesting_is_an_encoding_error_never_a_recursion_error(depth: int) -> None:
    for data in (b"\x91" * depth + b"\x90", b"\x81\x00" * depth + b"\x80"):
        with pytest.raises(EncodingError):
            unpack_canonical(data)


def test_nesting_limit_boundary() -> None:
    assert unpack_canonical(b"\x91" * 31 + b"\x90", max_depth=32) is not None
    with pytest.raises(EncodingError, match="nesting"):
        unpack_canonical(b"\x91" * 32 + b"\x90", max_depth=32)


@pytest.mark.parametrize(("data", "limit"), [
    (b"\xdb\xff\xff\xff\xff", "max_str_len"),
    (b"\xc6\xff\xff\xff\xff", "max_bin_len"),
    (b"\xdd\xff\xff\xff\xff", "max_array_len"),
    (b"\xdf\xff\xff\xff\xff", "max_map_len"),
])
def test_hostile_length_prefixes_allocate_nothing(data: bytes, limit: str) -> None:
    """Refused from the announced length, before anything that size exists
    (measured in allocated bytes, not in time)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(EncodingError):
            unpack_canonical(data + b"\x00" * 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


@pytest.mark.parametrize(("value", "limit"), [
    ("x" * 11, {"max_str_len": 10}), (b"x" * 11, {"max_bin_len": 10}),
    ([0] * 11, {"max_array_len": 10}), ({i: 0 for i in range(11)}, {"max_map_len": 10}),
])
def test_limits_are_enforced_one_over(value: Any, limit: dict[str, int]) -> None:
    with pytest.raises(EncodingError):
        unpack_canonical(pack(value), **limit)
    smaller = value[:10] if not isinstance(value, dict) else {i: 0 for i in range(10)}
    assert unpack_canonical(pack(smaller), **limit) == smaller


def test_mixed_key_types_cannot_be_canonical() -> None:
    with pytest.raises(EncodingError):
        unpack_canonical(unsorted_map((1, 0), ("a", 0)))


# -- base64url ------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", b"\xfb\xff\xbf", bytes(range(256))])
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", [
    "AA==", "AAA=", "AA=", "A", "AAAAA",  # padding, impossible lengths
    "+/8", "ab+c", "ab/c",  # standard alphabet
    "AA AA", "AA\nAA", " AAAA", "AAAA\n", "AA\tA", "AA.A", "AA%3D",
    "AB", "AAB", "AP", "AAF",  # non-zero trailing bits
    "ÀAAA", "AAA\u0660", "\uff21\uff21\uff21\uff21",  # non-ASCII, full-width letters
])
def test_b64url_decode_is_strict(text: str) -> None:
    with pytest.raises(EncodingError):
        b64url_decode(text)


def test_b64url_trailing_bits_boundary() -> None:
    assert b64url_decode("AA") == b"\x00"
    assert b64url_decode("AAA") == b"\x00\x00"
    assert b64url_decode("_w") == b"\xff"
    with pytest.raises(EncodingError, match="trailing"):
        b64url_decode("_x")


def _reference_b64url_decode(text: str) -> bytes | None:
    """A slow, obviously strict decoder: the alphabet, a possible length, and
    the canonical encoding of what it decodes to."""
    import base64
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return data if base64.urlsafe_b64encode(data).rstrip(b"=").decode() == text else None


ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ODD = "+/=!.* \n\t\x00\x7f\u00e9\uff21"


def test_b64url_decode_agrees_with_a_strict_reference_on_every_short_text() -> None:
    """Every text of up to two characters over the alphabet and some
    characters outside it, and a fixed sample of longer ones."""
    import itertools
    import random

    chars = ALPHABET + ODD
    texts = ["".join(t) for n in range(3) for t in itertools.product(chars, repeat=n)]
    rng = random.Random(2)  # a fixed sample: the same texts on every run
    texts += ["".join(rng.choice(chars) for _ in range(rng.randint(3, 9))) for _ in range(20000)]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 9))) for _ in range(20000)]
    for text in texts:
        expected = _reference_b64url_decode(text)
        try:
            got: bytes | None = b64url_decode(text)
        except EncodingError:
            got = None
        assert got == expected, repr(text)


@pytest.mark.parametrize("value", [b"AAAA", None, 7, ["AAAA"]])
def test_b64url_decode_refuses_what_is_not_text(value: Any) -> None:
    with pytest.raises(EncodingError):
        b64url_decode(value)
