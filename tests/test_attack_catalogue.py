"""The attack catalogue of issue 7, as one table, and the fuzzing around it.

Everything that reaches a consumer may have been written by someone with
write access to the broker. :data:`CATALOGUE` lists one row per attack:
which bullet of the issue it belongs to (:data:`BULLETS`), what it does, and
the verdict it must get, a :class:`~trusthop.errors.Reason` (with the ring
to blame, where one is), an exception a loader raises (a bad trust bundle is
refused when it is read, not per message), or ``None`` where the attack is
by design *not* a rejection because it does not change what was signed:

* a ring names no algorithm; the bundle entry its actor and key tag name
  does. An ES256 signature under an Ed25519 key tag (and the reverse) is
  ``bad_signature``; a field that would name an algorithm is an unknown
  field: ``malformed``;
* typed AMQP header values (``int``, ``bool``) and typed structured-mode
  members are signed in their canonical string form (``7``, ``true``), so
  they verify against the string form a Kafka header carries; out-of-range
  integers and other types are ``malformed``;
* ``time`` is signed normalised to UTC (``docs/wire-format.md`` section 4): an
  offset or trailing fraction zeros that name the same instant verify,
  another instant is ``event_mismatch``;
* JSON data: binary mode signs the bytes, so another key order is
  ``event_mismatch``; structured mode signs the canonical JSON of the
  value, so another key order verifies. Bridging binary to structured keeps
  the digest when the bytes were canonical JSON; otherwise the bytes must
  travel as ``data_base64``;
* a repeated header name in an AMQP header table never reaches trusthop as
  two headers (pamqp keeps one); with :mod:`trusthop.amqp.frames` installed
  it arrives with a marker and is ``malformed``.

Rows marked ``cheap`` must be refused before any key lookup
(``TrustBundle.key_for``, ``entry_of``, ``get``) and any signature check
(``PublicKey.verify``), all counted; rows with ``forbidden`` name functions
that must not run at all (the decoder refusing by length or by ring count,
its dots, before base64url and before msgpack). No row is judged by the
clock.

The field mutations are generated from the wire format's field tables
(version 2, ``trusthop.chain``), checked against them. Version 2 made some
version-1 attacks unrepresentable: a hop actor outside the chain's trust
domain (a hop carries a path), a hop that starts before its parent (its
``iat`` is an unsigned delta), a window that ends before it starts (an
unsigned ``ttl``), a key id bound to another actor (keys are found by actor
and key tag). Their rows now show that every way of writing them is refused
(``malformed``, or ``unknown_key`` for the binding), even when really
signed, and that the encoder cannot produce them. Version 2 also opened new
ground, with rows of its own: the 64-byte signature before each body, the
16-bit link and key tags (a collision passes the diagnosis, never the
signature; a bundle refuses two keys of one actor with one tag), the dots
of the text, inherited fields restated, UUIDs that must travel as bytes.

After the table: the fixes found while writing it (a routing key with
control characters, AMQP properties that do not decode, one key bound to
two actors), then property-based fuzzing of the decoders, the bindings and
the verifier (hypothesis, with its own per-example deadline), then the
atheris target of ``fuzz/`` run over its seed corpus.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import importlib.util
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import pytest
from chainkit import (
    ANY_RING,
    BROKER_PEER,
    BUNDLE,
    DEST1,
    DEST2,
    DOMAIN,
    EDGE,
    EDGE_ID,
    FOREIGN,
    FOREIGN_ID,
    ORDERS,
    ORDERS_ID,
    ORDERS_TAG_TWIN,
    PAYMENTS,
    PAYMENTS_ID,
    S2,
    T0,
    TAG_TWIN_TXN,
    FixedClock,
    build_story,
    edit_ring,
    encode_segments,
    flip,
    rejected,
    ring_parts,
    sign_ring,
    signed_ring,
    verify,
)
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pamqp import commands, header

from trusthop.admission import Admission
from trusthop.amqp import verify_delivery
from trusthop.amqp.frames import (
    H_UNDECODABLE,
    UndecodableProperties,
    guarded_unmarshal,
    install_frame_guard,
    undecodable,
)
from trusthop.amqp.messages import dead_letter_headers as amqp_dead_letter_headers
from trusthop.bindings import (
    encode_amqp,
    encode_kafka,
    encode_structured,
)
from trusthop.bundle import BundleError, BundleKey, TrustBundle, merge
from trusthop.canonical import b64url_encode, pack
from trusthop.chain import Chain, HopRing
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.kafka import dead_letter_headers as kafka_dead_letter_headers
from trusthop.kafka import verify_record
from trusthop.keys import PublicKey, SigningKey
from trusthop.pipeline import ChainVerifier, Rejection, TrustedEvent, printable
from trusthop.replay import DeliveryInfo
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
    SIGNATURE_BYTES,
)
from trusthop.sign import Identity, append_hop
from trusthop.stores.memory import MemoryReplayStore
from trusthop.verify import Limits

R = Reason

BULLETS: dict[str, str] = {
    "mutation": "Every field of every ring mutated, one at a time",
    "structure": "Rings dropped, reordered, duplicated, truncated; a ring spliced from another "
    "valid chain; two valid chains concatenated",
    "confusion": "Algorithm confusion; the same key id under two actors; an unknown critical field",
    "bounds": "Envelopes over the size limit, chains over the depth limit, scopes with thousands "
    "of entries: rejected before any signature is checked, in bounded time and memory",
    "spiffe": "SPIFFE ID tricks: upper-case trust domain, percent-encoding, '.' and '..' "
    "segments, trailing slash, userinfo or port, look-alike Unicode",
    "transport": "Transport tricks: two trustchain headers; a None or non-UTF-8 header value; "
    "structured mode with ce_ headers; CE_ or mixed-case names; control characters; "
    "integer or boolean extensions; time offsets and fractions; JSON key order",
    "msgpack": "msgpack tricks: duplicate map keys, extension types, huge integers, deep "
    "nesting, trailing bytes",
    "replay": "Replay into another topic, exchange or routing key; a valid event re-published "
    "later; a ring whose time window exceeds its parent's",
}

Expected = Reason | type[Exception] | None


@dataclass(frozen=True)
class Attack:
    """One row of the catalogue (see the module docstring)."""

    bullet: str
    name: str
    run: Callable[[], object]
    expect: Expected
    ring: object = ANY_RING
    cheap: bool = False
    forbidden: tuple[str, ...] = ()
    note: str = ""

    @property
    def id(self) -> str:
        verdict = (
            "accepted"
            if self.expect is None
            else self.expect.value
            if isinstance(self.expect, Reason)
            else self.expect.__name__
        )
        return f"{self.bullet}:{self.name}->{verdict}"


# --------------------------------------------------------------------------- #
# the material every attack starts from
# --------------------------------------------------------------------------- #

STORY = build_story()
OTHER = build_story("txn-2", subject="user:bob")
A0 = STORY.chain.origin
A1, A2 = STORY.chain.hops
R0, R1, R2 = STORY.chain.ring_bytes  # each ring as it travels: signature, then body
Q0, Q1, Q2 = OTHER.chain.ring_bytes
PREFIX = Chain(A0, (A1,))  # origin and the edge's hop: what the orders service consumed

AMQP_EXCHANGE, AMQP_KEY = "shipping", "order.reserved"
AMQP_DEST = f"amqp:{AMQP_EXCHANGE}/{AMQP_KEY}"
TOPIC2 = DEST2.removeprefix("kafka:")

# An ES256 workload, deterministic (a fixed private scalar).
_ES_KEY = SigningKey(ec.derive_private_key(0x5EED, ec.SECP256R1()))
ORDERS_ES = Identity.create(ORDERS_ID, _ES_KEY, kid="orders-es")
ES_BUNDLE = TrustBundle.of([*BUNDLE.keys.values(), ORDERS_ES.bundle_key])
assert ORDERS_ES.key_tag != ORDERS.key_tag  # one actor, two keys: two tags


def verifier(bundle: TrustBundle = BUNDLE, **kwargs: Any) -> ChainVerifier:
    """No verified-prefix cache: a cheap row must not pass because of a cache hit."""
    return ChainVerifier(bundle, clock=FixedClock(), cache_size=0, **kwargs)


def seal(
    wire: WireEvent, destination: str = DEST2, *, signer: Identity = ORDERS, **hop: Any
) -> WireEvent:
    """``wire`` with a chain whose newest ring (by ``signer``) signs it for ``destination``."""
    chain = append_hop(
        signer,
        PREFIX,
        event_digest=wire.digest(),
        destination=destination,
        now=T0 + 20,
        scope=S2,
        ttl=900,
        **hop,
    )
    return dataclasses.replace(wire, chain=chain.encode())


def e2_wire(chain: str | None = None) -> WireEvent:
    return WireEvent(dict(STORY.e2.attributes), STORY.e2.data, chain or STORY.encoded)


def kafka(headers: list[tuple[str, Any]], value: bytes | None, topic: str = TOPIC2) -> Any:
    return verify_record(verifier(), topic=topic, headers=headers, value=value)


def amqp(
    headers: Any,
    body: bytes,
    content_type: str | None,
    *,
    exchange: str = AMQP_EXCHANGE,
    routing_key: str = AMQP_KEY,
) -> TrustedEvent:
    return verify_delivery(
        verifier(),
        headers=headers,
        body=body,
        content_type=content_type,
        exchange=exchange,
        routing_key=routing_key,
    )


def rings_of(segments: list[bytes], **kwargs: Any) -> Callable[[], object]:
    """Verify the chain made of these ring bytes, in this order (structural
    attacks work on ring bytes: ``Chain(...)`` would re-encode every ring and
    recompute its link tag for the new sequence)."""
    return text(encode_segments(segments), **kwargs)


def text(encoded: str, **kwargs: Any) -> Callable[[], object]:
    return lambda: verify(encoded, story=STORY, **kwargs)


def after(chain: Chain, ring: HopRing, signer: Identity | SigningKey) -> bytes:
    """``ring`` signed by ``signer`` as the ring after ``chain``'s newest: its bytes."""
    signed = sign_ring(ring, signer, chain)
    return chain.appended(signed).ring_bytes[-1]  # type: ignore[arg-type]


# -- ring bodies as maps, and by hand for what the encoder would never write --


def _map_bytes(items: list[tuple[Any, Any]], raw_values: dict[Any, bytes] | None = None) -> bytes:
    out = bytearray(msgpack.Packer().pack_map_header(len(items)))
    for key, value in items:
        out += pack(key)
        out += (raw_values or {}).get(key, pack(value))
    return bytes(out)


def body_of(index: int) -> dict[int, Any]:
    return dict(ring_parts(STORY.encoded)[index][1])


def raw_ring(index: int, raw_values: dict[Any, bytes] | None = None, *, extra: Any = ()) -> str:
    """The story with ring ``index``'s body re-encoded by hand (some values
    given as raw msgpack, ``extra`` items added), its signature kept."""
    items = sorted([*body_of(index).items(), *extra], key=lambda kv: (str(type(kv[0])), kv[0]))
    return with_body(index, _map_bytes(items, raw_values))


def with_body(index: int, body: bytes, sig: bytes | None = None) -> str:
    """The story with ring ``index``'s body (and signature) replaced by bytes."""
    segments = list(STORY.chain.ring_bytes)
    segments[index] = (segments[index][:SIGNATURE_BYTES] if sig is None else sig) + body
    return encode_segments(segments)


def with_ring(index: int, change: Callable[[dict[Any, Any]], None]) -> str:
    """The story with ring ``index``'s body map changed, packed canonically
    again; its signature kept."""
    return edit_ring(STORY.encoded, index, change)


