"""The trust chain and its ``trustchain`` attribute (no I/O, no verification).

A chain is an origin ring followed by hop rings (:mod:`trusthop.rings`). On
the wire it is the CloudEvents extension attribute ``trustchain``: the
version ``2``, then each ring in unpadded base64url, separated by dots
(``2.<ring0>.<ring1>...``); ``docs/wire-format.md`` is the normative
description. A chain derived from another one begins with that one's text,
so a verifier can recognise a prefix it verified before without decoding
it. Each ring's bytes are kept with the chain, so hashing, signing inputs
and re-encoding never pack a ring twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trusthop.canonical import b64url_decode, b64url_encode
from trusthop.errors import Reason, TrustError
from trusthop.rings import (
    HOP_DOMAIN,
    MAX_RING_BYTES,
    ORIGIN_DOMAIN,
    SIGNATURE_BYTES,
    HopRing,
    OriginRing,
    Ring,
    decode_hop,
    decode_origin,
    hop_body,
    link_tag,
    next_hash,
    origin_body,
    positional_constructor,
)

__all__ = [
    "CHAIN_PREFIX",
    "WIRE_VERSION",
    "Chain",
    "HopRing",
    "OriginRing",
    "Ring",
    "check_chain_text",
    "decode_chain",
    "decode_rings",
    "ring_bytes",
]

WIRE_VERSION = 2
CHAIN_PREFIX = "2."
_MAX_RING_CHARS = MAX_RING_BYTES * 4 // 3 + 2  # a ring's unpadded base64url


def _fail(message: str, ring: int | None = None) -> TrustError:
    return TrustError(Reason.MALFORMED, message, ring=ring)


@dataclass(frozen=True, slots=True, eq=False)
class Chain:
    """An origin ring and the hop rings after it, oldest first.

    Built from ring objects (``Chain(origin, hops)``), each ring is encoded
    once; decoded (:func:`decode_chain`) or extended (:meth:`appended` of a
    signed ring), the ring bytes are the ones received or signed. Two chains
    are equal when their bytes are.

    Raises (on construction from ring objects):
        ValueError: a ring the wire format cannot express (see
            :func:`hop_body`).
    """

    origin: OriginRing
    hops: tuple[HopRing, ...] = ()
    _raw: tuple[bytes, ...] = field(init=False, repr=False)
    _hashes: list[bytes] = field(init=False, repr=False)
    _tags: tuple[int | None, ...] = field(init=False, repr=False)
    _text: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hops", tuple(self.hops))
        domain = self.origin.trust_domain
        raws = [self.origin.signature + origin_body(self.origin)]
        hashes = [next_hash(None, raws[0])]
        tags: list[int | None] = [None]
        prev: Ring = self.origin
        for hop in self.hops:
            raws.append(hop.signature + hop_body(hop, prev, domain, hashes[-1]))
            tags.append(link_tag(hashes[-1]))
            hashes.append(next_hash(hashes[-1], raws[-1]))
            prev = hop
        object.__setattr__(self, "_raw", tuple(raws))
        object.__setattr__(self, "_hashes", hashes)
        object.__setattr__(self, "_tags", tuple(tags))
        object.__setattr__(self, "_text", None)

    @classmethod
    def _of(
        cls,
        origin: OriginRing,
        hops: tuple[HopRing, ...],
        raw: tuple[bytes, ...],
        hashes: list[bytes],
        tags: tuple[int | None, ...],
        text: str | None = None,
    ) -> Chain:
        """A chain whose ring bytes, link tags (and some leading hashes, and
        maybe its encoding) are known."""
        return _chain(origin, hops, raw, hashes, tags, text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    @property
    def rings(self) -> tuple[Ring, ...]:
        return (self.origin, *self.hops)

    @property
    def newest(self) -> Ring:
        return self.hops[-1] if self.hops else self.origin

    @property
    def ring_bytes(self) -> tuple[bytes, ...]:
        """Each ring as it travels (signature then body), oldest first."""
        return self._raw

    @property
    def link_tags(self) -> tuple[int | None, ...]:
        """The link tag each ring carries (``None`` for the origin)."""
        return self._tags

    def hashes(self) -> list[bytes]:
        """Ring hashes, oldest first (each computed once per chain object).

        A new list each call: the chain object is shared (a verifier's cache
        hands the same one to every message with the same text), so its own
        list must not be changed by a caller.
        """
        return self._all_hashes()[:]

    def hash_at(self, index: int) -> bytes:
        """The hash of ring ``index`` (negative counts from the newest)."""
        return self._all_hashes()[index]

    def _all_hashes(self) -> list[bytes]:
        """The chain's own list of ring hashes, completed (never hand it out)."""
        hashes = self._hashes
        raw = self._raw
        if len(hashes) < len(raw):
            prev = hashes[-1] if hashes else None
            for data in raw[len(hashes) :]:
                prev = next_hash(prev, data)
                hashes.append(prev)
        return hashes

    def signing_input(self, index: int) -> bytes:
        """What ring ``index``'s signature covers."""
        body = self._raw[index][SIGNATURE_BYTES:]
        if index == 0:
            return ORIGIN_DOMAIN + body
        return HOP_DOMAIN + self._all_hashes()[index - 1] + body

    def next_signing_input(self, hop: HopRing) -> bytes:
        """What ``hop``'s signature must cover to follow this chain's newest
        ring (for tools that sign a ring themselves; see :meth:`appended`).

        Raises:
            ValueError: as :func:`hop_body`.
        """
        prev_hash = self._all_hashes()[-1]
        return (
            HOP_DOMAIN + prev_hash + hop_body(hop, self.newest, self.origin.trust_domain, prev_hash)
        )

    def appended(self, hop: HopRing, body: bytes | None = None) -> Chain:
        """This chain with ``hop`` (signed) after its newest ring.

        ``body`` is the hop's body when the caller already encoded it (the
        signer did, to sign it); it is not checked against ``hop``.
        """
        hashes = self._all_hashes()
        if body is None:
            body = hop_body(hop, self.newest, self.origin.trust_domain, hashes[-1])
        raw = hop.signature + body
        text = self._text
        return _chain(
            self.origin,
            (*self.hops, hop),
            (*self._raw, raw),
            hashes[:],  # the new ring's hash is computed when asked for
            (*self._tags, link_tag(hashes[-1])),
            None if text is None else f"{text}.{b64url_encode(raw)}",
        )

    def encode(self) -> str:
        """The ``trustchain`` attribute value (computed once per chain object)."""
        text = self._text
        if text is None:
            text = CHAIN_PREFIX + ".".join(b64url_encode(r) for r in self._raw)
            object.__setattr__(self, "_text", text)
        return text


