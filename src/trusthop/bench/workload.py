"""What the benchmark signs and verifies: realistic identities, events and chains.

Every figure uses the same shapes a deployment has: SPIFFE IDs of real
length (``spiffe://prod.example.com/ns/shop/sa/service-03``), a UUID subject,
a realm issuer, a two-entry scope, and 1 KiB of JSON data. Keys come
from fixed seeds so two runs sign the same bytes (event ids and times differ).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from trusthop.bundle import TrustBundle
from trusthop.chain import Chain, OriginRing, decode_chain
from trusthop.destination import kafka_destination
from trusthop.digest import canonical_json
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.pipeline import ChainVerifier
from trusthop.sign import Identity, append_hop, mint_origin
from trusthop.verify import Limits, VerifiedContext

TRUST_DOMAIN = "prod.example.com"
EDGE_ACTOR = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"
ISSUER = "https://idp.example.com/realms/prod"
SUBJECT = "user:3f6c2a4e-8d1b-4c55-9a0e-2b7f1d9c8e41"
SCOPE = ("orders:read", "orders:write")
DATA_BYTES = 1024
MAX_HOPS = 17  # the deepest chain built (verify_cold[16] plus one new hop)


def service_actor(index: int) -> str:
    """The SPIFFE ID of the ``index``-th service on the path."""
    return f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/service-{index:02d}"


def event_data(size: int = DATA_BYTES) -> dict[str, Any]:
    """A JSON object whose canonical JSON is exactly ``size`` bytes."""
    data: dict[str, Any] = {"order": "ord-000042", "items": 3, "note": ""}
    data["note"] = "x" * (size - len(canonical_json(data)))
    assert len(canonical_json(data)) == size
    return data


def new_event(kind: str = "com.example.order.created", data: Any = None) -> CloudEvent:
    """A CloudEvent with a fresh id and 1 KiB of JSON data."""
    return CloudEvent(
        {
            "type": kind,
            "source": "/shop/orders",
            "id": str(uuid.uuid4()),
            "subject": "order-42",
            "time": datetime(2026, 1, 1, tzinfo=UTC),
            "datacontenttype": "application/json",
        },
        event_data() if data is None else data,
    )


@dataclass
class Sealed:
    """One signed event: its wire form (chain attached), where it was
    published to, and its decoded chain."""

    wire: WireEvent
    destination: str
    chain: Chain

    @property
    def encoded(self) -> str:
        assert self.wire.chain is not None
        return self.wire.chain


@dataclass
class Workload:
    """Identities, bundle and origin shared by every figure of one run."""

    now: float = field(default_factory=time.time)
    edge: Identity = field(init=False)
    services: list[Identity] = field(init=False)
    bundle: TrustBundle = field(init=False)
    origin: OriginRing = field(init=False)
    token: str = "eyJhbGciOiJSUzI1NiJ9.user-token.signature"  # noqa: S105 - a stand-in

    def __post_init__(self) -> None:
        self.edge = Identity.create(EDGE_ACTOR, SigningKey.from_seed(b"\x01" * 32))
        self.services = [
            Identity.create(service_actor(i), SigningKey.from_seed(bytes([i + 2]) * 32))
            for i in range(MAX_HOPS + 1)
        ]
        self.bundle = TrustBundle.of([i.bundle_key for i in (self.edge, *self.services)])
        self.origin = self.mint()

    def mint(self, scope: tuple[str, ...] = SCOPE) -> OriginRing:
        """A fresh origin ring (new transaction id)."""
        return mint_origin(
            self.edge,
            subject=SUBJECT,
            issuer=ISSUER,
            credential=self.token,
            scope=scope,
            now=self.now,
        )

    def verifier(self, **options: Any) -> ChainVerifier:
        """A verifier that trusts this workload's edge to mint origins."""
        return ChainVerifier(self.bundle, origin_actors=[EDGE_ACTOR], **options)

    def signer_of(self, hop: int) -> Identity:
        """Who signs hop ``hop`` (1-based): the edge signs the first hop."""
        return self.edge if hop == 1 else self.services[hop - 2]

    def extend(
        self,
        parent: Chain,
        *,
        destination: str,
        event: CloudEvent | None = None,
        consumed: str | None = None,
        scope: tuple[str, ...] | None = None,
    ) -> Sealed:
        """Append the next hop for ``event`` published to ``destination``."""
        hop = len(parent.hops) + 1
        wire = WireEvent.from_cloudevent(event if event is not None else new_event())
        chain = append_hop(
            self.signer_of(hop),
            parent,
            event_digest=wire.digest(),
            destination=destination,
            now=self.now,
            consumed_event_id=consumed,
            scope=scope,
        )
        wire.chain = chain.encode()
        return Sealed(wire, destination, chain)

    def chain(
        self,
        hops: int,
        *,
        last_destination: str | None = None,
        consumed: bool = False,
        narrow: bool = False,
    ) -> Sealed:
        """A chain of ``hops`` hop rings after the origin (``hops + 1`` signatures),
        each hop publishing a new event derived from the one before; with
        ``consumed`` each hop also records the id of the event it consumed,
        with ``narrow`` each hop after the first drops a scope entry of the
        first hop's (which adds ``narrowing:<n>`` entries for them)."""
        scope = (*SCOPE, *(f"narrowing:{i:02d}" for i in range(hops)))
        sealed = self.extend(
            Chain(self.origin if not narrow else self.mint(scope)),
            destination=kafka_destination("t01"),
        )
        for hop in range(2, hops + 1):
            destination = kafka_destination(f"t{hop:02d}")
            if hop == hops and last_destination is not None:
                destination = last_destination
            sealed = self.extend(
                sealed.chain,
                destination=destination,
                consumed=sealed.wire.id if consumed else None,
                scope=scope[: len(scope) - hop + 1] if narrow else None,
            )
        return sealed

    def context(self, sealed: Sealed) -> VerifiedContext:
        """The verified context of ``sealed`` (a consumer's parent for derived events)."""
        return self.verifier(cache_size=0).verify(sealed.wire, sealed.destination).context

    def decoded(self, sealed: Sealed) -> Chain:
        """``sealed``'s chain decoded from its wire text, as a consumer holds it."""
        limits = Limits()
        return decode_chain(sealed.encoded, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