def signed_after(
    index: int, change: Callable[[dict[Any, Any]], None], signer: Identity | SigningKey
) -> str:
    """The story with ring ``index``'s body changed and *really signed* by
    ``signer`` after the rings before it (bodies the encoder refuses)."""
    body = body_of(index)
    change(body)
    segments = list(STORY.chain.ring_bytes)
    before = None if index == 0 else Chain(A0, STORY.chain.hops[: index - 1]).hashes()[-1]
    segments[index] = signed_ring(body, signer, before)
    return encode_segments(segments)


# --------------------------------------------------------------------------- #
# 1. every field of every ring, one at a time (the v2 tables of trusthop.chain)
# --------------------------------------------------------------------------- #

FIELD_NAMES = {
    K_ACTOR: "actor",
    K_KEY: "key",
    K_IAT: "iat",
    K_TTL: "ttl",
    K_SCOPE: "scope",
    K_X5C: "x5c",
    K_SUBJECT: "subject",
    K_ISSUER: "issuer",
    K_CRED_HASH: "cred",
    K_TXN: "txn",
    K_ACR: "acr",
    K_AMR: "amr",
    K_LINK: "link",
    K_EVENT: "event",
    K_DEST: "dest",
    K_CONSUMED: "consumed",
    K_PEER: "peer",
}
ONE_OF = {K_KEY, K_X5C}  # every ring carries exactly one of them
ORIGIN_REQUIRED = {K_ACTOR, K_IAT, K_TTL, K_SCOPE, K_SUBJECT, K_ISSUER, K_CRED_HASH, K_TXN}
ORIGIN_OPTIONAL = ONE_OF | {K_ACR, K_AMR}
HOP_REQUIRED = {K_ACTOR, K_IAT, K_LINK, K_EVENT, K_DEST}
HOP_OPTIONAL = ONE_OF | {K_TTL, K_SCOPE, K_CONSUMED, K_PEER}
# Another actor of the same trust domain, for each ring: full ID in the
# origin, a path in a hop. v2 names a key by (actor, key tag), so the ring's
# tag names no key of that actor: unknown_key (v1's "key id bound to another
# actor" is no longer expressible).
OTHER_ACTOR = {0: ORDERS_ID, 1: "/ns/shop/sa/orders", 2: "/ns/pay/sa/payments"}
ADDED = {
    K_X5C: [b"\x30\x00"],
    K_ACR: "mfa",
    K_AMR: ["pwd"],
    K_CONSUMED: "evt-0",
    K_PEER: BROKER_PEER,
}


def _changed(index: int, key: int, value: Any) -> tuple[Any, Reason]:
    """A type-preserving change of one wire value and the reason it must get."""
    if key == K_ACTOR:
        return OTHER_ACTOR[index], R.UNKNOWN_KEY
    if key == K_KEY:
        return value ^ 1, R.UNKNOWN_KEY  # the actor has no key with that tag
    if key == K_LINK:
        # The signature (over the previous ring's whole hash) fails, and the
        # tag no longer names the previous ring: diagnosed as a broken link.
        return value ^ 1, R.BROKEN_LINK
    if isinstance(value, bool):  # pragma: no cover - no boolean field exists
        raise AssertionError(key)
    if isinstance(value, int):
        return value + 1, R.BAD_SIGNATURE
    if isinstance(value, bytes):
        return flip(value, len(value) // 2), R.BAD_SIGNATURE
    if isinstance(value, str):
        return value + "x", R.BAD_SIGNATURE
    if isinstance(value, list):
        return value[1:], R.BAD_SIGNATURE
    raise AssertionError(f"unexpected wire type {type(value)}")


def _retyped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, int):
        return str(value)
    return "not-a-list"


def _field_attacks() -> Iterator[Attack]:
    for index in range(3):
        ring = body_of(index)
        required, optional = (
            (ORIGIN_REQUIRED, ORIGIN_OPTIONAL) if index == 0 else (HOP_REQUIRED, HOP_OPTIONAL)
        )
        # The signature is the first 64 bytes of a ring, not a field of its body.
        sig, body = STORY.chain.ring_bytes[index][:64], STORY.chain.ring_bytes[index][64:]
        yield Attack(
            "mutation",
            f"ring{index}.sig changed",
            text(with_body(index, body, flip(sig, 7))),
            R.BAD_SIGNATURE,
            index,
        )
        yield Attack(
            "mutation",
            f"ring{index}.sig removed",
            text(with_body(index, body, b"")),
            R.MALFORMED,
            index,
            cheap=True,
        )
        yield Attack(
            "mutation",
            f"ring{index}.sig truncated",
            text(with_body(index, body, sig[:63])),
            R.MALFORMED,
            index,
            cheap=True,
        )
        for key in sorted(required | optional):
            name = f"ring{index}.{FIELD_NAMES[key]}"
            if key not in ring:
                # x5c beside a key tag: a ring names its key one way only.
                reason, cheap = (R.MALFORMED, True) if key == K_X5C else (R.BAD_SIGNATURE, False)
                added = with_ring(index, lambda m, k=key: m.__setitem__(k, ADDED[k]))
                yield Attack("mutation", f"{name} added", text(added), reason, index, cheap=cheap)
                if key == K_X5C:
                    instead = with_ring(
                        index, lambda m: (m.pop(K_KEY), m.__setitem__(K_X5C, ADDED[K_X5C]))
                    )
                    yield Attack(
                        "mutation",
                        f"{name} instead of the key tag",
                        text(instead),
                        R.BAD_CERTIFICATE,
                        index,
                        note="the key is then the certificate's: it does not parse",
                    )
                continue
            new, reason = _changed(index, key, ring[key])
            changed = with_ring(index, lambda m, k=key, v=new: m.__setitem__(k, v))
            yield Attack("mutation", f"{name} changed", text(changed), reason, index)
            removed = with_ring(index, lambda m, k=key: m.pop(k))
            if key in required or key in ONE_OF:
                yield Attack(
                    "mutation", f"{name} removed", text(removed), R.MALFORMED, index, cheap=True
                )
            else:
                # An optional hop field that is absent is inherited (ttl,
                # scope): another meaning, and another body, under the signature.
                yield Attack("mutation", f"{name} removed", text(removed), R.BAD_SIGNATURE, index)
            retyped = with_ring(index, lambda m, k=key: m.__setitem__(k, _retyped(m[k])))
            yield Attack(
                "mutation", f"{name} retyped", text(retyped), R.MALFORMED, index, cheap=True
            )
    # v2 writes what a hop inherits (its end of validity, its scope) only
    # when it changes: restating it is another body, so another signature.
    inheriting = append_hop(
        ORDERS, PREFIX, event_digest=STORY.digest, destination=DEST2, now=T0 + 20
    )
    assert K_TTL not in ring_parts(inheriting.encode())[2][1]
    assert K_SCOPE not in ring_parts(inheriting.encode())[2][1]
    yield Attack("mutation", "ring2.ttl inherited (control)", text(inheriting.encode()), None)
    for key, value in ((K_TTL, A1.exp - (T0 + 20)), (K_SCOPE, sorted(A1.scope))):
        restated = edit_ring(inheriting.encode(), 2, lambda m, k=key, v=value: m.__setitem__(k, v))
        yield Attack(
            "mutation",
            f"ring2.{FIELD_NAMES[key]} restated with the inherited value",
            text(restated),
            R.BAD_SIGNATURE,
            2,
        )


# --------------------------------------------------------------------------- #
# 2. rings dropped, reordered, duplicated, truncated, spliced, concatenated
# --------------------------------------------------------------------------- #


