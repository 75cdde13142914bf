"""The demo scenario, independent of the transport it runs on.

Three legitimate orders travel gateway → ``kafka:orders`` → inventory →
``amqp:shipping/order.reserved`` → shipping → ``kafka:audit`` → auditor.
Five attacks are mixed in, each expected to be dead-lettered with its reason:

========================  ============  =====================
scenario                  consumer      expected reason
========================  ============  =====================
tampered-data             inventory     ``event_mismatch``
replay-other-destination  shipping      ``wrong_destination``
widened-scope             shipping      ``scope_escalation``
ring-removed              auditor       ``broken_link``
unknown-key               auditor       ``unknown_key``
rogue-origin              auditor       ``unauthorized_actor``
========================  ============  =====================

Consumers accept origin rings from the gateway only: a compromised inventory
service has a valid key, but cannot start a chain for a user of its choosing.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from trusthop.bundle import TrustBundle
from trusthop.chain import Chain, HopRing
from trusthop.demo.bus import Bus
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.pipeline import ChainSigner, ChainVerifier, TrustedEvent
from trusthop.render import chain_path
from trusthop.sign import Identity, mint_origin

DOMAIN = "spiffe://prod.example.com"
GATEWAY = f"{DOMAIN}/ns/edge/sa/gateway"
INVENTORY = f"{DOMAIN}/ns/shop/sa/inventory"
SHIPPING = f"{DOMAIN}/ns/logistics/sa/shipping"
ROGUE = f"{DOMAIN}/ns/shop/sa/inventory-debug"
USER_SCOPE = ("orders:write", "inventory:reserve", "shipping:create", "audit:write")
ORDERS = 3

EXPECTED = {
    "tampered-data": "event_mismatch",
    "replay-other-destination": "wrong_destination",
    "widened-scope": "scope_escalation",
    "ring-removed": "broken_link",
    "unknown-key": "unknown_key",
    "rogue-origin": "unauthorized_actor",
}


@dataclass
class Delivery:
    consumer: str
    event_id: str
    type: str
    subject: str
    actors: list[str]
    scope: list[str]
    transaction_id: str
    path: str


@dataclass
class Rejected:
    consumer: str
    scenario: str
    reason: str
    event_id: str | None


@dataclass
class DemoReport:
    """What the demo observed; ``ok`` when every expectation held."""

    transport: str
    delivered: list[Delivery] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "ok": self.ok,
            "delivered": [dataclasses.asdict(d) for d in self.delivered],
            "rejected": [dataclasses.asdict(r) for r in self.rejected],
            "problems": self.problems,
        }


class _Cast:
    """The demo's workloads: keys, signers, and the bundle that trusts them."""

    def __init__(self) -> None:
        self.gateway = Identity.create(GATEWAY, SigningKey.generate())
        self.inventory = Identity.create(INVENTORY, SigningKey.generate())
        self.shipping = Identity.create(SHIPPING, SigningKey.generate())
        self.rogue = Identity.create(ROGUE, SigningKey.generate())  # not in the bundle
        self.bundle = TrustBundle.of(
            [self.gateway.bundle_key, self.inventory.bundle_key, self.shipping.bundle_key]
        )


def _event(
    type_: str, source: str, data: dict[str, Any], event_id: str | None = None
) -> CloudEvent:
    attributes: dict[str, Any] = {
        "type": type_,
        "source": source,
        "id": event_id or str(uuid.uuid4()),
    }
    return CloudEvent(attributes, data)


def _order_of(trusted: TrustedEvent) -> int:
    data = trusted.event.get_data()
    order = data.get("order") if isinstance(data, dict) else None
    if not isinstance(order, int):
        raise ValueError("not an order event")
    return order


def _with_data(wire: WireEvent, data: bytes) -> WireEvent:
    return WireEvent(dict(wire.attributes), data, wire.chain)


def _with_chain(wire: WireEvent, chain: Chain) -> WireEvent:
    return WireEvent(dict(wire.attributes), wire.data, chain.encode())