_chain = positional_constructor(Chain)


# --------------------------------------------------------------------------- #
# The attribute: version, then each ring in base64url, separated by dots
# --------------------------------------------------------------------------- #


def check_chain_text(text: str, *, max_bytes: int, max_rings: int) -> None:
    """Size, ring count and version of a ``trustchain`` value, read before
    anything is decoded (and long before any signature is looked at).

    Raises:
        TrustError: ``too_large``, ``depth_exceeded`` or ``malformed``.
    """
    if len(text) > max_bytes:
        raise TrustError(Reason.TOO_LARGE, f"chain is {len(text)} bytes, the limit is {max_bytes}")
    rings = text.count(".")
    if rings > max_rings:
        raise TrustError(
            Reason.DEPTH_EXCEEDED, f"chain has {rings} rings, the limit is {max_rings}"
        )
    if not text.startswith(CHAIN_PREFIX):
        version = text.partition(".")[0][:8]
        raise _fail(f"unsupported chain version {version!r} (this is version {WIRE_VERSION})")
    if rings < 2:
        raise _fail("a chain is an origin ring and at least one hop ring")


def ring_bytes(segment: str, index: int) -> bytes:
    """The bytes of ring ``index`` from its base64url text.

    Raises:
        TrustError(malformed): not strict unpadded base64url, or a ring too
            short to hold a signature or longer than ``MAX_RING_BYTES``.
    """
    if len(segment) > _MAX_RING_CHARS:
        raise _fail(f"ring {index}: longer than {MAX_RING_BYTES} bytes", index)
    try:
        data = b64url_decode(segment)
    except ValueError as exc:
        raise _fail(f"ring {index}: not unpadded base64url ({exc})", index) from exc
    if len(data) <= SIGNATURE_BYTES:
        raise _fail(f"ring {index}: too short for a signature and a body", index)
    return data


def decode_chain(text: str, *, max_bytes: int, max_rings: int) -> Chain:
    """Parse a ``trustchain`` attribute value (nothing is verified).

    Raises:
        TrustError: ``too_large``, ``depth_exceeded`` or ``malformed``.
    """
    check_chain_text(text, max_bytes=max_bytes, max_rings=max_rings)
    return decode_rings(text)


def decode_rings(text: str, known: Chain | None = None) -> Chain:
    """The chain of an already checked ``trustchain`` value
    (:func:`check_chain_text`); ``known``, when given, is a chain whose
    encoding is a prefix of ``text`` ending before a ring (a verifier's
    cache): its rings and hashes are reused and only the rings after it are
    decoded.

    Raises:
        TrustError(malformed): naming the ring and field.
    """
    if known is not None:
        prefix = known.encode()
        cut = len(prefix)
        if len(text) == cut and text == prefix:
            return known
        if not text.startswith(prefix) or text[cut] != ".":
            raise ValueError("known is not a prefix of this chain")
        start = len(known._raw)
        tail = text[cut + 1 :]
        if "." not in tail:  # one new ring: the common case of a derived event
            data = ring_bytes(tail, start)
            known_hops = known.hops
            hop, tag = decode_hop(
                data,
                start,
                known_hops[-1] if known_hops else known.origin,
                known.origin.trust_domain,
            )
            return _chain(
                known.origin,
                (*known_hops, hop),
                (*known._raw, data),
                known._hashes[:],
                (*known._tags, tag),
                text,
            )
        segments = tail.split(".")
        origin = known.origin
        prev: Ring = known.newest
        domain = origin.trust_domain
        new_hops = []
        new_raws = []
        new_tags = []
        for index, segment in enumerate(segments, start=start):
            data = ring_bytes(segment, index)
            prev, tag = decode_hop(data, index, prev, domain)
            new_raws.append(data)
            new_hops.append(prev)
            new_tags.append(tag)
        return Chain._of(
            origin,
            known.hops + tuple(new_hops),
            known._raw + tuple(new_raws),
            known._hashes[:],
            known._tags + tuple(new_tags),
            text,
        )
    segments = text[len(CHAIN_PREFIX) :].split(".")
    raws = [ring_bytes(segments[0], 0)]
    origin = decode_origin(raws[0])
    domain = origin.trust_domain
    hops: list[HopRing] = []
    tags: list[int | None] = [None]
    prev = origin
    for index, segment in enumerate(segments[1:], start=1):
        data = ring_bytes(segment, index)
        prev, tag = decode_hop(data, index, prev, domain)
        raws.append(data)
        hops.append(prev)
        tags.append(tag)
    return Chain._of(origin, tuple(hops), tuple(raws), [], tuple(tags), text)
