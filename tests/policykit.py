"""Shared building blocks for the policy tests: identities, real verified paths."""

from __future__ import annotations

from collections.abc import Iterable

from chainkit import NOW, T0, identity, make_event

from trusthop.bundle import TrustBundle
from trusthop.chain import Chain
from trusthop.policy import Policy, loads_policy
from trusthop.sign import Identity, append_hop, mint_origin
from trusthop.verify import VerifiedContext, verify_chain

TD = "prod.example.com"
P = f"spiffe://{TD}"

GW = identity(f"{P}/ns/edge/sa/gateway", 11, "gw")
INV = identity(f"{P}/ns/shop/sa/inventory", 12, "inv")
INV_DEBUG = identity(f"{P}/ns/shop/sa/inventory-debug", 13, "inv-debug")
INV_V2 = identity(f"{P}/ns/shop/sa/inventory/v2", 14, "inv-v2")
CART = identity(f"{P}/ns/shopping/sa/cart", 15, "cart")
SHIP = identity(f"{P}/ns/logistics/sa/shipping", 16, "ship")
FRAUD = identity(f"{P}/ns/pay/sa/fraud", 17, "fraud")
BILLING = identity(f"{P}/ns/pay/sa/billing", 18, "billing")
PROBE = identity(f"{P}/ns/lab/sa/probe", 19, "probe")
UPPER = identity(f"{P}/ns/Shop/sa/inventory", 20, "upper")
EVIL_GW = identity("spiffe://prod.example.com.evil.org/ns/edge/sa/gateway", 21, "evil-gw")
EVIL_INV = identity("spiffe://prod.example.com.evil.org/ns/shop/sa/inventory", 22, "evil-inv")

ALL = (GW, INV, INV_DEBUG, INV_V2, CART, SHIP, FRAUD, BILLING, PROBE, UPPER, EVIL_GW, EVIL_INV)
BUNDLE = TrustBundle.of([i.bundle_key for i in ALL])

WIDE = frozenset({"orders:write", "shipping:create", "audit:write", "payments:charge"})


def path(
    *signers: Identity,
    dest: str = "kafka:orders",
    type_: str = "com.example.order.created",
    subject: str = "user:alice",
    scope: Iterable[str] = WIDE,
) -> VerifiedContext:
    """A really signed and verified chain: ``signers[0]`` mints the origin,
    then every signer (``signers[0]`` included, for its own hop) appends a hop
    in order; the last hop publishes ``type_`` to ``dest``."""
    origin_signer, hops = signers[0], signers[1:]
    origin = mint_origin(
        origin_signer,
        subject=subject,
        issuer="https://idp.example.com",
        credential="token",
        scope=scope,
        now=T0,
        ttl=3600,
        transaction_id="txn-policy",
    )
    chain = Chain(origin)
    event = make_event("e-0")
    for index, signer in enumerate(hops):
        last = index == len(hops) - 1
        event = make_event(f"e-{index}", type_=type_)
        chain = append_hop(
            signer,
            chain,
            event_digest=event.digest(),
            destination=dest if last else f"kafka:step-{index}",
            now=T0 + index,
        )
    return verify_chain(
        chain.encode(),
        bundle=BUNDLE,
        event_digest=event.digest(),
        destination=dest,
        now=NOW,
        event_id=event.id,
    )


def policy(text: str) -> Policy:
    return loads_policy(text, source="test")