async def run_demo(bus: Bus) -> DemoReport:
    """Run the whole flow on ``bus`` and check every expectation."""
    cast = _Cast()
    report = DemoReport(bus.name)
    verifier = ChainVerifier(cast.bundle, origin_actors=[GATEWAY])
    orders = bus.kafka("orders")
    shipping = bus.amqp("shipping", "order.reserved")
    audit = bus.kafka("audit")
    injected: dict[tuple[str, str | None], str] = {}
    captured: list[TrustedEvent] = []

    def record(consumer: str, trusted: TrustedEvent) -> None:
        ctx = trusted.context
        report.delivered.append(
            Delivery(
                consumer,
                trusted.event.get_id(),
                trusted.event.get_type(),
                ctx.subject,
                list(ctx.actors),
                sorted(ctx.scope),
                ctx.transaction_id,
                chain_path(ctx.chain),
            )
        )

    # 1. The gateway verified each user's token (elsewhere) and mints an origin.
    gateway = ChainSigner(cast.gateway)
    now = time.time()
    for n in range(1, ORDERS + 1):
        origin = mint_origin(
            cast.gateway,
            subject=f"user:customer-{n}",
            issuer="https://idp.example.com",
            credential=f"eyJ.demo-token-{n}.sig",
            scope=USER_SCOPE,
            now=now,
            amr=["pwd", "otp"],
        )
        order = _event(
            "com.example.order.created",
            "/gateway",
            {"order": n, "sku": "SKU-42", "quantity": n},
            f"order-{n}",
        )
        if n == ORDERS:
            # Attack: an attacker with write access to the topic re-writes the
            # amount of a validly signed order.
            wire = gateway.seal(order, destination=orders, origin=origin)
            tampered = _with_data(wire, b'{"order":3,"quantity":300,"sku":"SKU-42"}')
            await bus.inject(orders, tampered)
            injected[("inventory", tampered.id)] = "tampered-data"
        else:
            await bus.publish(gateway, orders, order, origin=origin)

    # 2. Inventory reserves stock and tells shipping, narrowing the scope.
    inventory = ChainSigner(cast.inventory)

    async def on_order(trusted: TrustedEvent) -> None:
        record("inventory", trusted)
        captured.append(trusted)
        reserved = _event(
            "com.example.inventory.reserved",
            "/inventory",
            {"order": _order_of(trusted), "reserved": True},
        )
        await bus.publish(
            inventory,
            shipping,
            reserved,
            parent=trusted.context,
            scope=["shipping:create", "audit:write"],
        )

    await bus.consume(
        orders, consumer="inventory", verifier=verifier, handler=on_order, count=ORDERS
    )

    # Attack: a valid event copied from kafka:orders into the shipping exchange.
    replay = captured[0].wire
    await bus.inject(shipping, replay)
    injected[("shipping", replay.id)] = "replay-other-destination"

    # Attack: a workload with a valid key signs a hop that widens its scope
    # (append_hop refuses to, so the ring is built by hand).
    parent = captured[0].context
    event = WireEvent.from_cloudevent(
        _event(
            "com.example.inventory.reserved", "/inventory", {"order": 1, "refund": 999}, "widened-1"
        )
    )
    prev = parent.chain.newest
    hop = HopRing(
        actor=cast.inventory.actor,
        kid=cast.inventory.kid,
        iat=prev.iat,
        exp=prev.exp,
        scope=prev.scope | {"payments:refund"},
        prev_hash=parent.chain.hashes()[-1],
        event_digest=event.digest(),
        destination=shipping,
        consumed_event_id=parent.event_id,
    )
    hop = dataclasses.replace(hop, signature=cast.inventory.key.sign(hop.signing_input()))
    await bus.inject(shipping, _with_chain(event, parent.chain.appended(hop)))
    injected[("shipping", event.id)] = "widened-scope"

    # 3. Shipping schedules the parcel and reports to the audit topic.
    shipper = ChainSigner(cast.shipping)
    at_shipping: list[TrustedEvent] = []

    async def on_reserved(trusted: TrustedEvent) -> None:
        record("shipping", trusted)
        at_shipping.append(trusted)
        scheduled = _event(
            "com.example.shipping.scheduled",
            "/shipping",
            {"order": _order_of(trusted), "carrier": "ACME"},
        )
        await bus.publish(shipper, audit, scheduled, parent=trusted.context, scope=["audit:write"])

    await bus.consume(
        shipping, consumer="shipping", verifier=verifier, handler=on_reserved, count=ORDERS - 1 + 2
    )

    # Attack: drop the gateway's hop ring from a chain seen at shipping.
    seen = at_shipping[0].wire.chain
    assert seen is not None
    full = verifier.verify(at_shipping[0].wire, shipping).context.chain
    cut = WireEvent(
        dict(at_shipping[0].wire.attributes),
        at_shipping[0].wire.data,
        Chain(full.origin, full.hops[1:]).encode(),
    )
    cut.attributes["id"] = "ring-removed-1"
    await bus.inject(audit, cut)
    injected[("auditor", cut.id)] = "ring-removed"

    # Attack: a workload whose key is not in the bundle extends a valid chain
    # it copied from the shipping queue.
    rogue = ChainSigner(cast.rogue)
    forged = rogue.seal(
        _event(
            "com.example.shipping.scheduled",
            "/shipping",
            {"order": 1, "carrier": "EVIL"},
            "unknown-key-1",
        ),
        destination=audit,
        parent=at_shipping[-1].context,
    )
    await bus.inject(audit, forged)
    injected[("auditor", forged.id)] = "unknown-key"

    # Attack: a workload with a valid key (inventory) mints its own origin for
    # an administrator; only the gateway may start chains.
    inventory_origin = mint_origin(
        cast.inventory,
        subject="user:admin",
        issuer="https://idp.example.com",
        credential="none",
        scope=["audit:write", "payments:refund"],
        now=now,
    )
    rogue_chain = inventory.seal(
        _event(
            "com.example.shipping.scheduled",
            "/inventory",
            {"order": 1, "refund": 999},
            "rogue-origin-1",
        ),
        destination=audit,
        origin=inventory_origin,
    )
    await bus.inject(audit, rogue_chain)
    injected[("auditor", rogue_chain.id)] = "rogue-origin"

    # 4. The auditor reads the audit topic and keeps every full chain.
    async def on_audit(trusted: TrustedEvent) -> None:
        record("auditor", trusted)

    await bus.consume(
        audit, consumer="auditor", verifier=verifier, handler=on_audit, count=ORDERS - 1 + 3
    )

    for consumer, destination in (
        ("inventory", orders),
        ("shipping", shipping),
        ("auditor", audit),
    ):
        for letter in await bus.dead_letters(destination, consumer=consumer):
            scenario = injected.get((consumer, letter.event_id), "unexpected")
            report.rejected.append(Rejected(consumer, scenario, letter.reason, letter.event_id))
    _check(report)
    return report


def _check(report: DemoReport) -> None:
    got = {r.scenario: r.reason for r in report.rejected}
    for scenario, reason in EXPECTED.items():
        if got.get(scenario) != reason:
            report.problems.append(f"{scenario}: expected {reason}, got {got.get(scenario)}")
    if len(report.rejected) != len(EXPECTED):
        report.problems.append(f"{len(report.rejected)} rejections, expected {len(EXPECTED)}")
    audited = [d for d in report.delivered if d.consumer == "auditor"]
    if len(audited) != ORDERS - 1:
        report.problems.append(f"auditor saw {len(audited)} events, expected {ORDERS - 1}")
    for d in audited:
        if d.actors != [GATEWAY, GATEWAY, INVENTORY, SHIPPING]:
            report.problems.append(f"{d.event_id}: unexpected path {d.actors}")