def _structure_attacks() -> Iterator[Attack]:
    rows: list[tuple[str, list[bytes], Reason, object]] = [
        ("origin dropped", [R1, R2], R.MALFORMED, 0),
        ("middle ring dropped", [R0, R2], R.BROKEN_LINK, 1),
        ("newest ring dropped", [R0, R1], R.EVENT_MISMATCH, 1),
        ("only the origin left", [R0], R.MALFORMED, ANY_RING),
        ("hops reordered", [R0, R2, R1], R.BROKEN_LINK, 1),
        ("origin after a hop", [R1, R0, R2], R.MALFORMED, 0),
        ("origin duplicated", [R0, R0, R1, R2], R.MALFORMED, 1),
        ("middle ring duplicated", [R0, R1, R1, R2], R.BROKEN_LINK, 2),
        ("newest ring duplicated", [R0, R1, R2, R2], R.BROKEN_LINK, 3),
        ("middle ring spliced from another valid chain", [R0, Q1, R2], R.BROKEN_LINK, 1),
        ("newest ring spliced from another valid chain", [R0, R1, Q2], R.BROKEN_LINK, 2),
        ("origin spliced from another valid chain (other subject)", [Q0, R1, R2], R.BROKEN_LINK, 1),
        ("two valid chains concatenated in one text", [R0, R1, R2, Q0, Q1, Q2], R.MALFORMED, 3),
        ("a chain extended with another chain's hops", [R0, R1, R2, Q1, Q2], R.BROKEN_LINK, 3),
    ]
    for name, segments, reason, ring in rows:
        cheap = reason is R.MALFORMED
        yield Attack("structure", name, rings_of(segments), reason, ring, cheap=cheap)
    # The link tag is 16 bits: a forged predecessor whose hash shares them
    # (found by search) passes the diagnosis, never the signature.
    twin = build_story(TAG_TWIN_TXN, subject="user:bob")
    assert twin.chain.link_tags[1] == STORY.chain.link_tags[1]
    yield Attack(
        "structure",
        "origin spliced from a chain whose origin hash shares the link tag",
        rings_of([twin.chain.ring_bytes[0], R1, R2]),
        R.BAD_SIGNATURE,
        1,
        note="the tag only tells a removed ring from an edited one; the signature covers the hash",
    )
    yield Attack(
        "structure",
        "a ring really signed after its parent, its link tag naming another",
        text(signed_after(2, lambda m: m.__setitem__(K_LINK, m[K_LINK] ^ 1), ORDERS)),
        R.BROKEN_LINK,
        2,
        note="the signature holds; the link check after it refuses the signed tag",
    )
    encoded = STORY.encoded
    dots = [i for i, c in enumerate(encoded) if c == "."]
    for cut in (1, 2, 40, len(encoded) // 2, len(encoded) - 2, len(encoded) - 1, dots[1] + 1):
        yield Attack(
            "structure",
            f"text truncated to {cut} characters",
            text(encoded[:cut]),
            R.MALFORMED,
            cheap=True,
        )
    yield Attack(
        "structure",
        "text truncated at the last dot (the parent chain, valid)",
        text(encoded[: dots[-1]]),
        R.EVENT_MISMATCH,
        1,
    )
    for cut in (1, 63, 64, 65, len(R2) // 2, len(R2) - 1):
        yield Attack(
            "structure",
            f"newest ring's bytes truncated to {cut}",
            rings_of([R0, R1, R2[:cut]]),
            R.MALFORMED,
            2,
            cheap=True,
        )
    yield Attack(
        "structure",
        "two chains' texts concatenated",
        text(encoded + OTHER.encoded),
        R.MALFORMED,
        cheap=True,
    )
    yield Attack(
        "structure",
        "two chains' texts joined by a dot",
        text(encoded + "." + OTHER.encoded),
        R.MALFORMED,
        3,
        cheap=True,
    )
    for name, bad in (
        ("an empty ring between two dots", encoded.replace(".", "..", 2).replace("..", ".", 1)),
        ("a trailing dot", encoded + "."),
        ("a leading dot after the version", "2.." + encoded[2:]),
    ):
        yield Attack("structure", name, text(bad), R.MALFORMED, cheap=True)


# --------------------------------------------------------------------------- #
# 3. algorithm confusion, one key under two actors, unknown critical fields
# --------------------------------------------------------------------------- #


def _resigned(ring: HopRing, key: SigningKey) -> list[bytes]:
    return [R0, R1, after(PREFIX, ring, key)]


def _es_story() -> list[bytes]:
    """The story with its newest ring signed by the ES256 key of the orders actor."""
    return _resigned(dataclasses.replace(A2, key_tag=ORDERS_ES.key_tag), ORDERS_ES.key)


def _bundle_doc(*entries: tuple[str, str, PublicKey]) -> dict[str, Any]:
    return {
        "keys": [
            key.to_jwk() | {"kid": kid, "use": "sig", "spiffe_id": actor}
            for kid, actor, key in entries
        ]
    }


def _confusion_attacks() -> Iterator[Attack]:
    es = _es_story()
    yield Attack(
        "confusion",
        "control: an ES256 ring under its ES256 key tag",
        rings_of(es, bundle=ES_BUNDLE),
        None,
    )
    yield Attack(
        "confusion",
        "ES256 signature under an Ed25519 key tag",
        rings_of(_resigned(A2, ORDERS_ES.key)),
        R.BAD_SIGNATURE,
        2,
        note="rings carry no algorithm: the bundle entry the key tag names decides (Ed25519)",
    )
    ed_under_es = _resigned(dataclasses.replace(A2, key_tag=ORDERS_ES.key_tag), ORDERS.key)
    yield Attack(
        "confusion",
        "Ed25519 signature under an ES256 key tag",
        rings_of(ed_under_es, bundle=ES_BUNDLE),
        R.BAD_SIGNATURE,
        2,
    )
    sig = es[2][:SIGNATURE_BYTES]
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    high_s = sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    yield Attack(
        "confusion",
        "ES256 signature malleated to high s",
        rings_of([R0, R1, high_s + es[2][SIGNATURE_BYTES:]], bundle=ES_BUNDLE),
        R.BAD_SIGNATURE,
        2,
    )
    for key, value in ((7, "ES256"), (7, "EdDSA"), ("alg", "none"), ("alg", "EdDSA")):
        yield Attack(
            "confusion",
            f"an alg-like field {key!r}: {value!r}",
            text(raw_ring(2, extra=[(key, value)])),
            R.MALFORMED,
            2,
            cheap=True,
            note="every field is critical in wire version 2: an unknown one is malformed",
        )
    for index, key in (
        (0, 20),
        (0, 7),
        (0, 14),
        (0, 0),
        (1, 10),
        (1, 14),
        (2, 25),
        (2, 99),
        (2, -1),
        (2, 0x10000),
    ):
        yield Attack(
            "confusion",
            f"unknown critical field {key} in ring {index}",
            text(with_ring(index, lambda m, k=key: m.__setitem__(k, "x"))),
            R.MALFORMED,
            index,
            cheap=True,
            note="14 and 0 were v1's trust domain and signature fields" if key in (0, 14) else "",
        )
    ed = ORDERS.key.public_key
    yield Attack(
        "confusion",
        "a JWK whose alg names another algorithm than its key",
        lambda: TrustBundle.from_document(
            {"keys": [ed.to_jwk() | {"kid": "k", "alg": "ES256", "spiffe_id": ORDERS_ID}]}
        ),
        BundleError,
    )
    yield Attack(
        "confusion",
        "one key id under two actors in one bundle",
        lambda: TrustBundle.from_document(
            _bundle_doc(("k", ORDERS_ID, ed), ("k", PAYMENTS_ID, PAYMENTS.key.public_key))
        ),
        BundleError,
    )
    yield Attack(
        "confusion",
        "one key id under two actors of two trust domains (bundle map)",
        lambda: TrustBundle.from_document(
            {
                "prod.example.com": _bundle_doc(("k", ORDERS_ID, ed)),
                "partner.example.org": _bundle_doc(
                    ("k", "spiffe://partner.example.org/ns/x/sa/y", PAYMENTS.key.public_key)
                ),
            }
        ),
        BundleError,
    )
    yield Attack(
        "confusion",
        "one key id under two actors across merged bundles",
        lambda: merge(
            [
                TrustBundle.of([BundleKey("k", ORDERS_ID, ed)]),
                TrustBundle.of([BundleKey("k", PAYMENTS_ID, PAYMENTS.key.public_key)]),
            ]
        ),
        BundleError,
    )
    yield Attack(
        "confusion",
        "one public key under two key ids bound to two actors",
        lambda: TrustBundle.of([BundleKey("a", ORDERS_ID, ed), BundleKey("b", PAYMENTS_ID, ed)]),
        BundleError,
        note="fixed with this catalogue: the holder of such a key could sign as either",
    )
    # v2: rings name a key by (actor, 16-bit key tag); a bundle must make that unique.
    assert ORDERS_TAG_TWIN.public_key.key_tag == ORDERS.key_tag
    twin = BundleKey("orders-twin", ORDERS_ID, ORDERS_TAG_TWIN.public_key)
    yield Attack(
        "confusion",
        "two keys of one actor sharing a key tag in one bundle",
        lambda: TrustBundle.of([*BUNDLE.keys.values(), twin]),
        BundleError,
        note="the tag would not say which key signed",
    )
    yield Attack(
        "confusion",
        "two keys of one actor sharing a key tag across merged bundles",
        lambda: merge([BUNDLE, TrustBundle.of([twin])]),
        BundleError,
    )
    yield Attack(
        "confusion",
        "the orders key also listed under a revoked id",
        rings_of(
            [R0, R1, R2],
            bundle=TrustBundle.of(
                [*BUNDLE.keys.values(), BundleKey("orders-old", ORDERS_ID, ed, revoked=True)]
            ),
        ),
        R.REVOKED,
        2,
        note="one key under two ids of one actor: the stricter entry counts",
    )
    yield Attack(
        "confusion",
        "a ring naming actor B under actor A's key tag",
        text(with_ring(2, lambda m: m.__setitem__(K_ACTOR, "/ns/pay/sa/payments"))),
        R.UNKNOWN_KEY,
        2,
        note="v1 said unauthorized_actor (a key id bound to another actor); v2 looks the key "
        "up by (actor, tag), and B has no key with A's tag",
    )
    yield Attack(
        "confusion",
        "actor B's name, signed with actor A's real key under A's key tag",
        rings_of(_resigned(dataclasses.replace(A2, actor=PAYMENTS_ID), ORDERS.key)),
        R.UNKNOWN_KEY,
        2,
    )
    yield Attack(
        "confusion",
        "actor B's name and key tag, signed with actor A's real key",
        rings_of(
            _resigned(
                dataclasses.replace(A2, actor=PAYMENTS_ID, key_tag=PAYMENTS.key_tag), ORDERS.key
            )
        ),
        R.BAD_SIGNATURE,
        2,
    )
    yield Attack(
        "confusion",
        "a key sharing A's key tag signs as A",
        rings_of(_resigned(A2, ORDERS_TAG_TWIN)),
        R.BAD_SIGNATURE,
        2,
        note="the tag selects the bundled key; the signature must verify under it",
    )


# --------------------------------------------------------------------------- #
# 4. bounds: before any signature, in bounded time and memory
# --------------------------------------------------------------------------- #

NOT_DECODED = ("trusthop.chain.b64url_decode", "trusthop.rings._unpackb")
NOT_UNPACKED = ("trusthop.rings._unpackb",)


def _long_chain(rings: int) -> Chain:
    chain = STORY.chain
    signers = [PAYMENTS, ORDERS]
    for n in range(rings - 3):
        chain = append_hop(
            signers[n % 2], chain, event_digest=STORY.digest, destination=DEST2, now=T0 + 25
        )
    return chain


def _wide_scope(entries: int) -> str:
    """The story with ring 2's scope made ``entries`` long (sorted, unique, two
    characters each, so that thousands fit in the byte budget)."""
    pairs = sorted(chr(a) + chr(b) for a in range(33, 127) for b in range(33, 127))
    scope = pairs[:entries]
    return with_ring(2, lambda m: m.__setitem__(K_SCOPE, scope))


def _bounds_attacks() -> Iterator[Attack]:
    size = len(STORY.encoded)
    yield Attack(
        "bounds",
        "chain one character over the byte budget",
        text(STORY.encoded, limits=Limits(max_bytes=size - 1)),
        R.TOO_LARGE,
        cheap=True,
        forbidden=NOT_DECODED,
    )
    yield Attack(
        "bounds",
        "a 10 MiB chain attribute",
        text("A" * (10 << 20)),
        R.TOO_LARGE,
        cheap=True,
        forbidden=NOT_DECODED,
    )
    # v2 counts rings by their dots, before decoding anything (v1 read a
    # msgpack array header for it).
    for name, dotted, limits in (
        ("33 empty rings", "2" + "." * 33, Limits()),
        ("100000 one-character rings", "2" + ".A" * 100_000, Limits(max_bytes=1 << 20)),
        ("dots and no version", "." * 40, Limits()),
        ("a v1-looking text with 33 dots", "lAGF" + ".x" * 33, Limits()),
    ):
        yield Attack(
            "bounds",
            f"ring count over the limit: {name}",
            text(dotted, limits=limits),
            R.DEPTH_EXCEEDED,
            cheap=True,
            forbidden=NOT_DECODED,
            note="the ring count is checked before the version",
        )
    long = _long_chain(6)
    yield Attack(
        "bounds",
        "a validly signed chain one ring over the limit",
        text(long.encode(), limits=Limits(max_rings=5)),
        R.DEPTH_EXCEEDED,
        cheap=True,
        forbidden=NOT_DECODED,
    )
    huge_ring = encode_segments([b"\x00" * (MAX_RING_BYTES + 100), R1, R2])
    yield Attack(
        "bounds",
        f"a ring over {MAX_RING_BYTES} bytes",
        text(huge_ring, limits=Limits(max_bytes=1 << 20)),
        R.MALFORMED,
        0,
        cheap=True,
        forbidden=NOT_DECODED,
        note="refused by its text's length before base64url",
    )
    wide = _wide_scope(3000)
    assert len(wide) < Limits().max_bytes  # within the byte budget: the entry limit must catch it
    yield Attack(
        "bounds",
        "a scope of 3000 entries",
        text(wide),
        R.MALFORMED,
        2,
        cheap=True,
        note="the ring's byte bound bounds what msgpack builds; the count is read first",
    )
    yield Attack(
        "bounds",
        "a scope of 3000 entries, with a ring limit of 10000",
        text(wide, limits=Limits(max_rings=10_000)),
        R.MALFORMED,
        2,
        cheap=True,
    )
    yield Attack(
        "bounds",
        "a scope of 65 entries (one over)",
        text(_wide_scope(65)),
        R.MALFORMED,
        2,
        cheap=True,
    )
    for prefix in (b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"):
        yield Attack(
            "bounds",
            f"a length prefix of 4 GiB ({prefix[:1].hex()}) inside a ring",
            text(raw_ring(0, {K_ACR: prefix + b"\x00" * 16})),
            R.MALFORMED,
            0,
            cheap=True,
        )
    headers, value = encode_kafka(e2_wire("A" * 20_000))
    yield Attack(
        "bounds",
        "a Kafka record whose ce_trustchain is over the budget",
        lambda: kafka(headers, value),
        R.TOO_LARGE,
        cheap=True,
        forbidden=NOT_DECODED,
    )
    huge = (
        b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"'
        + b"x" * (1 << 20)
        + b'"}'
    )
    yield Attack(
        "bounds",
        "a structured envelope over 1 MiB",
        lambda: kafka([("content-type", b"application/cloudevents+json")], huge),
        R.MALFORMED,
        cheap=True,
        forbidden=("trusthop.bindings.structured.json.loads",),
        note="refused by length before the JSON parser runs",
    )


# --------------------------------------------------------------------------- #
# 5. SPIFFE ID tricks, in a ring and in a bundle
# --------------------------------------------------------------------------- #

SPIFFE_TRICKS = {
    "upper-case trust domain": "spiffe://PROD.example.com/ns/shop/sa/orders",
    "upper-case scheme": "SPIFFE://prod.example.com/ns/shop/sa/orders",
    "percent-encoding": "spiffe://prod.example.com/ns/shop/sa/%6Frders",
    "percent-encoded slash": "spiffe://prod.example.com/ns%2Fshop/sa/orders",
    "dot segment": "spiffe://prod.example.com/ns/./shop/sa/orders",
    "dot-dot segment": "spiffe://prod.example.com/ns/edge/../shop/sa/orders",
    "trailing slash": "spiffe://prod.example.com/ns/shop/sa/orders/",
    "empty segment": "spiffe://prod.example.com/ns//shop/sa/orders",
    "userinfo": "spiffe://orders@prod.example.com/ns/shop/sa/orders",
    "port": "spiffe://prod.example.com:443/ns/shop/sa/orders",
    "look-alike Unicode (Cyrillic o)": "spiffe://pr\u043ed.example.com/ns/shop/sa/orders",
    "look-alike Unicode in the path": "spiffe://prod.example.com/ns/sh\u043ep/sa/orders",
    "full-width solidus": "spiffe://prod.example.com/ns\uff0fshop/sa/orders",
    "query": "spiffe://prod.example.com/ns/shop/sa/orders?admin=1",
    "fragment": "spiffe://prod.example.com/ns/shop/sa/orders#x",
    "space": "spiffe://prod.example.com/ns/shop/sa/orders x",
    "backslash": "spiffe://prod.example.com\\ns\\shop",
}
OUR_DOMAIN = f"spiffe://{DOMAIN}"


def _as_path(trick: str) -> str:
    """What a hop's actor field would carry: the path, or the whole trick
    when the trick is in the trust domain part."""
    return trick[len(OUR_DOMAIN) :] if trick.startswith(OUR_DOMAIN + "/") else trick


def _spiffe_attacks() -> Iterator[Attack]:
    for name, trick in SPIFFE_TRICKS.items():
        path = _as_path(trick)
        yield Attack(
            "spiffe",
            f"origin actor: {name}",
            text(with_ring(0, lambda m, t=trick: m.__setitem__(K_ACTOR, t))),
            R.MALFORMED,
            0,
            cheap=True,
        )
        yield Attack(
            "spiffe",
            f"hop actor: {name}",
            text(with_ring(2, lambda m, t=path: m.__setitem__(K_ACTOR, t))),
            R.MALFORMED,
            2,
            cheap=True,
        )
        yield Attack(
            "spiffe",
            f"bundle entry: {name}",
            lambda t=trick: TrustBundle.from_document(
                _bundle_doc(("k", t, PAYMENTS.key.public_key))
            ),
            BundleError,
        )
    # v2: a hop's actor is a path in the origin's trust domain; an actor
    # outside it cannot be written. Each way of trying is malformed.
    for name, actor in (
        ("a full SPIFFE ID of the chain's domain", ORDERS_ID),
        ("a full SPIFFE ID of another domain", FOREIGN_ID),
        ("a path that starts a new authority", "//partner.example.org/ns/shop/sa/orders"),
        ("a path without its leading slash", "ns/shop/sa/orders"),
        ("the root path", "/"),
        ("an empty path", ""),
        ("a path with a trust domain in front", "partner.example.org/ns/shop/sa/orders"),
    ):
        yield Attack(
            "spiffe",
            f"hop actor outside the trust domain: {name}",
            text(with_ring(2, lambda m, a=actor: m.__setitem__(K_ACTOR, a))),
            R.MALFORMED,
            2,
            cheap=True,
            note="v1's foreign hop actor is unrepresentable in v2 (paths only)",
        )
    yield Attack(
        "spiffe",
        "the signer refuses a hop outside the chain's trust domain",
        lambda: append_hop(
            FOREIGN, PREFIX, event_digest=STORY.digest, destination=DEST2, now=T0 + 20
        ),
        R.UNAUTHORIZED_ACTOR,
    )
    yield Attack(
        "spiffe",
        "the encoder cannot write a hop outside the chain's trust domain",
        lambda: Chain(A0, (dataclasses.replace(A1, actor=FOREIGN_ID),)),
        ValueError,
    )
    for name, domain in {
        "upper case": "PROD.example.com",
        "a port": "prod.example.com:443",
        "the scheme": "spiffe://prod.example.com",
        "look-alike Unicode": "pr\u043ed.example.com",
        "a bidirectional override": "moc.elpmaxe.dorp\u202e",
        "userinfo": "edge@prod.example.com",
    }.items():
        yield Attack(
            "spiffe",
            f"origin trust domain with {name}",
            text(
                with_ring(
                    0,
                    lambda m, d=domain: m.__setitem__(K_ACTOR, f"spiffe://{d}/ns/edge/sa/gateway"),
                )
            ),
            R.MALFORMED,
            0,
            cheap=True,
            note="v2 has no trust-domain field: the chain's is the origin actor's, "
            "refused by the SPIFFE ID rules before any key lookup",
        )
    yield Attack(
        "spiffe",
        "revocation list: upper-case trust domain",
        lambda: TrustBundle.from_document(
            _bundle_doc(("k", ORDERS_ID, ORDERS.key.public_key))
            | {"revoked_actors": [SPIFFE_TRICKS["upper-case trust domain"]]}
        ),
        BundleError,
    )


# --------------------------------------------------------------------------- #
# 6. transport tricks: Kafka headers, AMQP header tables, structured mode
# --------------------------------------------------------------------------- #

K_HEADERS, _value = encode_kafka(e2_wire())
K_STRUCTURED_HEADERS, _structured_value = encode_kafka(e2_wire(), structured=True)
assert _value is not None and _structured_value is not None
K_VALUE: bytes = _value
K_STRUCTURED: bytes = _structured_value
A_WIRE = seal(WireEvent(dict(STORY.e2.attributes), STORY.e2.data), AMQP_DEST)
A_HEADERS, A_BODY, A_CTYPE = encode_amqp(A_WIRE)
A_STRUCTURED = encode_structured(A_WIRE)
STRUCTURED = "application/cloudevents+json"


def _replaced(name: str, value: Any) -> list[tuple[str, Any]]:
    return [(k, value if k == name else v) for k, v in K_HEADERS]


def _renamed(old: str, new: str) -> list[tuple[str, Any]]:
    return [(new if k == old else k, v) for k, v in K_HEADERS]


# -- AMQP content headers as bytes, decoded by pamqp (with trusthop's guard) --

F_CONTENT_TYPE, F_HEADERS, F_TIMESTAMP = 0x8000, 0x2000, 0x0040


def _shortstr(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _longstr(raw: bytes) -> bytes:
    return b"S" + struct.pack(">I", len(raw)) + raw


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_shortstr(name) + value for name, value in entries)
    return struct.pack(">I", len(body)) + body


def _a_entries(headers: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), _longstr(v.encode())) for k, v in (headers or A_HEADERS).items()]


def content_header(
    entries: list[tuple[bytes, bytes]] | None,
    content_type: bytes | None = b"application/json",
    *,
    timestamp: bytes | None = None,
    body_size: int = len(A_BODY),
) -> bytes:
    flags, payload = 0, b""
    if content_type is not None:
        flags |= F_CONTENT_TYPE
        payload += _shortstr(content_type)
    if entries is not None:
        flags |= F_HEADERS
        payload += _table(entries)
    if timestamp is not None:
        flags |= F_TIMESTAMP
        payload += timestamp
    return struct.pack(">HHQH", 60, 0, body_size, flags) + payload


def received(frame_payload: bytes) -> Any:
    """What aiormq hands aio-pika for this content header (trusthop's guard installed)."""
    install_frame_guard()
    decoded = header.ContentHeader()
    decoded.unmarshal(frame_payload)
    return decoded


def amqp_frame(frame_payload: bytes, body: bytes = A_BODY) -> Callable[[], object]:
    def run() -> object:
        properties = received(frame_payload).properties
        return amqp(properties.headers, body, properties.content_type)

    return run


# -- events with typed extensions, a time offset, non-canonical JSON bytes -----

TYPED = seal(
    WireEvent(
        {**STORY.e2.attributes, "count": "7", "flag": "true", "time": "2026-01-01T00:00:10Z"},
        STORY.e2.data,
    )
)
T_HEADERS, T_VALUE = encode_kafka(TYPED)
TYPED_AMQP = seal(WireEvent(dict(TYPED.attributes), TYPED.data), AMQP_DEST)
TA_HEADERS, TA_BODY, TA_CTYPE = encode_amqp(TYPED_AMQP)
NON_CANONICAL = b'{"order": 42, "amount": 999}'
RAW_JSON = seal(WireEvent(dict(STORY.e2.attributes), NON_CANONICAL))
RJ_HEADERS, RJ_VALUE = encode_kafka(RAW_JSON)


def _typed_kafka(name: str, value: bytes) -> Callable[[], object]:
    headers = [(k, value if k == f"ce_{name}" else v) for k, v in T_HEADERS]
    return lambda: kafka(headers, T_VALUE)


def _typed_amqp(name: str, value: Any) -> Callable[[], object]:
    headers = {**TA_HEADERS, f"cloudEvents_{name}": value}
    return lambda: amqp(headers, TA_BODY, TA_CTYPE)


def _document(wire: WireEvent, **changes: Any) -> bytes:
    document = json.loads(encode_structured(wire))
    for name, value in changes.items():
        if value is None:
            document.pop(name, None)
        else:
            document[name] = value
    return json.dumps(document).encode()


def _structured(body: bytes) -> Callable[[], object]:
    return lambda: kafka([("content-type", STRUCTURED.encode())], body)


def _transport_attacks() -> Iterator[Attack]:
    t: list[Attack] = []

    def add(name: str, run: Callable[[], object], expect: Expected, **kw: Any) -> None:
        t.append(Attack("transport", name, run, expect, **kw))

    add("control: Kafka binary", lambda: kafka(K_HEADERS, K_VALUE), None)
    add("control: Kafka structured", lambda: kafka(K_STRUCTURED_HEADERS, K_STRUCTURED), None)
    add("control: AMQP binary", lambda: amqp(A_HEADERS, A_BODY, A_CTYPE), None)
    add("control: AMQP structured", lambda: amqp({}, A_STRUCTURED, STRUCTURED), None)
    add(
        "control: AMQP binary through pamqp and the frame guard",
        amqp_frame(content_header(_a_entries())),
        None,
    )
    chain = dict(K_HEADERS)["ce_trustchain"]
    add(
        "Kafka: two ce_trustchain headers, same value",
        lambda: kafka([*K_HEADERS, ("ce_trustchain", chain)], K_VALUE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "Kafka: two ce_trustchain headers, another chain second",
        lambda: kafka([*K_HEADERS, ("ce_trustchain", OTHER.encoded.encode())], K_VALUE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "Kafka: a forged chain first, the real one second",
        lambda: kafka([("ce_trustchain", OTHER.encoded.encode()), *K_HEADERS], K_VALUE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: trustchain under both prefixes",
        lambda: amqp({**A_HEADERS, "cloudEvents:trustchain": OTHER.encoded}, A_BODY, A_CTYPE),
        R.MALFORMED,
        cheap=True,
    )
    a_chain = A_HEADERS["cloudEvents_trustchain"].encode()
    add(
        "AMQP: a header table naming cloudEvents_trustchain twice",
        amqp_frame(content_header([*_a_entries(), (b"cloudEvents_trustchain", _longstr(a_chain))])),
        R.MALFORMED,
        cheap=True,
        note="pamqp would keep the last; trusthop's frame guard marks the message",
    )
    add(
        "AMQP: a header table naming cloudEvents_type twice",
        amqp_frame(content_header([(b"cloudEvents_type", _longstr(b"evil")), *_a_entries()])),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "structured: trustchain member twice",
        _structured(K_STRUCTURED.replace(b'"trustchain":', b'"trustchain":"x","trustchain":', 1)),
        R.MALFORMED,
        cheap=True,
    )
    for name in ("ce_trustchain", "ce_id", "content-type"):
        add(
            f"Kafka: None value of {name}",
            lambda n=name: kafka(_replaced(n, None), K_VALUE),
            R.MALFORMED,
            cheap=True,
        )
    for name, value in (
        ("ce_trustchain", b"\xff" + chain),
        ("ce_subject", b"order-\xc3\x28"),
        ("ce_type", b"\xed\xa0\x80"),
    ):
        add(
            f"Kafka: non-UTF-8 value of {name}",
            lambda n=name, v=value: kafka(_replaced(n, v), K_VALUE),
            R.MALFORMED,
            cheap=True,
        )
    add(
        "Kafka: a str header value where aiokafka gives bytes",
        lambda: kafka(_replaced("ce_id", "txn-1-e2"), K_VALUE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: None value",
        lambda: amqp({**A_HEADERS, "cloudEvents_subject": None}, A_BODY, A_CTYPE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: non-UTF-8 long string (pamqp gives bytes)",
        lambda: amqp({**A_HEADERS, "cloudEvents_subject": b"\xff"}, A_BODY, A_CTYPE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: non-UTF-8 header value in a real frame",
        amqp_frame(content_header([*_a_entries(), (b"cloudEvents_x", _longstr(b"\xff\xfe"))])),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: non-UTF-8 header name in a real frame",
        amqp_frame(content_header([*_a_entries(), (b"x-\xff\xfe", _longstr(b"v"))])),
        R.MALFORMED,
        cheap=True,
        note="without the guard pamqp raises and aiormq closes the connection (a stalled queue)",
    )
    add(
        "AMQP: non-UTF-8 content_type in a real frame",
        amqp_frame(content_header(_a_entries(), b"application/\xffjson")),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: a header value of an unknown field type",
        amqp_frame(content_header([*_a_entries(), (b"x-odd", b"Z\x00")])),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: a timestamp property out of range",
        amqp_frame(content_header(_a_entries(), timestamp=b"\xff" * 8)),
        R.MALFORMED,
        cheap=True,
    )
    for typed in (1.5, Decimal("1.5"), dt.datetime(2026, 1, 1, tzinfo=dt.UTC), [1], {"a": 1}):
        add(
            f"AMQP: a {type(typed).__name__} attribute value",
            lambda v=typed: amqp({**A_HEADERS, "cloudEvents_subject": v}, A_BODY, A_CTYPE),
            R.MALFORMED,
            cheap=True,
        )
    add(
        "Kafka: structured record that also carries ce_ headers",
        lambda: kafka([*K_STRUCTURED_HEADERS, ("ce_id", b"other")], K_STRUCTURED),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "Kafka: structured record that also carries ce_trustchain",
        lambda: kafka([*K_STRUCTURED_HEADERS, ("ce_trustchain", chain)], K_STRUCTURED),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "AMQP: structured message that also carries cloudEvents_ headers",
        lambda: amqp({"cloudEvents_id": "x"}, A_STRUCTURED, STRUCTURED),
        R.MALFORMED,
        cheap=True,
    )
    for old, new in (
        ("ce_trustchain", "CE_trustchain"),
        ("ce_id", "Ce_id"),
        ("ce_type", "ce_Type"),
        ("content-type", "Content-Type"),
    ):
        add(
            f"Kafka: header renamed {new}",
            lambda o=old, n=new: kafka(_renamed(o, n), K_VALUE),
            R.MALFORMED,
            cheap=True,
        )
    for prefix in ("CloudEvents_", "cloudevents_", "CLOUDEVENTS:"):
        add(
            f"AMQP: prefix {prefix}",
            lambda p=prefix: amqp({**A_HEADERS, f"{p}subject": "x"}, A_BODY, A_CTYPE),
            R.MALFORMED,
            cheap=True,
        )
    for value in (b"order\n42", b"a\x00b", b"\x1b[2J", b"del\x7f", b"\xc2\x85", b"tab\t"):
        add(
            f"Kafka: control character in ce_subject {value!r}",
            lambda v=value: kafka(_replaced("ce_subject", v), K_VALUE),
            R.MALFORMED,
            cheap=True,
        )
    add(
        "AMQP: control character in a header value",
        lambda: amqp({**A_HEADERS, "cloudEvents_subject": "a\r\nb"}, A_BODY, A_CTYPE),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "Kafka: control character in the content-type",
        lambda: kafka(_replaced("content-type", b"application/json\n"), K_VALUE),
        R.MALFORMED,
        cheap=True,
    )
    # Typed extension values: signed in their canonical string form.
    add("control: typed event in Kafka headers", lambda: kafka(T_HEADERS, T_VALUE), None)
    add(
        "AMQP: integer extension where the string '7' was signed",
        _typed_amqp("count", 7),
        None,
        note="signed as the string '7'",
    )
    add(
        "AMQP: boolean extension where the string 'true' was signed",
        _typed_amqp("flag", True),
        None,
    )
    add("AMQP: integer extension with another value", _typed_amqp("count", 8), R.EVENT_MISMATCH)
    add("AMQP: boolean extension flipped", _typed_amqp("flag", False), R.EVENT_MISMATCH)
    add(
        "AMQP: integer extension out of int32",
        _typed_amqp("count", 2**31 + 7),
        R.MALFORMED,
        cheap=True,
    )
    add("AMQP: float extension", _typed_amqp("count", 7.0), R.MALFORMED, cheap=True)
    add(
        "structured: integer and boolean members",
        _structured(_document(TYPED, count=7, flag=True)),
        None,
    )
    add(
        "structured: float member",
        _structured(_document(TYPED, count=7.0)),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "structured: integer over int32",
        _structured(_document(TYPED, count=2**40)),
        R.MALFORMED,
        cheap=True,
    )
    add(
        "structured: boolean 'true' for the integer 7",
        _structured(_document(TYPED, count=True)),
        R.EVENT_MISMATCH,
    )
    # time: the same instant in another form verifies, another instant does not.
    for value, expect in (
        (b"2026-01-01T01:00:10+01:00", None),
        (b"2025-12-31T23:30:10-00:30", None),
        (b"2026-01-01T00:00:10.000000Z", None),
        (b"2026-01-01t00:00:10z", None),
        (b"2026-01-01T00:00:10.5Z", R.EVENT_MISMATCH),
        (b"2026-01-01T01:00:10Z", R.EVENT_MISMATCH),
        (b"2026-01-01T00:00:10+24:00", R.MALFORMED),
        (b"2026-01-01T00:00:10", R.MALFORMED),
        (b"2026-01-01 00:00:10Z", R.MALFORMED),
        ("\u0662\u0660\u0662\u0666-01-01T00:00:10Z".encode(), R.MALFORMED),
        (b"2026-01-01T00:00:60Z", R.MALFORMED),
    ):
        add(
            f"Kafka: time {value.decode()!r}",
            _typed_kafka("time", value),
            expect,
            cheap=expect is R.MALFORMED,
        )
    add("AMQP: time with an offset", _typed_amqp("time", "2026-01-01T02:00:10+02:00"), None)
    add(
        "structured: time with an offset and a fraction",
        _structured(_document(TYPED, time="2025-12-31T23:30:10.000-00:30")),
        None,
    )
    # JSON data in another key order.
    reordered = json.dumps({"order": 42, "amount": 999}, separators=(",", ":")).encode()
    add(
        "Kafka binary: JSON data re-serialised in another key order",
        lambda: kafka(K_HEADERS, reordered),
        R.EVENT_MISMATCH,
        note="binary mode signs the bytes",
    )
    add(
        "Kafka binary: JSON data re-serialised with whitespace",
        lambda: kafka(K_HEADERS, json.dumps(json.loads(K_VALUE)).encode()),
        R.EVENT_MISMATCH,
    )
    add(
        "Kafka structured: data members in another key order",
        _structured(
            K_STRUCTURED.replace(b'{"amount":999,"order":42}', b'{"order":42,"amount":999}')
        ),
        None,
        note="structured mode signs the canonical JSON of the value",
    )
    add(
        "binary (canonical JSON) bridged to structured 'data', another key order",
        _structured(_document(e2_wire(), data={"order": 42, "amount": 999})),
        None,
    )
    add(
        "binary (non-canonical JSON bytes) bridged to structured 'data'",
        _structured(_document(RAW_JSON, data=json.loads(NON_CANONICAL), data_base64=None)),
        R.EVENT_MISMATCH,
        note="such bytes must travel as data_base64",
    )
    add(
        "control: non-canonical JSON bytes in Kafka binary mode",
        lambda: kafka(RJ_HEADERS, RJ_VALUE),
        None,
    )
    add(
        "binary (non-canonical JSON bytes) bridged to structured data_base64",
        _structured(_document(RAW_JSON)),
        None,
    )
    add(
        "AMQP: routing key with a line break and terminal escapes",
        lambda: amqp(A_HEADERS, A_BODY, A_CTYPE, routing_key="order.reserved\n\x1b[31mINFO"),
        R.WRONG_DESTINATION,
    )
    yield from t


# --------------------------------------------------------------------------- #
# 7. msgpack tricks (inside a ring's body), and the text around the rings
# --------------------------------------------------------------------------- #

UUID_TEXT = "0f8c2f4e-1b2a-4c3d-9e8f-0123456789ab"


def _x5c_instead(value: Any) -> Callable[[dict[Any, Any]], None]:
    def change(m: dict[Any, Any]) -> None:
        m.pop(K_KEY)
        m[K_X5C] = value

    return change


def _msgpack_attacks() -> Iterator[Attack]:
    items = sorted(body_of(2).items())
    at = [k for k, _ in items].index(K_IAT)
    dup = [*items[: at + 1], (K_ACTOR, "/ns/pay/sa/payments"), *items[at + 1 :]]
    rows: list[tuple[str, str, object]] = [
        ("duplicate map key in a ring", with_body(2, _map_bytes(dup)), 2),
        (
            "duplicate map key, same value",
            with_body(2, _map_bytes([*items[:2], items[1], *items[2:]])),
            2,
        ),
        ("unsorted map keys", with_body(2, _map_bytes(sorted(items, reverse=True))), 2),
        ("a body that is an array", with_body(2, pack([v for _, v in items])), 2),
        ("a body that is a string", with_body(2, pack("x" * 40)), 2),
        ("boolean map keys", with_body(2, _map_bytes([(k == 1 or k, v) for k, v in items])), 2),
        ("float map keys", with_body(2, _map_bytes([(float(k), v) for k, v in items])), 2),
        ("fixext1 for a field value", raw_ring(2, {K_PEER: b"\xd4\x01\x00"}), 2),
        ("ext8 for a field value", raw_ring(2, {K_PEER: b"\xc7\x02\x05ab"}), 2),
        (
            "timestamp extension (-1) for iat",
            raw_ring(2, {K_IAT: b"\xd6\xff" + b"\x00" * 4}),
            2,
        ),
        ("iat as uint64 max", raw_ring(2, {K_IAT: b"\xcf" + b"\xff" * 8}), 2),
        ("ttl as int64 min", raw_ring(2, {K_TTL: b"\xd3\x80" + b"\x00" * 7}), 2),
        ("origin iat as 2**40", with_ring(0, lambda m: m.__setitem__(K_IAT, 2**40)), 0),
        ("hop iat delta as 2**40", with_ring(2, lambda m: m.__setitem__(K_IAT, 2**40)), 2),
        ("origin ttl as 2**40", with_ring(0, lambda m: m.__setitem__(K_TTL, 2**40)), 0),
        ("negative origin iat", with_ring(0, lambda m: m.__setitem__(K_IAT, -1)), 0),
        (
            "iat in a non-minimal uint64",
            raw_ring(2, {K_IAT: b"\xcf" + body_of(2)[K_IAT].to_bytes(8, "big")}),
            2,
        ),
        ("float for iat", raw_ring(2, {K_IAT: b"\xcb" + struct.pack(">d", 10.0)}), 2),
        ("float for the key tag", raw_ring(2, {K_KEY: b"\xcb" + struct.pack(">d", 1.0)}), 2),
        ("boolean for the key tag", with_ring(2, lambda m: m.__setitem__(K_KEY, True)), 2),
        ("key tag 65536", with_ring(2, lambda m: m.__setitem__(K_KEY, 0x10000)), 2),
        ("key tag -1", with_ring(2, lambda m: m.__setitem__(K_KEY, -1)), 2),
        ("link tag 65536", with_ring(2, lambda m: m.__setitem__(K_LINK, 0x10000)), 2),
        ("nil for the destination", raw_ring(2, {K_DEST: b"\xc0"}), 2),
        (
            "str where bin is due (event)",
            with_ring(2, lambda m: m.__setitem__(K_EVENT, "x" * 32)),
            2,
        ),
        (
            "bin of 31 bytes for the event",
            with_ring(2, lambda m: m.__setitem__(K_EVENT, b"x" * 31)),
            2,
        ),
        (
            "str where bin is due (cred)",
            with_ring(0, lambda m: m.__setitem__(K_CRED_HASH, "x" * 32)),
            0,
        ),
        (
            "bin where str is due (actor)",
            with_ring(2, lambda m: m.__setitem__(K_ACTOR, m[K_ACTOR].encode())),
            2,
        ),
        (
            "a canonical UUID as text for the transaction id",
            with_ring(0, lambda m: m.__setitem__(K_TXN, UUID_TEXT)),
            0,
        ),
        (
            "a canonical UUID as text for the consumed event id",
            with_ring(2, lambda m: m.__setitem__(K_CONSUMED, UUID_TEXT)),
            2,
        ),
        (
            "15 bytes for the transaction id",
            with_ring(0, lambda m: m.__setitem__(K_TXN, b"u" * 15)),
            0,
        ),
        (
            "an unsorted scope",
            with_ring(1, lambda m: m.__setitem__(K_SCOPE, sorted(m[K_SCOPE])[::-1])),
            1,
        ),
        ("a scope entry twice", with_ring(2, lambda m: m.__setitem__(K_SCOPE, ["a", "a"])), 2),
        ("an empty scope entry", with_ring(2, lambda m: m.__setitem__(K_SCOPE, [""])), 2),
        (
            "a scope entry of 257 characters",
            with_ring(2, lambda m: m.__setitem__(K_SCOPE, ["s" * 257])),
            2,
        ),
        (
            "a control character in a scope entry",
            with_ring(2, lambda m: m.__setitem__(K_SCOPE, ["a\nb"])),
            2,
        ),
        (
            "a line separator in the subject",
            with_ring(0, lambda m: m.__setitem__(K_SUBJECT, "a\u2028b")),
            0,
        ),
        (
            "an issuer of 1025 characters",
            with_ring(0, lambda m: m.__setitem__(K_ISSUER, "i" * 1025)),
            0,
        ),
        ("17 amr entries", with_ring(0, lambda m: m.__setitem__(K_AMR, ["m"] * 17)), 0),
        ("x5c of five certificates", with_ring(2, _x5c_instead([b"\x30\x00"] * 5)), 2),
        ("x5c empty", with_ring(2, _x5c_instead([])), 2),
        ("x5c with a certificate of 4097 bytes", with_ring(2, _x5c_instead([b"\x30" * 4097])), 2),
        ("x5c as one bin, not a list", with_ring(2, _x5c_instead(b"\x30\x00")), 2),
        ("nested 5000 arrays deep", with_body(2, b"\x91" * 5000 + b"\x90"), 2),
        ("nested 1000 maps deep", with_body(2, b"\x81\x00" * 1000 + b"\x80"), 2),
        (
            "nesting inside a field value",
            with_ring(0, lambda m: m.__setitem__(K_ACR, [[[["x"]]]])),
            0,
        ),
        ("one trailing byte after a body", with_body(2, R2[SIGNATURE_BYTES:] + b"\x00"), 2),
        ("a trailing second value", with_body(2, R2[SIGNATURE_BYTES:] + pack([1])), 2),
        ("a ring that is only a signature", encode_segments([R0, R1, R2[:SIGNATURE_BYTES]]), 2),
        ("padding on a ring's base64url", STORY.encoded + "=" * (-len(STORY.encoded) % 4 or 4), 2),
        (
            "padding on the origin's base64url",
            STORY.encoded.replace(".", "==.", 2).replace("==.", ".", 1),
            ANY_RING,
        ),
        (
            "standard base64 alphabet",
            STORY.encoded.replace("-", "+").replace("_", "/") + "+",
            ANY_RING,
        ),
        ("whitespace after a dot", STORY.encoded.replace(".", ". ", 2), ANY_RING),
        ("a line break before a dot", STORY.encoded.replace(".", "\n.", 2), ANY_RING),
    ]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    segments = STORY.encoded.split(".")[1:]
    for index, segment in enumerate(segments):
        if len(segment) % 4 not in (2, 3):  # the last character carries unused bits
            continue
        last = alphabet[alphabet.index(segment[-1]) | 1]
        assert last != segment[-1]
        bad = [*segments[:index], segment[:-1] + last, *segments[index + 1 :]]
        rows.append(
            (f"non-zero trailing bits in ring {index}'s base64url", ".".join(["2", *bad]), index)
        )
    assert any(name.startswith("non-zero trailing bits") for name, _, _ in rows)
    # The version: "2." exactly, checked before any ring is decoded.
    v1 = b64url_encode(pack([1, {0: bytes(64), 1: EDGE_ID}]))
    for name, version_text in (
        ("version 1", "1" + STORY.encoded[1:]),
        ("version 3", "3" + STORY.encoded[1:]),
        ("version 02", "0" + STORY.encoded),
        ("version 2 with a sign", "+" + STORY.encoded),
        ("a full-width version digit", "\uff12" + STORY.encoded[1:]),
        ("no version", STORY.encoded[2:]),
        ("a wire-version-1 chain (one base64url msgpack array)", v1),
    ):
        rows.append((name, version_text, ANY_RING))
    for name, text_value, ring in rows:
        yield Attack("msgpack", name, text(text_value), R.MALFORMED, ring, cheap=True)


# --------------------------------------------------------------------------- #
# 8. replays and windows
# --------------------------------------------------------------------------- #


def _admit_twice(first: DeliveryInfo, second: DeliveryInfo, destination: str = DEST2) -> object:
    """Admit the valid event twice in one consumer scope; return the second verdict."""

    async def run() -> object:
        clock = FixedClock()
        admission = Admission(
            ChainVerifier(BUNDLE, clock=clock),
            scope="kafka/catalogue",
            store=MemoryReplayStore(clock=clock),
        )
        accepted = await admission.admit(e2_wire(), destination, first)
        assert accepted is not None
        await admission.settle(accepted)
        clock.now += 60  # re-published a minute later
        return await admission.admit(e2_wire(), destination, second)

    return asyncio.run(run())


def _forged_window(**changes: int) -> list[bytes]:
    return [R0, R1, after(PREFIX, dataclasses.replace(A2, **changes), ORDERS)]


def _replay_attacks() -> Iterator[Attack]:
    yield Attack(
        "replay",
        "a Kafka record copied into another topic",
        lambda: kafka(K_HEADERS, K_VALUE, topic="orders"),
        R.WRONG_DESTINATION,
        2,
    )
    yield Attack(
        "replay",
        "a Kafka record copied into the topic of its parent",
        lambda: kafka(K_HEADERS, K_VALUE, topic=DEST1.removeprefix("kafka:")),
        R.WRONG_DESTINATION,
        2,
    )
    yield Attack(
        "replay",
        "an AMQP message re-published to another exchange",
        lambda: amqp(A_HEADERS, A_BODY, A_CTYPE, exchange="billing"),
        R.WRONG_DESTINATION,
        2,
    )
    yield Attack(
        "replay",
        "an AMQP message re-published with another routing key",
        lambda: amqp(A_HEADERS, A_BODY, A_CTYPE, routing_key="order.cancelled"),
        R.WRONG_DESTINATION,
        2,
    )
    yield Attack(
        "replay",
        "an AMQP message sent straight to a queue (default exchange)",
        lambda: amqp(A_HEADERS, A_BODY, A_CTYPE, exchange="", routing_key="shipping"),
        R.WRONG_DESTINATION,
        2,
    )
    yield Attack(
        "replay",
        "an AMQP message given a CC header",
        lambda: amqp({**A_HEADERS, "CC": ["order.cancelled"]}, A_BODY, A_CTYPE),
        R.WRONG_DESTINATION,
    )
    yield Attack(
        "replay",
        "a Kafka record re-published into the same topic (same group)",
        lambda: _admit_twice(DeliveryInfo(id="payments/0@1"), DeliveryInfo(id="payments/0@9")),
        R.REPLAYED,
    )
    yield Attack(
        "replay",
        "a copy in the retry topic with a forged trusthop-retry",
        lambda: _admit_twice(
            DeliveryInfo(id="payments/0@1"), DeliveryInfo(id="payments.retry/0@0", retry=2)
        ),
        R.REPLAYED,
    )
    yield Attack(
        "replay",
        "an AMQP copy flagged redelivered after the original was acked",
        lambda: _admit_twice(DeliveryInfo(), DeliveryInfo(redelivered=True)),
        R.REPLAYED,
    )
    yield Attack(
        "replay",
        "control: the broker's own redelivery of the same offset",
        lambda: _admit_twice(DeliveryInfo(id="payments/0@1"), DeliveryInfo(id="payments/0@1")),
        None,
    )
    newest_exp = A2.exp
    yield Attack(
        "replay",
        "the valid event re-published after its window",
        text(STORY.encoded, now=newest_exp + Limits().leeway + 1),
        R.EXPIRED,
    )
    yield Attack(
        "replay",
        "the valid event re-published before it is valid",
        text(STORY.encoded, now=A2.iat - Limits().leeway - 1),
        R.NOT_YET_VALID,
    )
    yield Attack(
        "replay",
        "the valid event re-published past max_age",
        text(STORY.encoded, now=A2.iat + 600, limits=Limits(max_age=300)),
        R.EXPIRED,
    )
    yield Attack(
        "replay",
        "a ring whose window ends after its parent's",
        rings_of(_forged_window(exp=A1.exp + 1)),
        R.WINDOW_ESCALATION,
        2,
    )
    # v2 writes a hop's iat as seconds after its parent's and every ttl
    # unsigned: a window that starts before its parent's, or ends before it
    # starts, cannot be written. Even really signed, such a body is malformed.
    yield Attack(
        "replay",
        "a ring whose window starts before its parent's (a negative iat delta, signed)",
        text(signed_after(2, lambda m: m.__setitem__(K_IAT, -1), ORDERS)),
        R.MALFORMED,
        2,
        cheap=True,
        note="v1: window_escalation; unrepresentable in v2",
    )
    yield Attack(
        "replay",
        "the encoder cannot write a ring that starts before its parent",
        lambda: PREFIX.appended(dataclasses.replace(A2, iat=A1.iat - 1)),
        ValueError,
    )
    yield Attack(
        "replay",
        "a ring whose window ends before it starts (a negative ttl, signed)",
        text(signed_after(2, lambda m: m.__setitem__(K_TTL, -5), ORDERS)),
        R.MALFORMED,
        2,
        cheap=True,
        note="v1: window_escalation; unrepresentable in v2",
    )
    yield Attack(
        "replay",
        "an origin whose window ends before it starts (a negative ttl, signed)",
        text(signed_after(0, lambda m: m.__setitem__(K_TTL, -1), EDGE)),
        R.MALFORMED,
        0,
        cheap=True,
    )
    yield Attack(
        "replay",
        "the encoder cannot write an origin that ends before it starts",
        lambda: Chain(dataclasses.replace(A0, exp=A0.iat - 1)),
        ValueError,
    )
    yield Attack(
        "replay",
        "a ring that starts after its parent expired (end inherited, signed)",
        text(
            signed_after(
                2, lambda m: (m.pop(K_TTL), m.__setitem__(K_IAT, A1.exp - A1.iat + 1)), ORDERS
            )
        ),
        R.WINDOW_ESCALATION,
        2,
        note="still expressible in v2: a signed content error found with the links",
    )
    outliving = sign_ring(dataclasses.replace(A1, exp=A0.exp + 3600), EDGE, Chain(A0))
    r1_outliving = Chain(A0, (outliving,)).ring_bytes[1]  # type: ignore[arg-type]
    yield Attack(
        "replay",
        "a hop re-signed by its own key to outlive the origin",
        rings_of([R0, r1_outliving, after(Chain(A0, (outliving,)), A2, ORDERS)]),  # type: ignore[arg-type]
        R.WINDOW_ESCALATION,
        1,
        note="needs the edge's and the next key; with every signature good, the first "
        "content rule broken, oldest first, is ring 1's window",
    )
    yield Attack(
        "replay",
        "a hop re-signed by its own key to outlive the origin, ring 2 kept",
        rings_of([R0, r1_outliving, R2]),
        R.BROKEN_LINK,
        2,
        note="v2 checks every signature before any content rule: ring 2 was signed after "
        "the old ring 1",
    )


CATALOGUE: list[Attack] = [
    *_field_attacks(),
    *_structure_attacks(),
    *_confusion_attacks(),
    *_bounds_attacks(),
    *_spiffe_attacks(),
    *_transport_attacks(),
    *_msgpack_attacks(),
    *_replay_attacks(),
]


# --------------------------------------------------------------------------- #
# running the catalogue
# --------------------------------------------------------------------------- #


@dataclass
class Calls:
    """Counts of what a row must not reach."""

    key_lookups: int = 0
    signatures: int = 0
    forbidden: dict[str, int] = field(default_factory=dict)


def _spy(monkeypatch: pytest.MonkeyPatch, dotted: str, calls: Calls) -> None:
    module_name, _, attribute = dotted.rpartition(".")
    target: Any = sys.modules.get(module_name)
    if target is None:  # a module attribute path such as "...structured.json.loads"
        owner_name, _, owner_attr = module_name.rpartition(".")
        target = getattr(sys.modules[owner_name], owner_attr)
    original = getattr(target, attribute)
    calls.forbidden[dotted] = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.forbidden[dotted] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, counting)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    counted = Calls()
    get, key_for, entry_of = TrustBundle.get, TrustBundle.key_for, TrustBundle.entry_of
    check = PublicKey.verify

    def counting_get(self: TrustBundle, kid: str) -> BundleKey | None:
        counted.key_lookups += 1
        return get(self, kid)

    def counting_key_for(self: TrustBundle, actor: str, key_tag: int) -> BundleKey | None:
        counted.key_lookups += 1  # v2: a ring names its key by (actor, key tag)
        return key_for(self, actor, key_tag)

    def counting_entry_of(self: TrustBundle, key: PublicKey) -> BundleKey | None:
        counted.key_lookups += 1  # an X.509-SVID leaf's key
        return entry_of(self, key)

    def counting_verify(self: PublicKey, signature: bytes, message: bytes) -> bool:
        counted.signatures += 1
        return check(self, signature, message)

    monkeypatch.setattr(TrustBundle, "get", counting_get)
    monkeypatch.setattr(TrustBundle, "key_for", counting_key_for)
    monkeypatch.setattr(TrustBundle, "entry_of", counting_entry_of)
    monkeypatch.setattr(PublicKey, "verify", counting_verify)
    return counted


@pytest.mark.parametrize("attack", CATALOGUE, ids=[a.id for a in CATALOGUE])
def test_attack(attack: Attack, calls: Calls, monkeypatch: pytest.MonkeyPatch) -> None:
    for dotted in attack.forbidden:
        _spy(monkeypatch, dotted, calls)
    if attack.expect is None:
        result = attack.run()
        assert result is not None
    elif isinstance(attack.expect, Reason):
        rejected(attack.run, attack.expect, attack.ring)
    else:
        with pytest.raises(attack.expect):
            attack.run()
    if attack.cheap:
        assert (calls.key_lookups, calls.signatures) == (0, 0), calls
    assert all(count == 0 for count in calls.forbidden.values()), calls.forbidden


def test_every_bullet_of_the_issue_has_attacks() -> None:
    per_bullet = {bullet: [a for a in CATALOGUE if a.bullet == bullet] for bullet in BULLETS}
    assert {a.bullet for a in CATALOGUE} == set(BULLETS)
    assert all(len(rows) >= 5 for rows in per_bullet.values()), {
        b: len(r) for b, r in per_bullet.items()
    }
    assert len({a.id for a in CATALOGUE}) == len(CATALOGUE)
    # Every bullet has at least one rejection; controls show the attack is not vacuous.
    assert all(any(a.expect is not None for a in rows) for rows in per_bullet.values())


def test_every_wire_field_of_every_ring_kind_is_mutated() -> None:
    mutated = {a.name.split(" ")[0] for a in CATALOGUE if a.bullet == "mutation"}
    for index, (required, optional) in enumerate(
        [
            (ORIGIN_REQUIRED, ORIGIN_OPTIONAL),
            (HOP_REQUIRED, HOP_OPTIONAL),
            (HOP_REQUIRED, HOP_OPTIONAL),
        ]
    ):
        assert f"ring{index}.sig" in mutated  # the 64 bytes before the body
        for key in required | optional:
            assert f"ring{index}.{FIELD_NAMES[key]}" in mutated
    # The field tables above are the wire format's (v2): a new field must be
    # added here. A key tag or x5c is required in every ring, one of them.
    from trusthop import rings as chain

    assert set(FIELD_NAMES) == ORIGIN_REQUIRED | ORIGIN_OPTIONAL | HOP_REQUIRED | HOP_OPTIONAL
    assert chain._ORIGIN_REQUIRED == ORIGIN_REQUIRED
    assert chain._ORIGIN_ALLOWED == ORIGIN_REQUIRED | ORIGIN_OPTIONAL
    assert chain._HOP_REQUIRED == HOP_REQUIRED
    assert chain._HOP_ALLOWED == HOP_REQUIRED | HOP_OPTIONAL
    for shapes, required in (
        (chain._ORIGIN_SHAPES, ORIGIN_REQUIRED),
        (chain._HOP_SHAPES, HOP_REQUIRED),
    ):
        assert all(required <= set(shape) for shape in shapes)
        assert all(len(ONE_OF & set(shape)) == 1 for shape in shapes)


def test_cheap_rows_really_reach_the_checks_they_skip(calls: Calls) -> None:
    """The counters work: a valid chain looks up every key and checks every signature."""
    verify(STORY.encoded, story=STORY)
    assert calls.key_lookups == 3
    assert calls.signatures == 3


# --------------------------------------------------------------------------- #
# fixes made while writing the catalogue
# --------------------------------------------------------------------------- #


def test_a_rejection_never_carries_control_characters_into_logs_or_headers() -> None:
    """RabbitMQ delivers routing keys with line breaks and terminal escapes;
    the worker writes the source into its log line and dead-letter headers."""
    source = "amqp:shipping/order.reserved\n2026-01-01 INFO forged line\x1b[31m\u2028\ud800\u202e"
    rejection = Rejection(
        R.WRONG_DESTINATION, f"consumed from {source}", source, "queue", destination=source
    )
    for value in (rejection.source, rejection.detail, rejection.destination or ""):
        assert value == printable(value)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value), value
        assert not {"\u2028", "\ud800", "\u202e"} & set(value)
    assert rejection.source == (
        "amqp:shipping/order.reserved\\n2026-01-01 INFO forged line\\x1b[31m\\u2028\\ud800\\u202e"
    )
    amqp_headers = amqp_dead_letter_headers({}, rejection)
    kafka_headers = dict(kafka_dead_letter_headers([], rejection))
    assert amqp_headers["trusthop-source"] == rejection.source
    assert kafka_headers["trusthop-source"] == rejection.source.encode()
    # Plain text is left alone, and the consumer name (a routing key) too.
    plain = Rejection(R.MALFORMED, "ordinary détail", "amqp:x/y", "q\n")
    assert (plain.detail, plain.source, plain.consumer) == ("ordinary détail", "amqp:x/y", "q\n")


def _guarded(payload: bytes) -> Any:
    return received(payload).properties


def test_pamqp_alone_cannot_decode_what_a_publisher_can_send() -> None:
    """Why the guard exists: pamqp's own decoder raises on these properties
    (aiormq then closes the connection, and the requeued message comes back
    first on every reconnect)."""
    for payload in (
        content_header([(b"x-\xff", _longstr(b"v"))]),
        content_header(None, b"text/\xff"),
        content_header([(b"x", b"Z\x00")]),
        content_header(None, timestamp=b"\xff" * 8),
    ):
        flags = struct.unpack(">H", payload[12:14])[0]
        with pytest.raises((ValueError, OverflowError, OSError)):
            commands.Basic.Properties().unmarshal(flags, payload[14:])


def test_the_frame_guard_marks_undecodable_properties_and_keeps_the_body_size() -> None:
    decoded = received(content_header([(b"x-\xff", _longstr(b"v"))], body_size=12345))
    assert decoded.body_size == 12345
    marker = undecodable(decoded.properties.headers)
    assert isinstance(marker, UndecodableProperties)
    assert "cannot be decoded" in marker.problem
    assert decoded.properties.content_type is None  # nothing undecodable is half-kept
    again = undecodable(
        _guarded(content_header([(b"x-\xff", _longstr(b"v"))], body_size=1)).headers
    )
    assert repr(marker) == repr(again)  # the worker fingerprints redeliveries by repr


def test_the_frame_guard_marks_a_repeated_header_name_and_keeps_the_rest() -> None:
    properties = _guarded(
        content_header([(b"a", _longstr(b"1")), (b"b", _longstr(b"2")), (b"a", _longstr(b"3"))])
    )
    assert properties.content_type == "application/json"
    assert properties.headers["a"] == "3" and properties.headers["b"] == "2"  # pamqp's reading
    marker = undecodable(properties.headers)
    assert marker is not None and "'a' appears twice" in marker.problem
    # A dead letter never copies the marker (it is a trusthop-* header).
    letter = amqp_dead_letter_headers(properties.headers, Rejection(R.MALFORMED, "x", "s", "q"))
    assert H_UNDECODABLE not in letter and letter["a"] == "3"


def test_a_publisher_cannot_forge_the_marker() -> None:
    for value in (b"S" + struct.pack(">I", 1) + b"x", b"t\x01", b"F\x00\x00\x00\x00"):
        properties = _guarded(content_header([*_a_entries(), (H_UNDECODABLE.encode(), value)]))
        assert undecodable(properties.headers) is None
        assert amqp(properties.headers, A_BODY, properties.content_type).context.subject


def test_install_frame_guard_is_idempotent() -> None:
    install_frame_guard()
    assert install_frame_guard() is False
    assert header.ContentHeader.unmarshal is guarded_unmarshal


@settings(max_examples=150, deadline=500, database=None)
@given(
    properties=st.builds(
        commands.Basic.Properties,
        content_type=st.none() | st.text(max_size=20),
        headers=st.none()
        | st.dictionaries(
            st.text(min_size=1, max_size=10),
            st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
            max_size=5,
        ),
        delivery_mode=st.none() | st.sampled_from([1, 2]),
        priority=st.none() | st.integers(0, 9),
        message_id=st.none() | st.text(max_size=20),
        app_id=st.none() | st.text(max_size=20),
    ),
    body_size=st.integers(0, 2**40),
)
def test_the_frame_guard_decodes_valid_frames_exactly_as_pamqp(
    properties: Any, body_size: int
) -> None:
    frame = header.ContentHeader(0, body_size, properties).marshal()
    guarded = header.ContentHeader()
    guarded.unmarshal(frame)
    plain = commands.Basic.Properties()
    offset, flags = header.ContentHeader._get_flags(frame[12:])
    plain.unmarshal(flags, frame[12 + offset :])
    assert guarded.body_size == body_size
    assert guarded.properties == plain
    assert undecodable(guarded.properties.headers) is None


def test_one_key_under_two_actors_is_refused_everywhere_a_bundle_is_built() -> None:
    key = ORDERS.key.public_key
    refused: list[Callable[[], object]] = [
        lambda: TrustBundle.of([BundleKey("a", ORDERS_ID, key), BundleKey("b", PAYMENTS_ID, key)]),
        lambda: TrustBundle.from_document(
            _bundle_doc(("a", ORDERS_ID, key), ("b", PAYMENTS_ID, key))
        ),
        lambda: BUNDLE.with_key(BundleKey("orders-again", PAYMENTS_ID, key)),
        lambda: merge([BUNDLE, TrustBundle.of([BundleKey("b", PAYMENTS_ID, key)])]),
    ]
    for build in refused:
        with pytest.raises(BundleError, match="belongs to"):
            build()
    # One actor may hold one key under two ids (a key id renamed during a rotation).
    both = BUNDLE.with_key(BundleKey("orders-renamed", ORDERS_ID, key))
    assert both.get("orders-renamed") is not None and both.get("orders-1") is not None


# --------------------------------------------------------------------------- #
# fuzzing: any headers, any bytes -> a verified event or a typed rejection
# --------------------------------------------------------------------------- #

FUZZ = settings(
    max_examples=200,
    deadline=500,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
E2_DIGEST = STORY.e2.digest()
A_DIGEST = A_WIRE.digest()


def verdict(run: Callable[[], Any], signed_digest: bytes | None = None) -> TrustedEvent | None:
    """Run a decode-and-verify step: a TrustedEvent or a TrustError, nothing else.

    A verified event must be the signed one: its digest is ``signed_digest``.
    """
    try:
        trusted = run()
    except TrustError as error:
        assert isinstance(error.reason, Reason) and error.message
        return None
    assert isinstance(trusted, TrustedEvent)
    if signed_digest is not None:
        assert trusted.wire.digest() == signed_digest, "a changed event verified"
    return trusted


kafka_names = st.sampled_from(
    [name for name, _ in K_HEADERS]
    + [
        "CE_trustchain",
        "Ce_id",
        "ce_",
        "ce_X",
        "Content-Type",
        "ce_datacontenttype",
        "x-retry",
        "trusthop-retry",
        "traceparent",
        "ce_traceparent",
        "ce_partitionkey",
    ]
) | st.text(max_size=12)
kafka_values = (
    st.none()
    | st.sampled_from([v for _, v in K_HEADERS] + [STRUCTURED.encode(), OTHER.encoded.encode()])
    | st.binary(max_size=40)
    | st.text(max_size=10)  # not what aiokafka hands over, but a caller might
)


@st.composite
def kafka_records(draw: st.DrawFn) -> tuple[list[tuple[str, Any]], bytes | None]:
    """A valid record's headers, edited: dropped, duplicated, renamed, changed, added."""
    headers: list[tuple[str, Any]] = list(K_HEADERS)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["drop", "dup", "rename", "value", "add", "shuffle"]))
        if op == "add" or not headers:
            headers.insert(
                draw(st.integers(0, len(headers))), (draw(kafka_names), draw(kafka_values))
            )
            continue
        at = draw(st.integers(0, len(headers) - 1))
        name, value = headers[at]
        if op == "drop":
            del headers[at]
        elif op == "dup":
            headers.insert(at, (name, draw(st.just(value) | kafka_values)))
        elif op == "rename":
            headers[at] = (draw(kafka_names), value)
        elif op == "value":
            headers[at] = (name, draw(kafka_values))
        else:
            headers = draw(st.permutations(headers))
    value = draw(st.just(K_VALUE) | st.none() | st.binary(max_size=64) | st.just(K_STRUCTURED))
    return headers, value


@FUZZ
@given(record=kafka_records())
@example(record=([*K_HEADERS, ("ce_trustchain", None)], K_VALUE))
@example(record=(list(reversed(K_HEADERS)), K_VALUE))
def test_fuzz_kafka_records_end_in_a_verdict(record: tuple[list[tuple[str, Any]], Any]) -> None:
    headers, value = record
    verdict(lambda: kafka(headers, value), E2_DIGEST)


amqp_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.decimals(allow_nan=False, places=2, max_value=10**6, min_value=-(10**6))
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.binary(max_size=12).map(bytearray)
    | st.datetimes(timezones=st.just(dt.UTC))
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
    | st.sampled_from([*A_HEADERS.values(), OTHER.encoded, "7", "true"])
    | st.just(UndecodableProperties("fuzz"))
)
amqp_names = st.sampled_from(
    [
        *A_HEADERS,
        *("cloudEvents:id", "cloudEvents:trustchain", "CloudEvents_id", "cloudevents_type"),
        *("cloudEvents_datacontenttype", "CC", "BCC", "cc", "x-death", "trusthop-retry"),
        *(H_UNDECODABLE, "cloudEvents_count"),
    ]
) | st.text(max_size=12)


@FUZZ
@given(
    changes=st.dictionaries(amqp_names, amqp_values, max_size=5),
    dropped=st.sets(st.sampled_from(list(A_HEADERS)), max_size=3),
    content_type=st.sampled_from([A_CTYPE, None, STRUCTURED, "text/plain", "APPLICATION/JSON"])
    | st.text(max_size=12),
    body=st.sampled_from([A_BODY, A_STRUCTURED, b""]) | st.binary(max_size=64),
    routing_key=st.sampled_from([AMQP_KEY, AMQP_KEY + "\n", "", "#"]),
)
def test_fuzz_amqp_header_tables_end_in_a_verdict(
    changes: dict[str, Any],
    dropped: set[str],
    content_type: str | None,
    body: bytes,
    routing_key: str,
) -> None:
    headers: dict[str, Any] = {k: v for k, v in A_HEADERS.items() if k not in dropped}
    headers.update(changes)
    verdict(lambda: amqp(headers, body, content_type, routing_key=routing_key), A_DIGEST)


@FUZZ
@given(payload=st.binary(max_size=200), flags=st.integers(0, 0xFFFE))
@example(payload=_table([(b"x-\xff", b"V")]), flags=F_HEADERS)
def test_fuzz_raw_amqp_content_headers_never_kill_the_reader(payload: bytes, flags: int) -> None:
    frame = struct.pack(">HHQH", 60, 0, len(A_BODY), flags & ~1) + payload
    decoded = received(frame)  # must not raise: the fixed part is well formed
    assert decoded.body_size == len(A_BODY)
    properties = decoded.properties
    verdict(lambda: amqp(properties.headers, A_BODY, properties.content_type), A_DIGEST)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "swap"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from(b'{}[]",:\\0 -.eEtfn\xff\x00'))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 6))]
        else:
            other = draw(st.integers(0, len(data) - 1))
            data[at], data[other] = data[other], data[at]
    return bytes(data)


