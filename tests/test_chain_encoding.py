"""Attacks on the wire format of trusthop.chain: base64url(msgpack([1, ring0, ...])).

Every test hands :func:`decode_chain` (or the verifier) bytes that differ from
the one canonical encoding and asserts ``malformed`` (or the bound that comes
first), with the offending ring index where the decoder names one.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from chainkit import (
    ANY_RING,
    EDGE,
    S0,
    T0,
    Story,
    build_story,
    encode_bytes,
    encode_raw,
    raw_maps,
    rejected,
    verify,
)

from trusthop.canonical import b64url_decode, b64url_encode, pack
from trusthop.chain import (
    K_ACR,
    K_ACTOR,
    K_AMR,
    K_CONSUMED,
    K_CRED_HASH,
    K_DEST,
    K_EVENT,
    K_EXP,
    K_IAT,
    K_ISSUER,
    K_KID,
    K_PEER,
    K_PREV,
    K_SCOPE,
    K_SIG,
    K_SUBJECT,
    K_TRUST_DOMAIN,
    K_TXN,
    MAX_SCOPE_ENTRIES,
    MAX_TEXT,
    WIRE_VERSION,
    Chain,
    decode_chain,
    ring_hash,
)
from trusthop.errors import Reason, TrustError
from trusthop.sign import hash_credential, mint_origin

R = Reason
ORIGIN_KEYS = {
    K_SIG,
    K_ACTOR,
    K_KID,
    K_IAT,
    K_EXP,
    K_SCOPE,
    K_SUBJECT,
    K_ISSUER,
    K_CRED_HASH,
    K_TXN,
    K_TRUST_DOMAIN,
    K_ACR,
    K_AMR,
}
HOP_KEYS = {
    K_SIG,
    K_ACTOR,
    K_KID,
    K_IAT,
    K_EXP,
    K_SCOPE,
    K_PREV,
    K_EVENT,
    K_DEST,
    K_CONSUMED,
    K_PEER,
}


def decode(text: str, *, max_bytes: int = 16 * 1024, max_rings: int = 32) -> Chain:
    return decode_chain(text, max_bytes=max_bytes, max_rings=max_rings)


def malformed(text: str, ring: object = ANY_RING, contains: str = "") -> TrustError:
    err = rejected(lambda: decode(text), R.MALFORMED, ring)
    assert contains in err.message, err.message
    return err


def with_maps(story: Story, change: Callable[[list[Any]], None]) -> str:
    maps = raw_maps(story.encoded)
    maps = [dict(m) if isinstance(m, dict) else m for m in maps]
    change(maps)
    return encode_raw(maps)


# -- round trip and layout ---------------------------------------------------


def test_round_trip_is_exact(story: Story) -> None:
    chain = decode(story.encoded)
    assert chain == story.chain
    assert chain.encode() == story.encoded
    assert chain.hashes() == story.chain.hashes()
    assert [ring_hash(r) for r in chain.rings] == story.chain.hashes()


def test_wire_layout(story: Story) -> None:
    version, origin, hop1, hop2 = raw_maps(story.encoded)
    assert version == WIRE_VERSION == 1
    assert set(origin) == ORIGIN_KEYS
    assert set(hop1) == HOP_KEYS - {K_CONSUMED, K_PEER}
    assert set(hop2) == HOP_KEYS
    assert origin[K_SCOPE] == sorted(S0)
    assert origin[K_CRED_HASH] == hash_credential("token-of-user:alice")
    # The credential itself never travels, in any encoding.
    assert b"token-of-user" not in b64url_decode(story.encoded)
    assert "token-of-user" not in story.encoded
    raw = b64url_decode(story.encoded)
    assert raw == pack(raw_maps(story.encoded))


def test_encoding_is_deterministic() -> None:
    assert build_story().encoded == build_story().encoded


def test_origin_only_chain_decodes_but_never_verifies(story: Story) -> None:
    only = Chain(story.origin).encode()
    assert decode(only).hops == ()
    rejected(lambda: verify(only, story=story), R.MALFORMED)


# -- base64url -------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s + "=" * (-len(s) % 4 or 4),
        lambda s: s + "==",
        lambda s: s.replace("-", "+").replace("_", "/") + ("" if ("-" in s or "_" in s) else "+"),
        lambda s: s[:10] + "\n" + s[10:],
        lambda s: " " + s,
        lambda s: s[:10] + "\u00e9" + s[10:],
        lambda s: s[:-1],  # leaves a length no encoder produces, or trailing garbage
        lambda s: s + "A",
        lambda s: s + "AA",
    ],
)
def test_base64url_variants_are_malformed(story: Story, tamper: Callable[[str], str]) -> None:
    rejected(lambda: decode(tamper(story.encoded)), R.MALFORMED)


def test_trailing_bits_are_malformed() -> None:
    text = b64url_encode(b"\x91\x01")  # [1], 3 characters with 2 spare bits
    assert text == "kQE"
    malformed("kQF", contains="base64url")
    malformed(text, contains="version")


def test_empty_and_degenerate_chains() -> None:
    malformed("", contains="empty")
    malformed(encode_bytes(b"\x90"))  # []
    malformed(encode_raw([1]))
    malformed(encode_raw({0: 1}), contains="array")
    malformed(encode_bytes(b"\xc0"))  # nil
    malformed(encode_bytes(b"\xdc\x00"))  # truncated array16 header
    malformed(encode_bytes(b"\xdd\x00\x00"))  # truncated array32 header


@pytest.mark.parametrize("version", [0, 2, -1, "1", True, 1.0, None, [1], b"\x01"])
def test_wrong_version(story: Story, version: Any) -> None:
    text = with_maps(story, lambda m: m.__setitem__(0, version))
    malformed(text)


# -- non-canonical msgpack -----------------------------------------------------


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


def _raw_chain(maps: list[Any], ring_bytes: dict[int, bytes]) -> str:
    """Encode ``maps`` canonically except rings given as raw bytes."""
    out = bytearray(_packer().pack_array_header(len(maps)))
    for index, item in enumerate(maps):
        out += ring_bytes[index] if index in ring_bytes else pack(item)
    return encode_bytes(bytes(out))


def _map_bytes(items: list[tuple[Any, Any]], value_bytes: dict[Any, bytes] | None = None) -> bytes:
    packer = _packer()
    out = bytearray(packer.pack_map_header(len(items)))
    for key, value in items:
        out += pack(key)
        out += (value_bytes or {}).get(key, pack(value))
    return bytes(out)


def test_unsorted_ring_keys(story: Story) -> None:
    maps = raw_maps(story.encoded)
    items = sorted(maps[1].items(), reverse=True)
    malformed(_raw_chain(maps, {1: _map_bytes(items)}), contains="canonical")


def test_duplicate_ring_key(story: Story) -> None:
    maps = raw_maps(story.encoded)
    items = sorted(maps[2].items())
    items.insert(2, (K_ACTOR, "spiffe://prod.example.com/ns/evil/sa/x"))
    items.sort(key=lambda kv: kv[0])
    malformed(_raw_chain(maps, {2: _map_bytes(items)}), contains="canonical")


@pytest.mark.parametrize(
    "encoding",
    [
        lambda v: b"\xcf" + v.to_bytes(8, "big"),  # uint64 for a uint32 value
        lambda v: b"\xd3" + v.to_bytes(8, "big"),  # int64
    ],
)
def test_non_minimal_integer(story: Story, encoding: Callable[[int], bytes]) -> None:
    maps = raw_maps(story.encoded)
    items = sorted(maps[1].items())
    body = _map_bytes(items, {K_IAT: encoding(maps[1][K_IAT])})
    malformed(_raw_chain(maps, {1: body}), contains="canonical")


def test_non_minimal_small_integer_in_version(story: Story) -> None:
    raw = bytearray(b64url_decode(story.encoded))
    assert raw[1] == 0x01
    raw[1:2] = b"\xcc\x01"  # uint8 for a positive fixint
    malformed(encode_bytes(bytes(raw)), contains="canonical")


def test_non_minimal_string_header(story: Story) -> None:
    maps = raw_maps(story.encoded)
    kid = maps[1][K_KID].encode()
    body = _map_bytes(sorted(maps[1].items()), {K_KID: b"\xd9" + bytes([len(kid)]) + kid})
    malformed(_raw_chain(maps, {1: body}), contains="canonical")


@pytest.mark.parametrize(
    ("ring", "key", "new"),
    [
        (1, K_ACTOR, lambda v: v.encode()),  # str sent as bin
        (1, K_KID, lambda v: v.encode()),
        (1, K_CRED_HASH, lambda v: v.hex()[:32]),  # bin sent as str
        (1, K_SIG, lambda v: v.hex()),
        (2, K_PREV, lambda v: v.hex()[:32]),
        (3, K_EVENT, lambda v: v.hex()[:32]),
        (3, K_DEST, lambda v: v.encode()),
        (3, K_CONSUMED, lambda v: v.encode()),
    ],
)
def test_str_and_bin_swapped(story: Story, ring: int, key: int, new: Callable[[Any], Any]) -> None:
    text = with_maps(story, lambda m: m[ring].__setitem__(key, new(m[ring][key])))
    malformed(text, ring=ring - 1)


@pytest.mark.parametrize(
    "ext",
    [
        b"\xd4\x01\x00",  # fixext1 type 1
        b"\xd6\xff" + (T0).to_bytes(4, "big"),  # msgpack timestamp 32
        b"\xc7\x00\x05",  # ext8 of length 0
    ],
)
def test_extension_types(story: Story, ext: bytes) -> None:
    maps = raw_maps(story.encoded)
    body = _map_bytes(sorted(maps[1].items()), {K_IAT: ext})
    malformed(_raw_chain(maps, {1: body}))


@pytest.mark.parametrize(
    "value", [b"\xca" + struct.pack(">f", 1.7e9), b"\xcb" + struct.pack(">d", float(T0))]
)
def test_float_field_values(story: Story, value: bytes) -> None:
    maps = raw_maps(story.encoded)
    body = _map_bytes(sorted(maps[1].items()), {K_IAT: value})
    malformed(_raw_chain(maps, {1: body}))


@pytest.mark.parametrize(
    "alias",
    [b"\xcb" + struct.pack(">d", 1.0), b"\xca" + struct.pack(">f", 1.0), b"\xc3"],
    ids=["float64-1.0", "float32-1.0", "true"],
)
def test_map_key_aliases_of_an_integer_key(story: Story, alias: bytes) -> None:
    """1.0 and True hash like 1 in Python: as map keys they must not pass for K_ACTOR."""
    maps = raw_maps(story.encoded)
    packer = _packer()
    out = bytearray(packer.pack_map_header(len(maps[1])))
    for key, value in sorted(maps[1].items()):
        out += alias if key == K_ACTOR else pack(key)
        out += pack(value)
    malformed(_raw_chain(maps, {1: bytes(out)}))


def test_float_version(story: Story) -> None:
    raw = bytearray(b64url_decode(story.encoded))
    raw[1:2] = b"\xcb" + struct.pack(">d", 1.0)
    malformed(encode_bytes(bytes(raw)))


def test_trailing_bytes(story: Story) -> None:
    raw = b64url_decode(story.encoded)
    for extra in (b"\x00", b"\xc0", raw):
        malformed(encode_bytes(raw + extra), contains="msgpack")


def test_truncated(story: Story) -> None:
    raw = b64url_decode(story.encoded)
    for cut in (1, 2, 64, len(raw) // 2, len(raw) - 1):
        malformed(encode_bytes(raw[:cut]))


@pytest.mark.parametrize("depth", [10, 100, 495, 600, 1000, 1022, 1023, 5000])
def test_deep_nesting_is_malformed_whatever_the_depth(story: Story, depth: int) -> None:
    nested = b"\x91" * depth + b"\x90"
    maps = raw_maps(story.encoded)
    body = _map_bytes(sorted(maps[1].items()), {K_ACR: nested})
    malformed(_raw_chain(maps, {1: body}))
    # and as a bare element of the top-level array, past the ring maps
    malformed(encode_bytes(b"\x92\x01" + nested))


def test_deep_nesting_of_maps(story: Story) -> None:
    nested = b"\x81\x00" * 800 + b"\x80"
    malformed(encode_bytes(b"\x92\x01" + nested))


@pytest.mark.parametrize(
    "header",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 announcing 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32 inside a ring
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
    ],
)
def test_hostile_length_prefixes_inside_a_ring_are_cheap(story: Story, header: bytes) -> None:
    maps = raw_maps(story.encoded)
    body = _map_bytes(sorted(maps[1].items()), {K_ACR: header + b"\x00" * 16})
    text = _raw_chain(maps, {1: body})
    start = time.perf_counter()
    malformed(text)
    assert time.perf_counter() - start < 0.5


def test_map_with_too_many_entries(story: Story) -> None:
    maps = raw_maps(story.encoded)
    big = {i: 0 for i in range(100, 170)}
    malformed(encode_raw([1, maps[1] | big]))


# -- structure of rings --------------------------------------------------------


@pytest.mark.parametrize("key", [7, 9, 17, 19, 25, 99, -1])
@pytest.mark.parametrize("ring", [1, 2, 3])
def test_unknown_ring_field(story: Story, ring: int, key: int) -> None:
    malformed(
        with_maps(story, lambda m: m[ring].__setitem__(key, "x")), ring=ring - 1, contains="unknown"
    )


def test_fields_of_the_other_ring_kind_are_unknown(story: Story) -> None:
    malformed(with_maps(story, lambda m: m[1].__setitem__(K_DEST, "kafka:x")), ring=0)
    malformed(with_maps(story, lambda m: m[2].__setitem__(K_SUBJECT, "user:x")), ring=1)


def test_string_map_key(story: Story) -> None:
    maps = raw_maps(story.encoded)
    body = _map_bytes([*sorted(maps[1].items()), ("alg", "none")])
    malformed(_raw_chain(maps, {1: body}))


@pytest.mark.parametrize("key", sorted(ORIGIN_KEYS - {K_ACR, K_AMR}))
def test_missing_origin_field(story: Story, key: int) -> None:
    malformed(with_maps(story, lambda m: m[1].pop(key)), ring=0, contains="missing")


@pytest.mark.parametrize("key", sorted(HOP_KEYS - {K_CONSUMED, K_PEER}))
@pytest.mark.parametrize("ring", [2, 3])
def test_missing_hop_field(story: Story, ring: int, key: int) -> None:
    malformed(with_maps(story, lambda m: m[ring].pop(key)), ring=ring - 1, contains="missing")


@pytest.mark.parametrize("ring_value", [[], "ring", 7, None, b"\x00" * 32])
def test_ring_that_is_not_a_map(story: Story, ring_value: Any) -> None:
    malformed(with_maps(story, lambda m: m.__setitem__(2, ring_value)), ring=1)


BAD_VALUES: list[tuple[int, int, Any]] = [
    (1, K_IAT, -1),
    (1, K_IAT, 2**40),
    (1, K_EXP, True),
    (2, K_IAT, "1767225600"),
    (3, K_EXP, None),
    (3, K_EXP, 2**64 - 1),
    (1, K_EXP, -(2**63)),
    (1, K_SCOPE, "orders:read"),
    (1, K_SCOPE, ["b", "a"]),
    (1, K_SCOPE, ["a", "a"]),
    (1, K_SCOPE, [""]),
    (1, K_SCOPE, ["x" * 257]),
    (1, K_SCOPE, [1]),
    (1, K_AMR, "pwd"),
    (1, K_AMR, [""]),
    (1, K_AMR, ["x" * 65]),
    (1, K_AMR, ["a"] * 17),
    (1, K_AMR, [1]),
    (1, K_ACTOR, "spiffe://Prod.example.com/ns/edge/sa/gateway"),
    (1, K_ACTOR, "spiffe://prod.example.com/ns/edge/sa/gateway/"),
    (1, K_ACTOR, "https://prod.example.com/gateway"),
    (3, K_ACTOR, "spiffe://prod.example.com/ns/%73hop/sa/orders"),
    (1, K_SUBJECT, ""),
    (1, K_SUBJECT, "u" * (MAX_TEXT + 1)),
    (1, K_ISSUER, 7),
    (1, K_TXN, ""),
    (1, K_TRUST_DOMAIN, ""),
    (1, K_ACR, ""),
    (1, K_KID, ""),
    (1, K_CRED_HASH, b"\x00" * 31),
    (1, K_CRED_HASH, b"\x00" * 33),
    (2, K_PREV, b""),
    (3, K_EVENT, b"\x00" * 64),
    (3, K_DEST, ""),
    (3, K_DEST, "k" * (MAX_TEXT + 1)),
    (3, K_CONSUMED, ""),
    (3, K_PEER, ""),
    (1, K_SIG, b"\x00" * 63),
    (3, K_SIG, b"\x00" * 65),
    (2, K_SIG, b""),
]


@pytest.mark.parametrize(
    ("ring", "key", "value"),
    BAD_VALUES,
    ids=[f"r{r - 1}-k{k}-{str(v)[:12]}" for r, k, v in BAD_VALUES],
)
def test_field_value_out_of_its_domain(story: Story, ring: int, key: int, value: Any) -> None:
    malformed(with_maps(story, lambda m: m[ring].__setitem__(key, value)), ring=ring - 1)


def test_scope_over_its_entry_limit(story: Story) -> None:
    too_many = [f"s{i:03d}" for i in range(MAX_SCOPE_ENTRIES + 1)]
    malformed(with_maps(story, lambda m: m[1].__setitem__(K_SCOPE, too_many)))
    too_many = too_many[:MAX_SCOPE_ENTRIES]
    chain = decode(with_maps(story, lambda m: m[1].__setitem__(K_SCOPE, too_many)))
    assert len(chain.origin.scope) == MAX_SCOPE_ENTRIES


def test_field_values_at_their_limits_decode(story: Story) -> None:
    def change(m: list[Any]) -> None:
        m[1][K_SUBJECT] = "u" * MAX_TEXT
        m[1][K_IAT] = 0
        m[1][K_SCOPE] = [f"s{i:03d}" for i in range(MAX_SCOPE_ENTRIES)]
        m[1][K_AMR] = ["x" * 64] * 16
        m[3][K_EXP] = 2**40 - 1

    chain = decode(with_maps(story, change))
    assert chain.origin.subject == "u" * MAX_TEXT
    assert len(chain.origin.scope) == MAX_SCOPE_ENTRIES
    assert chain.hops[-1].exp == 2**40 - 1


# -- bounds ---------------------------------------------------------------------


def test_size_bound_boundary(story: Story) -> None:
    size = len(story.encoded)
    assert decode(story.encoded, max_bytes=size) == story.chain
    rejected(lambda: decode(story.encoded, max_bytes=size - 1), R.TOO_LARGE)


def test_ring_bound_boundary(story: Story) -> None:
    assert decode(story.encoded, max_rings=3) == story.chain
    rejected(lambda: decode(story.encoded, max_rings=2), R.DEPTH_EXCEEDED)


def test_size_is_checked_before_base64(story: Story) -> None:
    rejected(lambda: decode("=" * 20000), R.TOO_LARGE)
    rejected(lambda: decode(story.encoded + "!!", max_bytes=len(story.encoded)), R.TOO_LARGE)


def test_ring_count_is_checked_before_decoding_the_rings() -> None:
    # 40 rings of garbage: the count alone decides.
    text = encode_bytes(b"\xdc\x00\x29\x01" + b"\xc1" * 40)
    rejected(lambda: decode(text), R.DEPTH_EXCEEDED)


def test_mint_origin_output_decodes() -> None:
    origin = mint_origin(
        EDGE, subject="s", issuer="i", credential=b"c", scope=[], now=0, ttl=0, transaction_id="t"
    )
    chain = decode(Chain(origin).encode())
    assert chain.origin == origin
    assert chain.origin.acr is None and chain.origin.amr is None


def test_ring_text_cannot_carry_line_breaks_or_control_characters() -> None:
    # Red-team finding: a subject with "\n" or U+2028 forged lines in
    # `policy explain` output and split decision-log records.
    import time

    import pytest

    from trusthop import Identity, SigningKey, TrustError, mint_origin
    from trusthop.errors import Reason

    edge = Identity.create("spiffe://prod.example.com/edge", SigningKey.from_seed(b"c" * 32))
    for subject in ("user:a\nDENIED", "user:a\u2028x", "user:a\x1b[31m", "user:a\u0085"):
        with pytest.raises(TrustError) as error:
            mint_origin(
                edge, subject=subject, issuer="i", credential="t", scope=["s"], now=time.time()
            )
        assert error.value.reason is Reason.MALFORMED
