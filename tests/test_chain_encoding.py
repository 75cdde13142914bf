"""Attacks on the wire format of trusthop.chain (version 2).

``trustchain = "2" "." b64url(ring0) "." b64url(ring1) ...``, each ring its
64-byte signature then its body, a canonical msgpack map with integer keys.

Every test hands :func:`decode_chain` (or the verifier) text or bytes that
differ from the one canonical encoding and asserts ``malformed`` (or the bound
that comes first), with the offending ring index where the decoder names one.
Decoding checks no signature, so bodies are edited here without re-signing;
``tests/test_verify.py`` attacks what the signatures and links protect.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from chainkit import (
    ANY_RING,
    BROKER_PEER,
    DEST2,
    EDGE,
    EDGE_ID,
    ORDERS,
    ORDERS_ID,
    S0,
    S1,
    S2,
    T0,
    Story,
    body_map,
    build_story,
    edit_ring,
    encode_segments,
    make_event,
    rejected,
    verify,
    wire_hashes,
    wire_rings,
)

from trusthop import chain as chain_module
from trusthop.canonical import b64url_decode, b64url_encode, pack
from trusthop.chain import CHAIN_PREFIX, WIRE_VERSION, Chain, HopRing, decode_chain, decode_rings
from trusthop.errors import Reason, TrustError
from trusthop.rings import (
    K_ACR,
    K_ACTOR,
    K_AMR,
    K_CONSUMED,
    K_CRED_HASH,
    K_DEST,
    K_EVENT,
    K_IAT,
    K_ISSUER,
    K_KEY,
    K_LINK,
    K_PEER,
    K_SCOPE,
    K_SUBJECT,
    K_TTL,
    K_TXN,
    K_X5C,
    MAX_RING_BYTES,
    MAX_SCOPE_ENTRIES,
    MAX_TEXT,
    SIGNATURE_BYTES,
    link_tag,
)
from trusthop.sign import append_hop, hash_credential, mint_origin

R = Reason
ORIGIN_REQUIRED = {K_ACTOR, K_IAT, K_TTL, K_SCOPE, K_SUBJECT, K_ISSUER, K_CRED_HASH, K_TXN}
ORIGIN_KEYS = ORIGIN_REQUIRED | {K_KEY, K_ACR, K_AMR}
HOP_REQUIRED = {K_ACTOR, K_IAT, K_LINK, K_EVENT, K_DEST}
HOP_KEYS = HOP_REQUIRED | {K_KEY, K_TTL, K_SCOPE, K_CONSUMED, K_PEER}
UUID_TEXT = "0b9a4c7e-5f1d-4e2a-9c3b-7d6e5f4a3b2c"


def decode(text: str, *, max_bytes: int = 16 * 1024, max_rings: int = 32) -> Chain:
    return decode_chain(text, max_bytes=max_bytes, max_rings=max_rings)


def malformed(text: str, ring: object = ANY_RING, contains: str = "") -> TrustError:
    err = rejected(lambda: decode(text), R.MALFORMED, ring)
    assert contains in err.message, err.message
    return err


def with_body(story: Story, index: int, change: Callable[[dict[int, Any]], Any]) -> str:
    return edit_ring(story.encoded, index, change)


def set_field(key: int, value: Any) -> Callable[[dict[int, Any]], None]:
    return lambda body: body.__setitem__(key, value)


def with_raw_body(story: Story, index: int, body: bytes) -> str:
    """The story with ring ``index``'s body replaced by raw bytes (signature kept)."""
    rings = wire_rings(story.encoded)
    rings[index] = rings[index][:SIGNATURE_BYTES] + body
    return encode_segments(rings)


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


def map_bytes(items: list[tuple[Any, Any]], raw_values: dict[Any, bytes] | None = None,
              raw_keys: dict[Any, bytes] | None = None) -> bytes:
    """A msgpack map in exactly the order given; ``raw_values``/``raw_keys``
    replace the encoding of the value/key of the named entries."""
    out = bytearray(_packer().pack_map_header(len(items)))
    for key, value in items:
        out += (raw_keys or {}).get(key, pack(key))
        out += (raw_values or {}).get(key, pack(value))
    return bytes(out)


def sorted_items(story: Story, index: int) -> list[tuple[int, Any]]:
    return sorted(body_map(wire_rings(story.encoded)[index]).items())


# -- round trip and layout ---------------------------------------------------


def test_round_trip_is_exact(story: Story) -> None:
    chain = decode(story.encoded)
    assert chain == story.chain
    assert chain.encode() == story.encoded
    assert chain.ring_bytes == tuple(wire_rings(story.encoded))
    assert chain.hashes() == story.chain.hashes() == wire_hashes(chain.ring_bytes)
    assert chain.rings == story.chain.rings
    hashes = chain.hashes()
    assert chain.link_tags == (None, link_tag(hashes[0]), link_tag(hashes[1]))