@FUZZ
@given(body=mutated(K_STRUCTURED))
def test_fuzz_structured_bodies_end_in_a_verdict(body: bytes) -> None:
    verdict(lambda: kafka([("content-type", STRUCTURED.encode())], body), E2_DIGEST)
    verdict(lambda: amqp({}, body, STRUCTURED))  # signed for Kafka: never verifies here


@FUZZ
@given(value=mutated(K_VALUE), chain=mutated(K_HEADERS[-1][1]))
def test_fuzz_binary_value_and_chain_end_in_a_verdict(value: bytes, chain: bytes) -> None:
    headers = [(k, chain if k == "ce_trustchain" else v) for k, v in K_HEADERS]
    verdict(lambda: kafka(headers, value), E2_DIGEST)
    verdict(lambda: kafka(K_HEADERS, value), E2_DIGEST)


@settings(max_examples=60, deadline=1000, database=None)
@given(
    deliveries=st.lists(
        st.tuples(
            st.sampled_from(["valid", "copy", "tampered", "garbage"]),
            st.integers(0, 3),  # partition
            st.booleans(),  # a retry claim
        ),
        min_size=1,
        max_size=8,
    )
)
def test_fuzz_a_consumer_scope_handles_each_signed_event_once(
    deliveries: list[tuple[str, int, bool]],
) -> None:
    """Admission over any interleaving of copies: each ring is accepted once,
    a broker redelivery (same offset) aside, and everything else is a TrustError."""

    async def run() -> None:
        clock = FixedClock()
        admission = Admission(
            ChainVerifier(BUNDLE, clock=clock),
            scope="kafka/fuzz",
            store=MemoryReplayStore(clock=clock),
        )
        tampered = WireEvent(dict(STORY.e2.attributes), b'{"amount":1,"order":42}', STORY.encoded)
        garbage = WireEvent(dict(STORY.e2.attributes), STORY.e2.data, STORY.encoded[:-9])
        accepted_ids: list[str] = []
        for offset, (kind, partition, retry) in enumerate(deliveries):
            wire = {
                "valid": e2_wire(),
                "copy": e2_wire(),
                "tampered": tampered,
                "garbage": garbage,
            }[kind]
            info = DeliveryInfo(id=f"payments/{partition}@{offset}", retry=2 if retry else 0)
            try:
                admitted = await admission.admit(wire, DEST2, info)
            except TrustError:
                continue
            assert admitted is not None and kind in ("valid", "copy")
            accepted_ids.append(info.id or "")
        assert len(accepted_ids) <= 1

    asyncio.run(run())


# --------------------------------------------------------------------------- #
# the atheris target (fuzz/), exercised without atheris
# --------------------------------------------------------------------------- #

FUZZ_TARGET = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_envelope.py"


def _load_target() -> Any:
    name = "trusthop_fuzz_envelope"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FUZZ_TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_the_atheris_target_runs_over_its_seed_corpus() -> None:
    target = _load_target()
    seeds = list(target.seed_corpus())
    assert len(seeds) >= 8
    outcomes = [target.TestOneInput(seed) for seed in seeds]
    # The seeds reach every mode, and the valid ones verify.
    assert {o.mode for o in outcomes} == set(target.MODES)
    assert any(o.verified for o in outcomes)
    for seed in seeds:  # and the neighbourhood of each seed ends in a verdict too
        for cut in (1, len(seed) // 2, len(seed) - 1):
            target.TestOneInput(seed[:cut])
        target.TestOneInput(seed + b"\x00")
        target.TestOneInput(bytes(b ^ 0x55 for b in seed))


@settings(max_examples=150, deadline=500, database=None)
@given(data=st.binary(max_size=400))
def test_the_atheris_target_on_random_bytes(data: bytes) -> None:
    _load_target().TestOneInput(data)
