"""The worked example of ``docs/wire-format.md``, computed by the real code.

Fixed seeds, times and identifiers make every byte reproducible (Ed25519
signatures are deterministic). ``tests/test_wire_example.py`` checks that the
document shows exactly what this module computes; ``python -m
trusthop.example`` prints it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from trusthop.canonical import pack
from trusthop.chain import Chain
from trusthop.digest import signed_attributes
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.rings import RING_HASH_DOMAIN, SIGNATURE_BYTES
from trusthop.sign import Identity, append_hop, mint_origin

GATEWAY_SEED = bytes(range(32))
GATEWAY = "spiffe://prod.example.com/ns/edge/sa/gateway"
IAT = 1767225600  # 2026-01-01T00:00:00Z


def build() -> dict[str, Any]:
    """Every intermediate value of the example, as hex or text."""
    gateway = Identity.create(GATEWAY, SigningKey.from_seed(GATEWAY_SEED), kid="gw-1")
    origin = mint_origin(
        gateway,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="example-token",
        scope=["orders:write", "shipping:create"],
        now=IAT,
        ttl=3600,
        transaction_id="txn-0001",
    )
    from datetime import UTC, datetime

    event = CloudEvent(
        {
            "specversion": "1.0",
            "id": "order-1",
            "source": "/gateway",
            "type": "com.example.order.created",
            "time": datetime(2026, 1, 1, tzinfo=UTC),
            "datacontenttype": "application/json",
        },
        {"order": 1},
    )
    wire = WireEvent.from_cloudevent(event)
    digest_input = pack(["trusthop/v1/event", signed_attributes(wire.attributes), wire.data])
    chain = append_hop(
        gateway,
        Chain(origin),
        event_digest=wire.digest(),
        destination="kafka:orders",
        now=IAT,
        ttl=600,
    )
    hop = chain.hops[0]
    origin_ring, hop_ring = chain.ring_bytes
    origin_hash, hop_hash = chain.hashes()
    return {
        "public_key": gateway.key.public_key.raw.hex(),
        "key_tag": f"{gateway.key.public_key.key_tag:04x}",
        "attributes": signed_attributes(wire.attributes),
        "data": (wire.data or b"").decode(),
        "digest_input": digest_input.hex(),
        "event_digest": wire.digest().hex(),
        "origin_body": origin_ring[SIGNATURE_BYTES:].hex(),
        "origin_signing_input": chain.signing_input(0).hex(),
        "origin_signature": origin.signature.hex(),
        "origin_hash_input": (RING_HASH_DOMAIN + origin_ring).hex(),
        "origin_hash": origin_hash.hex(),
        "hop_body": hop_ring[SIGNATURE_BYTES:].hex(),
        "hop_signing_input": chain.signing_input(1).hex(),
        "hop_signature": hop.signature.hex(),
        "hop_hash_input": (RING_HASH_DOMAIN + origin_hash + hop_ring).hex(),
        "hop_hash": hop_hash.hex(),
        "trustchain": chain.encode(),
        "credential_hash": hashlib.sha256(b"example-token").hexdigest(),
    }


def main() -> None:
    for name, value in build().items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