def test_wire_layout(story: Story) -> None:
    text = story.encoded
    assert WIRE_VERSION == 2 and CHAIN_PREFIX == "2."
    assert text.startswith("2.") and text.count(".") == 3
    assert set(text[2:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    rings = wire_rings(text)
    assert [b64url_encode(r) for r in rings] == text.split(".")[1:]
    for ring, raw in zip(story.chain.rings, rings, strict=True):
        assert raw[:SIGNATURE_BYTES] == ring.signature
    origin, hop1, hop2 = (body_map(r) for r in rings)
    assert set(origin) == ORIGIN_KEYS  # no trust-domain field: it is the actor's
    assert set(hop1) == HOP_KEYS - {K_CONSUMED, K_PEER}
    assert set(hop2) == HOP_KEYS
    for raw in rings:  # keys strictly ascending, as written
        keys = list(msgpack.unpackb(raw[SIGNATURE_BYTES:], strict_map_key=False))
        assert keys == sorted(keys)
    assert origin[K_ACTOR] == EDGE_ID
    assert origin[K_KEY] == EDGE.key_tag == EDGE.key.public_key.key_tag
    assert (origin[K_IAT], origin[K_TTL]) == (T0, 3600)
    assert origin[K_SCOPE] == sorted(S0)
    assert origin[K_CRED_HASH] == hash_credential("token-of-user:alice")
    assert origin[K_TXN] == "txn-1"  # not a UUID: travels as text
    # Hops: the actor as a path, iat as seconds after the previous ring, ttl.
    assert hop1[K_ACTOR] == "/ns/edge/sa/gateway"
    assert hop2[K_ACTOR] == "/ns/shop/sa/orders"
    assert (hop1[K_IAT], hop1[K_TTL]) == (10, 1800)
    assert (hop2[K_IAT], hop2[K_TTL]) == (10, 900)
    assert (hop1[K_SCOPE], hop2[K_SCOPE]) == (sorted(S1), sorted(S2))
    hashes = wire_hashes(rings)
    assert hop1[K_LINK] == int.from_bytes(hashes[0][:2], "big")
    assert hop2[K_LINK] == int.from_bytes(hashes[1][:2], "big")
    assert hop2[K_KEY] == ORDERS.key_tag
    assert (hop2[K_DEST], hop2[K_CONSUMED], hop2[K_PEER]) == (DEST2, "txn-1-e1", BROKER_PEER)
    # The credential itself never travels, in any encoding.
    assert not any(b"token-of-user" in r for r in rings)
    assert "token-of-user" not in text


def test_a_hop_that_does_not_narrow_writes_no_ttl_and_no_scope(story: Story) -> None:
    """Differences against the previous ring: an unchanged scope and end of
    validity are absent from the body and read back from the ring before."""
    chain = append_hop(EDGE, story.chain, event_digest=bytes(32), destination="kafka:x",
                       now=T0 + 25)
    body = body_map(chain.ring_bytes[-1])
    assert K_SCOPE not in body and K_TTL not in body
    assert body[K_IAT] == 5
    again = decode(chain.encode()).hops[-1]
    assert (again.scope, again.exp, again.iat) == (S2, story.chain.newest.exp, T0 + 25)


def test_a_derived_chain_begins_with_its_parents_text(story: Story) -> None:
    parent = decode(story.encoded)
    for base in (story.chain, parent):
        child = append_hop(ORDERS, base, event_digest=bytes(32), destination="kafka:x",
                           now=T0 + 25)
        text = child.encode()
        assert text.startswith(story.encoded + ".")
        assert text.count(".") == story.encoded.count(".") + 1
        assert decode(text) == child


def test_encoding_is_deterministic() -> None:
    assert build_story().encoded == build_story().encoded


def test_an_origin_alone_is_not_a_chain(story: Story) -> None:
    only = Chain(story.origin).encode()
    assert only.count(".") == 1
    malformed(only, contains="hop ring")
    rejected(lambda: verify(only, story=story), R.MALFORMED)


# -- the text: version prefix, separators, base64url ------------------------


def _segments(story: Story) -> list[str]:
    return story.encoded.split(".")[1:]


TEXT_TRICKS: dict[str, Callable[[str], str]] = {
    "version-1": lambda t: "1" + t[1:],
    "version-02": lambda t: "0" + t,
    "version-3": lambda t: "3" + t[1:],
    "version-v2": lambda t: "v" + t,
    "version-2.0": lambda t: "2.0" + t[1:],
    "version-colon": lambda t: "2:" + t[2:],
    "version-fullwidth": lambda t: "\uff12" + t[1:],
    "version-arabic-indic": lambda t: "\u0662" + t[1:],
    "version-missing": lambda t: t[2:],
    "double-dot-after-version": lambda t: "2." + t[1:],
    "empty-segment-inside": lambda t: t.replace(".", "..", 2).replace("..", ".", 1),
    "trailing-dot": lambda t: t + ".",
    "leading-space": lambda t: " " + t,
    "trailing-space": lambda t: t + " ",
    "trailing-newline": lambda t: t + "\n",
    "space-after-version": lambda t: "2. " + t[2:],
    "space-before-dot": lambda t: t.replace(".", " .", 2).replace(" .", ".", 1),
    "tab-inside": lambda t: t[:40] + "\t" + t[40:],
    "padding-1": lambda t: t + "=",
    "padding-2": lambda t: t + "==",
    "padding-inside": lambda t: t.replace(".", "=.", 2).replace("=.", ".", 1),
    "standard-alphabet": lambda t: t[:2] + t[2:].replace("-", "+").replace("_", "/"),
    "plus": lambda t: t[:30] + "+" + t[31:],
    "slash": lambda t: t[:30] + "/" + t[31:],
    "non-ascii-letter": lambda t: t[:30] + "\u00e9" + t[31:],
    "fullwidth-letter": lambda t: t[:30] + "\uff21" + t[31:],
    "nul": lambda t: t[:30] + "\x00" + t[31:],
    "percent-encoded": lambda t: t.replace(".", "%2E", 2).replace("%2E", ".", 1),
    "one-character-more": lambda t: t + "A",
    "one-character-less": lambda t: t[:-1],
}


@pytest.mark.parametrize("trick", list(TEXT_TRICKS.values()), ids=list(TEXT_TRICKS))
def test_text_tricks_are_malformed(story: Story, trick: Callable[[str], str]) -> None:
    text = trick(story.encoded)
    assert text != story.encoded
    malformed(text)
    rejected(lambda: verify(text, story=story), R.MALFORMED)


@pytest.mark.parametrize("version", ["1", "0", "3", "02", "2.0", "", " 2", "II"])
def test_another_version_is_refused_by_its_prefix_alone(story: Story, version: str) -> None:
    text = version + story.encoded[1:]
    err = malformed(text)
    if not text.startswith("2."):
        assert "version" in err.message and err.ring is None


def test_a_version_1_chain_is_refused_before_its_rings_are_read(
    story: Story, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(chain_module, "b64url_decode", lambda s: seen.append(s) or b"")
    err = malformed("kwGLAMRAAon3X-C1oLvS_jrRhIdMkMMpQCSV1YWCUr57WAMVgz", contains="version")
    assert seen == []
    assert "'kwGLAMRA'" in err.message  # the version read is shown, cut short


def test_non_zero_trailing_bits_are_malformed(story: Story) -> None:
    tried = 0
    for index, segment in enumerate(_segments(story)):
        if len(segment) % 4 == 0:
            continue
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        value = alphabet.index(segment[-1]) | 1  # a spare bit no encoder sets
        changed = segment[:-1] + alphabet[value]
        segments = _segments(story)
        segments[index] = changed
        assert b64url_decode(segment) != b""
        malformed("2." + ".".join(segments), ring=index, contains="trailing bits")
        tried += 1
    assert tried >= 1


@pytest.mark.parametrize(
    "text", ["", "2", "2.", "2..", "2...", ".", "2.AAAA", "2.A.A", "..."],
)
def test_empty_and_degenerate_texts(text: str) -> None:
    malformed(text)


def test_empty_ring_segments_are_named(story: Story) -> None:
    segments = _segments(story)
    malformed("2.." + ".".join(segments[1:]), ring=0)
    malformed(f"2.{segments[0]}..{segments[2]}", ring=1)
    malformed(story.encoded + ".", ring=3)


# -- ring bytes: signature then body ----------------------------------------


def test_ring_too_short_for_a_signature_and_a_body(story: Story) -> None:
    rings = wire_rings(story.encoded)
    for cut in (0, 1, 63, SIGNATURE_BYTES):
        malformed(encode_segments([rings[0], rings[1][:cut], rings[2]]), ring=1,
                  contains="too short")
    malformed(encode_segments([rings[0][:SIGNATURE_BYTES], *rings[1:]]), ring=0,
              contains="too short")
    # 65 bytes: an empty map is a body without any field.
    malformed(encode_segments([rings[0], bytes(64) + b"\x80", rings[2]]), ring=1,
              contains="missing")


def test_a_ring_longer_than_the_bound_is_refused_before_decoding(
    story: Story, monkeypatch: pytest.MonkeyPatch
) -> None:
    rings = wire_rings(story.encoded)
    long = encode_segments([rings[0], rings[1] + b"\x00" * MAX_RING_BYTES, rings[2]])
    calls: list[str] = []
    original = chain_module.b64url_decode
    monkeypatch.setattr(chain_module, "b64url_decode", lambda s: calls.append(s) or original(s))
    err = rejected(lambda: decode(long, max_bytes=10**6), R.MALFORMED, 1)
    assert "longer than" in err.message
    assert len(calls) == 1  # ring 0 only


@pytest.mark.parametrize(
    "body",
    [b"\x90", b"\x91\x01", b"\xa3abc", b"\x01", b"\xc0", b"\xc3", b"\xc4\x01\x00"],
    ids=["array", "array1", "str", "int", "nil", "true", "bin"],
)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_body_that_is_not_a_map(story: Story, body: bytes, index: int) -> None:
    malformed(with_raw_body(story, index, body), ring=index, contains="not a map")


@pytest.mark.parametrize("index", [0, 2])
def test_trailing_bytes_after_the_body(story: Story, index: int) -> None:
    raw = wire_rings(story.encoded)[index][SIGNATURE_BYTES:]
    for extra in (b"\x00", b"\xc0", b"\x80", raw):
        malformed(with_raw_body(story, index, raw + extra), ring=index, contains="msgpack")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_truncated_body(story: Story, index: int) -> None:
    raw = wire_rings(story.encoded)[index][SIGNATURE_BYTES:]
    for cut in (1, 2, len(raw) // 2, len(raw) - 1):
        malformed(with_raw_body(story, index, raw[:cut]), ring=index)


EXTENSIONS = {
    "fixext1": b"\xd4\x01\x00",
    "timestamp32": b"\xd6\xff" + T0.to_bytes(4, "big"),
    "timestamp64": b"\xd7\xff" + (T0 << 2).to_bytes(8, "big"),
    "timestamp96": b"\xc7\x0c\xff" + bytes(4) + T0.to_bytes(8, "big"),
    "ext8-empty": b"\xc7\x00\x05",
}


@pytest.mark.parametrize("ext", list(EXTENSIONS.values()), ids=list(EXTENSIONS))
def test_extension_types_in_every_field(story: Story, ext: bytes) -> None:
    """msgpack's timestamp (-1) is decoded without the extension hook and
    re-encodes to the same bytes: every field rule must still refuse it."""
    for index in range(3):
        items = sorted_items(story, index)
        for key, _ in items:
            malformed(with_raw_body(story, index, map_bytes(items, {key: ext})), ring=index)


@pytest.mark.parametrize("depth", [10, 100, 495, 600, 1000, 1022, 1023, 5000])
def test_deep_nesting_is_malformed_whatever_the_depth(story: Story, depth: int) -> None:
    items = sorted_items(story, 0)
    for nested in (b"\x91" * depth + b"\x90", b"\x81\x00" * depth + b"\x80"):
        malformed(with_raw_body(story, 0, map_bytes(items, {K_ACR: nested})), ring=0)
        malformed(with_raw_body(story, 1, nested), ring=1)


@pytest.mark.parametrize(
    "header",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 announcing 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xdd\xff\xff\xff\xff",  # array32
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
    ],
)
def test_hostile_length_prefixes_inside_a_ring(story: Story, header: bytes) -> None:
    """Refused without allocating what the prefix announces (counted in bytes)."""
    import tracemalloc

    items = sorted_items(story, 1)
    texts = [with_raw_body(story, 1, map_bytes(items, {K_DEST: header + bytes(16)})),
             with_raw_body(story, 1, header + bytes(16))]
    tracemalloc.start()
    try:
        for text in texts:
            malformed(text, ring=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_a_map_with_many_entries(story: Story) -> None:
    items = sorted_items(story, 1) + [(k, 0) for k in range(100, 170)]
    malformed(with_raw_body(story, 1, map_bytes(items)), ring=1, contains="unknown")


# -- canonical msgpack -------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_keys_out_of_order(story: Story, index: int) -> None:
    items = sorted_items(story, index)
    for shuffled in (items[::-1], [items[1], items[0], *items[2:]], [*items[1:], items[0]]):
        malformed(with_raw_body(story, index, map_bytes(shuffled)), ring=index,
                  contains="ascending")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_duplicate_keys(story: Story, index: int) -> None:
    items = sorted_items(story, index)
    actor = dict(items)[K_ACTOR]
    other = "/ns/evil/sa/x" if index else "spiffe://prod.example.com/ns/evil/sa/x"
    for extra in ((K_ACTOR, other), (K_ACTOR, actor), (K_IAT, 0)):
        doubled = sorted([*items, extra], key=lambda kv: kv[0])
        malformed(with_raw_body(story, index, map_bytes(doubled)), ring=index,
                  contains="canonical")


ALIASES = {
    "true": b"\xc3",
    "float64-1.0": b"\xcb" + struct.pack(">d", 1.0),
    "float32-1.0": b"\xca" + struct.pack(">f", 1.0),
    "uint8-1": b"\xcc\x01",
    "int16-1": b"\xd1\x00\x01",
}


@pytest.mark.parametrize("alias", list(ALIASES.values()), ids=list(ALIASES))
@pytest.mark.parametrize("index", [0, 2])
def test_aliases_of_an_integer_key(story: Story, alias: bytes, index: int) -> None:
    """True, 1.0 and a long-form 1 compare (and hash) equal to 1 in Python:
    none of them may pass for the actor's key, alone or beside the real one."""
    items = sorted_items(story, index)
    malformed(with_raw_body(story, index, map_bytes(items, raw_keys={K_ACTOR: alias})),
              ring=index)
    out = bytearray(_packer().pack_map_header(len(items) + 1))
    out += alias + pack("/ns/evil/sa/x")
    for key, value in items:
        out += pack(key) + pack(value)
    malformed(with_raw_body(story, index, bytes(out)), ring=index)


@pytest.mark.parametrize(
    "key",
    [b"\xa1\x01", b"\xc4\x01\x01", b"\x91\x01", b"\x81\x01\x01", b"\xc0", b"\xc2"],
    ids=["str", "bin", "array", "map", "nil", "false"],
)
def test_map_keys_that_are_not_integers(story: Story, key: bytes) -> None:
    items = sorted_items(story, 2)
    out = bytearray(_packer().pack_map_header(len(items) + 1)) + key + b"\x00"
    for k, v in items:
        out += pack(k) + pack(v)
    malformed(with_raw_body(story, 2, bytes(out)), ring=2)


NON_MINIMAL: list[tuple[int, int, Callable[[Any], bytes]]] = [
    (0, K_IAT, lambda v: b"\xcf" + v.to_bytes(8, "big")),  # uint64 for a uint32
    (0, K_IAT, lambda v: b"\xd3" + v.to_bytes(8, "big")),  # int64
    (0, K_KEY, lambda v: b"\xce" + v.to_bytes(4, "big")),  # uint32 for a uint16
    (0, K_TTL, lambda v: b"\xd1" + v.to_bytes(2, "big")),  # int16 for a positive
    (1, K_IAT, lambda v: b"\xcc" + bytes([v])),  # uint8 for a fixint
    (1, K_LINK, lambda v: b"\xcf" + v.to_bytes(8, "big")),
    (2, K_TTL, lambda v: b"\xce" + v.to_bytes(4, "big")),
    (0, K_SUBJECT, lambda v: b"\xd9" + bytes([len(v)]) + v.encode()),  # str8 for fixstr
    (2, K_DEST, lambda v: b"\xda" + len(v).to_bytes(2, "big") + v.encode()),  # str16
    (0, K_CRED_HASH, lambda v: b"\xc5" + len(v).to_bytes(2, "big") + v),  # bin16 for bin8
    (2, K_EVENT, lambda v: b"\xc6" + len(v).to_bytes(4, "big") + v),  # bin32
    (0, K_SCOPE, lambda v: b"\xdc" + len(v).to_bytes(2, "big") + b"".join(pack(x) for x in v)),
    (0, K_AMR, lambda v: b"\xdd" + len(v).to_bytes(4, "big") + b"".join(pack(x) for x in v)),
]


@pytest.mark.parametrize(("index", "key", "encoding"), NON_MINIMAL,
                         ids=[f"r{i}-k{k}-{n}" for n, (i, k, _) in enumerate(NON_MINIMAL)])
def test_non_minimal_integers_lengths_and_headers(
    story: Story, index: int, key: int, encoding: Callable[[Any], bytes]
) -> None:
    items = sorted_items(story, index)
    raw = encoding(dict(items)[key])
    malformed(with_raw_body(story, index, map_bytes(items, {key: raw})), ring=index,
              contains="canonical")


def test_non_minimal_map_header(story: Story) -> None:
    items = sorted_items(story, 2)
    body = b"\xde" + len(items).to_bytes(2, "big") + map_bytes(items)[1:]
    malformed(with_raw_body(story, 2, body), ring=2, contains="canonical")


STR_BIN_SWAPS: list[tuple[int, int, Callable[[Any], Any]]] = [
    (0, K_ACTOR, lambda v: v.encode()),  # str sent as bin
    (0, K_SUBJECT, lambda v: v.encode()),
    (0, K_ISSUER, lambda v: v.encode()),
    (0, K_TXN, lambda v: v.encode()),
    (0, K_ACR, lambda v: v.encode()),
    (0, K_SCOPE, lambda v: [x.encode() for x in v]),
    (0, K_AMR, lambda v: [x.encode() for x in v]),
    (0, K_CRED_HASH, lambda v: v.hex()[:32]),  # bin sent as str
    (1, K_ACTOR, lambda v: v.encode()),
    (2, K_DEST, lambda v: v.encode()),
    (2, K_CONSUMED, lambda v: v.encode()),
    (2, K_PEER, lambda v: v.encode()),
    (2, K_EVENT, lambda v: v.hex()[:32]),
    (2, K_EVENT, lambda v: v.decode("latin-1")),
]


@pytest.mark.parametrize(("index", "key", "new"), STR_BIN_SWAPS,
                         ids=[f"r{i}-k{k}-{n}" for n, (i, k, _) in enumerate(STR_BIN_SWAPS)])
def test_str_and_bin_are_never_interchangeable(
    story: Story, index: int, key: int, new: Callable[[Any], Any]
) -> None:
    malformed(with_body(story, index, lambda b: b.__setitem__(key, new(b[key]))), ring=index)


def test_invalid_utf8_in_a_str(story: Story) -> None:
    items = sorted_items(story, 2)
    malformed(with_raw_body(story, 2, map_bytes(items, {K_DEST: b"\xa2\xc3\x28"})), ring=2)
    surrogate = b"\xa3\xed\xa0\x80"
    malformed(with_raw_body(story, 0, map_bytes(sorted_items(story, 0), {K_SUBJECT: surrogate})),
              ring=0)


@pytest.mark.parametrize(
    ("index", "key", "value"),
    [
        (0, K_IAT, b"\xcb" + struct.pack(">d", float(T0))),
        (0, K_IAT, b"\xca" + struct.pack(">f", float(T0))),
        (1, K_IAT, b"\xcb" + struct.pack(">d", 10.0)),
        (2, K_KEY, b"\xcb" + struct.pack(">d", 1.0)),
        (2, K_LINK, b"\xca" + struct.pack(">f", 1.0)),
        (2, K_TTL, b"\xcb" + struct.pack(">d", float("nan"))),
    ],
)
def test_float_values(story: Story, index: int, key: int, value: bytes) -> None:
    items = sorted_items(story, index)
    malformed(with_raw_body(story, index, map_bytes(items, {key: value})), ring=index)


# -- body key shapes -----------------------------------------------------------


@pytest.mark.parametrize("key", [0, 7, 9, 14, 17, 19, 25, 99, -1, 2**32, 2**64 - 1])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_unknown_field(story: Story, index: int, key: int) -> None:
    malformed(with_body(story, index, set_field(key, "x")), ring=index, contains="unknown")


def test_the_v1_signature_and_trust_domain_fields_are_unknown(story: Story) -> None:
    malformed(with_body(story, 0, set_field(0, bytes(64))), ring=0, contains="unknown")
    malformed(with_body(story, 0, set_field(14, "prod.example.com")), ring=0, contains="unknown")
    malformed(with_body(story, 2, set_field(0, bytes(64))), ring=2, contains="unknown")


def test_fields_of_the_other_ring_kind_are_unknown(story: Story) -> None:
    for key, value in ((K_DEST, "kafka:x"), (K_LINK, 1), (K_EVENT, bytes(32)), (K_PEER, "p")):
        malformed(with_body(story, 0, set_field(key, value)), ring=0, contains="unknown")
    for key, value in ((K_SUBJECT, "user:x"), (K_TXN, "t"), (K_CRED_HASH, bytes(32))):
        malformed(with_body(story, 1, set_field(key, value)), ring=1, contains="unknown")


def test_an_origin_in_a_hop_position_and_a_hop_in_the_origin_position(story: Story) -> None:
    rings = wire_rings(story.encoded)
    malformed(encode_segments([rings[1], rings[2]]), ring=0)
    malformed(encode_segments([rings[0], rings[0], rings[2]]), ring=1)


@pytest.mark.parametrize("key", sorted(ORIGIN_REQUIRED))
def test_missing_origin_field(story: Story, key: int) -> None:
    malformed(with_body(story, 0, lambda b: b.pop(key)), ring=0, contains="missing")


@pytest.mark.parametrize("key", sorted(HOP_REQUIRED))
@pytest.mark.parametrize("index", [1, 2])
def test_missing_hop_field(story: Story, index: int, key: int) -> None:
    malformed(with_body(story, index, lambda b: b.pop(key)), ring=index, contains="missing")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_ring_names_its_key_by_a_key_tag_or_x5c_exactly_one(story: Story, index: int) -> None:
    malformed(with_body(story, index, lambda b: b.pop(K_KEY)), ring=index, contains="exactly one")
    both = with_body(story, index, set_field(K_X5C, [b"\x30\x00"]))
    malformed(both, ring=index, contains="exactly one")

    def swap(body: dict[int, Any]) -> None:
        body.pop(K_KEY)
        body[K_X5C] = [b"\x30\x00"]

    # x5c alone is a valid shape: its certificate is judged with the keys, later.
    chain = decode(with_body(story, index, swap))
    ring = chain.rings[index]
    assert ring.key_tag is None and ring.x5c == (b"\x30\x00",)


# -- field values ----------------------------------------------------------------

BAD_VALUES: list[tuple[int, int, Any]] = [
    (0, K_IAT, -1),
    (0, K_IAT, 2**40),
    (0, K_IAT, 2**64 - 1),
    (0, K_IAT, True),
    (0, K_IAT, None),
    (0, K_IAT, "1767225600"),
    (0, K_TTL, -1),
    (0, K_TTL, 2**40),
    (0, K_TTL, False),
    (0, K_KEY, -1),
    (0, K_KEY, 2**16),
    (0, K_KEY, True),
    (0, K_KEY, "d481"),
    (0, K_KEY, b"\xd4\x81"),
    (0, K_KEY, None),
    (1, K_IAT, -1),
    (1, K_IAT, 2**40),
    (1, K_IAT, True),
    (1, K_IAT, None),
    (2, K_TTL, -1),
    (2, K_TTL, 2**40),
    (2, K_TTL, None),
    (2, K_KEY, 2**16),
    (2, K_KEY, -(2**63)),
    (1, K_LINK, -1),
    (1, K_LINK, 2**16),
    (1, K_LINK, True),
    (1, K_LINK, b"\xc1\x5d"),
    (2, K_LINK, None),
    (0, K_SCOPE, "orders:read"),
    (0, K_SCOPE, None),
    (0, K_SCOPE, ["b", "a"]),
    (0, K_SCOPE, ["a", "a"]),
    (0, K_SCOPE, [""]),
    (0, K_SCOPE, ["x" * 257]),
    (0, K_SCOPE, [1]),
    (0, K_SCOPE, ["a\nb"]),
    (2, K_SCOPE, ["b", "a"]),
    (2, K_SCOPE, None),
    (0, K_AMR, "pwd"),
    (0, K_AMR, None),
    (0, K_AMR, [""]),
    (0, K_AMR, ["x" * 65]),
    (0, K_AMR, ["a"] * 17),
    (0, K_AMR, [1]),
    (0, K_AMR, ["o\x1bk"]),
    (0, K_ACTOR, "spiffe://Prod.example.com/ns/edge/sa/gateway"),
    (0, K_ACTOR, "spiffe://prod.example.com/ns/edge/sa/gateway/"),
    (0, K_ACTOR, "spiffe://prod.example.com"),
    (0, K_ACTOR, "spiffe://prod.example.com/"),
    (0, K_ACTOR, "https://prod.example.com/gateway"),
    (0, K_ACTOR, "spiffe://prod.example.com:443/ns/edge"),
    (0, K_ACTOR, "spiffe://prod.example.com/ns/%65dge"),
    (0, K_ACTOR, "/ns/edge/sa/gateway"),
    (0, K_ACTOR, 7),
    (2, K_ACTOR, ORDERS_ID),  # a full ID where a path belongs
    (2, K_ACTOR, "spiffe://partner.example.org/ns/shop/sa/orders"),
    (2, K_ACTOR, "ns/shop/sa/orders"),
    (2, K_ACTOR, "/"),
    (2, K_ACTOR, ""),
    (2, K_ACTOR, "/ns//sa/orders"),
    (2, K_ACTOR, "/ns/./sa/orders"),
    (2, K_ACTOR, "/ns/../sa/orders"),
    (2, K_ACTOR, "/ns/shop/sa/orders/"),
    (2, K_ACTOR, "/ns/%73hop/sa/orders"),
    (2, K_ACTOR, "/ns/sh\u00f6p"),
    (2, K_ACTOR, "/ns/shop?x=1"),
    (2, K_ACTOR, None),
    (0, K_SUBJECT, ""),
    (0, K_SUBJECT, "u" * (MAX_TEXT + 1)),
    (0, K_SUBJECT, "user:a\nDENIED"),
    (0, K_SUBJECT, "user:a\u2028x"),
    (0, K_SUBJECT, "user:a\u0085"),
    (0, K_ISSUER, 7),
    (0, K_ISSUER, "https://idp\x00"),
    (0, K_TXN, ""),
    (0, K_TXN, None),
    (0, K_TXN, 7),
    (0, K_TXN, bytes(15)),
    (0, K_TXN, bytes(17)),
    (0, K_TXN, b""),
    (0, K_TXN, UUID_TEXT),  # a canonical UUID must travel as its 16 bytes
    (0, K_ACR, ""),
    (0, K_ACR, None),
    (0, K_CRED_HASH, b"\x00" * 31),
    (0, K_CRED_HASH, b"\x00" * 33),
    (0, K_CRED_HASH, None),
    (2, K_EVENT, b"\x00" * 31),
    (2, K_EVENT, b"\x00" * 64),
    (2, K_EVENT, None),
    (2, K_DEST, ""),
    (2, K_DEST, "k" * (MAX_TEXT + 1)),
    (2, K_DEST, "kafka:orders\r\n"),
    (2, K_DEST, None),
    (2, K_CONSUMED, ""),
    (2, K_CONSUMED, 0),
    (2, K_CONSUMED, bytes(15)),
    (2, K_CONSUMED, bytes(17)),
    (2, K_CONSUMED, UUID_TEXT),
    (2, K_PEER, ""),
    (2, K_PEER, None),
    (2, K_PEER, "p\u2029"),
    (0, K_X5C, []),
    (0, K_X5C, None),
    (2, K_X5C, [b""]),
    (2, K_X5C, [b"\x30" * 4097]),
    (2, K_X5C, [b"\x30"] * 5),
    (2, K_X5C, ["MIIB"]),
    (2, K_X5C, b"\x30\x00"),
]


def _set_value(key: int, value: Any) -> Callable[[dict[int, Any]], None]:
    def change(body: dict[int, Any]) -> None:
        if key == K_X5C:
            body.pop(K_KEY, None)
        body[key] = value

    return change


@pytest.mark.parametrize(
    ("index", "key", "value"),
    BAD_VALUES,
    ids=[f"r{i}-k{k}-{str(v)[:12]}" for i, k, v in BAD_VALUES],
)
def test_field_value_out_of_its_domain(story: Story, index: int, key: int, value: Any) -> None:
    malformed(with_body(story, index, _set_value(key, value)), ring=index)


def test_a_nil_consumed_event_id_is_not_an_absent_one(story: Story) -> None:
    """Key 23 holding nil is neither a 16-byte UUID nor a string; reading it as
    "absent" gives one ring two encodings (and the reader a second opinion)."""
    malformed(with_body(story, 2, set_field(K_CONSUMED, None)), ring=2)


def test_a_hop_actor_whose_full_spiffe_id_is_over_2048_bytes_is_malformed(story: Story) -> None:
    """A path is read against the origin's trust domain: the ID it makes must
    still be a SPIFFE ID (at most 2048 bytes), not only the path alone."""
    full = len("spiffe://prod.example.com")
    path = "/" + "p" * (2049 - full - 1)
    assert len(f"spiffe://prod.example.com{path}") == 2049
    ok = "/" + "p" * (2048 - full - 1)
    assert decode(with_body(story, 2, set_field(K_ACTOR, ok))).hops[-1].actor.endswith(ok)
    malformed(with_body(story, 2, set_field(K_ACTOR, path)), ring=2)


def test_field_values_at_their_limits_decode(story: Story) -> None:
    def origin(body: dict[int, Any]) -> None:
        body[K_SUBJECT] = "u" * MAX_TEXT
        body[K_IAT] = 2**40 - 1
        body[K_TTL] = 2**40 - 1
        body[K_KEY] = 0xFFFF
        body[K_SCOPE] = [f"s{i:03d}" for i in range(MAX_SCOPE_ENTRIES)]
        body[K_AMR] = ["x" * 64] * 16

    def hop(body: dict[int, Any]) -> None:
        body[K_IAT] = 2**40 - 1
        body[K_TTL] = 0
        body[K_LINK] = 0
        body[K_KEY] = 0
        body[K_DEST] = "k" * MAX_TEXT

    text = edit_ring(edit_ring(story.encoded, 0, origin), 2, hop)
    chain = decode(text)
    assert chain.origin.subject == "u" * MAX_TEXT
    assert chain.origin.exp == 2 * (2**40 - 1)
    assert chain.origin.key_tag == 0xFFFF
    assert len(chain.origin.scope) == MAX_SCOPE_ENTRIES
    newest = chain.hops[-1]
    # iat is relative: the sum of the deltas, which may pass 2**40.
    assert newest.iat == newest.exp == 2**40 - 1 + 10 + 2**40 - 1
    assert chain.link_tags[-1] == 0 and newest.key_tag == 0


def test_scope_over_its_entry_limit(story: Story) -> None:
    too_many = [f"s{i:03d}" for i in range(MAX_SCOPE_ENTRIES + 1)]
    malformed(with_body(story, 0, set_field(K_SCOPE, too_many)), ring=0)
    chain = decode(with_body(story, 0, set_field(K_SCOPE, too_many[:MAX_SCOPE_ENTRIES])))
    assert len(chain.origin.scope) == MAX_SCOPE_ENTRIES


def test_scope_is_sorted_by_code_point(story: Story) -> None:
    ordered = ["Z", "a", "\u00e9", "\u4e2d", "\U0001f600"]  # also UTF-8 byte order
    assert decode(with_body(story, 0, set_field(K_SCOPE, ordered))).origin.scope == set(ordered)
    malformed(with_body(story, 0, set_field(K_SCOPE, ["a", "Z"])), ring=0)


def test_an_empty_scope_is_a_scope(story: Story) -> None:
    chain = decode(with_body(story, 2, set_field(K_SCOPE, [])))
    assert chain.hops[-1].scope == frozenset()


# -- ids: a canonical UUID travels as 16 bytes -------------------------------------


def test_a_uuid_transaction_id_travels_as_16_bytes() -> None:
    origin = mint_origin(EDGE, subject="u", issuer="i", credential="c", scope=S0, now=T0,
                         transaction_id=UUID_TEXT)
    chain = append_hop(EDGE, Chain(origin), event_digest=bytes(32), destination="kafka:x",
                       now=T0)
    body = body_map(chain.ring_bytes[0])
    assert body[K_TXN] == uuid.UUID(UUID_TEXT).bytes
    assert decode(chain.encode()).origin.transaction_id == UUID_TEXT
    # mint_origin's own transaction ids are random UUIDs: 16 bytes too.
    fresh = mint_origin(EDGE, subject="u", issuer="i", credential="c", scope=S0, now=T0)
    fresh_body = body_map(Chain(fresh).ring_bytes[0])
    assert fresh_body[K_TXN] == uuid.UUID(fresh.transaction_id).bytes


@pytest.mark.parametrize(
    "text",
    [
        UUID_TEXT.upper(),
        "0B9a4c7e-5f1d-4e2a-9c3b-7d6e5f4a3b2c",  # one capital letter
        UUID_TEXT.replace("-", ""),
        "{" + UUID_TEXT + "}",
        "urn:uuid:" + UUID_TEXT,
        UUID_TEXT[:-1],
        UUID_TEXT + "0",
    ],
)
def test_ids_that_are_not_canonical_uuids_travel_as_text(story: Story, text: str) -> None:
    for index, key in ((0, K_TXN), (2, K_CONSUMED)):
        chain = decode(with_body(story, index, set_field(key, text)))
        assert (chain.origin.transaction_id if index == 0 else chain.hops[-1].consumed_event_id
                ) == text
    # ...and the signer writes them as text too, so they verify.
    origin = mint_origin(EDGE, subject="u", issuer="i", credential="c", scope=S0, now=T0,
                         transaction_id=text)
    chain = append_hop(ORDERS, Chain(origin), event_digest=bytes(32), destination="kafka:x",
                       now=T0, consumed_event_id=text)
    assert body_map(chain.ring_bytes[0])[K_TXN] == text
    assert body_map(chain.ring_bytes[1])[K_CONSUMED] == text
    again = decode(chain.encode())
    assert (again.origin.transaction_id, again.hops[0].consumed_event_id) == (text, text)


@pytest.mark.parametrize("raw", [bytes(16), b"\xff" * 16, uuid.UUID(UUID_TEXT).bytes])
def test_any_16_bytes_read_as_the_canonical_uuid_text(story: Story, raw: bytes) -> None:
    for index, key in ((0, K_TXN), (2, K_CONSUMED)):
        chain = decode(with_body(story, index, set_field(key, raw)))
        ring = chain.rings[index]
        value = ring.transaction_id if index == 0 else ring.consumed_event_id  # type: ignore[union-attr]
        assert value == str(uuid.UUID(bytes=raw))
        # One id, one encoding: that text is written back as the same 16 bytes.
        assert uuid.UUID(value).bytes == raw


def test_a_uuid_consumed_event_id_travels_as_16_bytes(story: Story) -> None:
    chain = append_hop(ORDERS, story.chain, event_digest=bytes(32), destination="kafka:x",
                       now=T0 + 25, consumed_event_id=UUID_TEXT)
    assert body_map(chain.ring_bytes[-1])[K_CONSUMED] == uuid.UUID(UUID_TEXT).bytes
    assert decode(chain.encode()).hops[-1].consumed_event_id == UUID_TEXT





# -- bounds ----------------------------------------------------------------------


def test_size_bound_boundary(story: Story) -> None:
    size = len(story.encoded)
    assert decode(story.encoded, max_bytes=size) == story.chain
    rejected(lambda: decode(story.encoded, max_bytes=size - 1), R.TOO_LARGE)


def test_ring_bound_boundary(story: Story) -> None:
    assert decode(story.encoded, max_rings=3) == story.chain
    rejected(lambda: decode(story.encoded, max_rings=2), R.DEPTH_EXCEEDED)


@pytest.fixture
def b64_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ring segment the decoder base64-decodes."""
    calls: list[str] = []
    original = chain_module.b64url_decode
    monkeypatch.setattr(chain_module, "b64url_decode", lambda s: calls.append(s) or original(s))
    return calls


def test_size_and_count_are_read_before_any_ring(story: Story, b64_calls: list[str]) -> None:
    rejected(lambda: decode("=" * 20000), R.TOO_LARGE)
    rejected(lambda: decode(story.encoded + "!!", max_bytes=len(story.encoded)), R.TOO_LARGE)
    rejected(lambda: decode("2." + "A." * 40 + "A"), R.DEPTH_EXCEEDED)
    rejected(lambda: decode("1." + "." * 40), R.DEPTH_EXCEEDED)  # the count comes first
    rejected(lambda: decode(story.encoded + ".AAAA", max_rings=3), R.DEPTH_EXCEEDED)
    assert b64_calls == []
    # The size limit counts characters, whatever they are.
    rejected(lambda: decode("\u00e9" * 17, max_bytes=16), R.TOO_LARGE)
    assert b64_calls == []


def test_rings_after_a_malformed_ring_are_not_decoded(story: Story, b64_calls: list[str]) -> None:
    rings = wire_rings(story.encoded)
    malformed(encode_segments([rings[0], rings[1][:10], rings[2]]), ring=1)
    assert len(b64_calls) == 2


# -- decoding after a known prefix (what the verified-prefix cache does) ----------


def test_decode_rings_after_a_known_prefix(story: Story) -> None:
    parent = decode(Chain(story.origin, story.chain.hops[:1]).encode())
    chain = decode_rings(story.encoded, known=parent)
    assert chain == story.chain and chain.rings == story.chain.rings
    assert chain.hashes() == story.chain.hashes()
    assert decode_rings(parent.encode(), known=parent) == parent
    rings = wire_rings(story.encoded)
    bad = encode_segments([*rings[:2], rings[2][:-1]])
    rejected(lambda: decode_rings(bad, known=parent), R.MALFORMED, 2)


def test_a_known_chain_must_end_at_a_ring_boundary(story: Story, other_story: Story) -> None:
    parent = decode(Chain(story.origin, story.chain.hops[:1]).encode())
    for text in (other_story.encoded, parent.encode()[:-3], parent.encode() + "A"):
        with pytest.raises(ValueError):
            decode_rings(text, known=parent)


# -- the signer writes only what the decoder reads -------------------------------


def test_mint_origin_and_append_hop_output_decodes() -> None:
    origin = mint_origin(EDGE, subject="s", issuer="i", credential=b"c", scope=[], now=0, ttl=0,
                         transaction_id="t")
    chain = append_hop(EDGE, Chain(origin), event_digest=bytes(32), destination="d", now=0)
    again = decode(chain.encode())
    assert again.origin == origin
    assert again.origin.acr is None and again.origin.amr is None
    assert again.hops == chain.hops


@pytest.mark.parametrize(
    "ring",
    [
        {"actor": "spiffe://partner.example.org/ns/shop/sa/orders"},
        {"iat": T0 + 5},  # before the ring it follows (T0 + 10)
        {"iat": T0 + 900, "exp": T0 + 899},
        {"key_tag": None},
    ],
    ids=["foreign-actor", "iat-before-previous", "ends-before-it-starts", "no-key"],
)
def test_what_the_format_cannot_express_is_refused_when_encoding(
    story: Story, ring: dict[str, Any]
) -> None:
    import dataclasses

    hop = dataclasses.replace(story.chain.hops[1], **ring)
    with pytest.raises(ValueError):
        Chain(story.origin, (story.chain.hops[0], hop))
    with pytest.raises(ValueError):
        Chain(story.origin, story.chain.hops[:1]).next_signing_input(hop)


def test_an_origin_window_ending_before_it_starts_cannot_be_encoded(story: Story) -> None:
    import dataclasses

    with pytest.raises(ValueError):
        Chain(dataclasses.replace(story.origin, exp=story.origin.iat - 1))


def test_ring_text_cannot_carry_line_breaks_or_control_characters() -> None:
    # Red-team finding: a subject with "\n" or U+2028 forged lines in
    # `policy explain` output and split decision-log records.
    for subject in ("user:a\nDENIED", "user:a\u2028x", "user:a\x1b[31m", "user:a\u0085"):
        rejected(
            lambda subject=subject: mint_origin(EDGE, subject=subject, issuer="i", credential="t",
                                                scope=["s"], now=T0),
            R.MALFORMED,
        )


def test_a_decoded_hop_is_a_hop_ring_with_full_actor_ids(story: Story) -> None:
    for hop in decode(story.encoded).hops:
        assert isinstance(hop, HopRing)
        assert hop.actor.startswith("spiffe://prod.example.com/")
    assert make_event().id == "evt-1"
