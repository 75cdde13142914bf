"""The demo scenario, independent of the transport it runs on.

Three legitimate orders travel gateway → ``kafka:orders`` → inventory →
``amqp:shipping/order.reserved`` → shipping → ``kafka:audit`` → auditor;
shipping also announces each parcel on ``kafka:tracking``, which two
consumer groups (mailer and tracker) read. Attacks and operator actions are
mixed in, each expected to end in the dead-letter destination with its
reason:

========================  ============  ============================
scenario                  consumer      expected reason
========================  ============  ============================
tampered-data             inventory     ``event_mismatch``
republished-copy          inventory     ``replayed``
replay-other-destination  shipping      ``wrong_destination``
widened-scope             shipping      ``scope_escalation``
ring-removed              auditor       ``broken_link``
unknown-key               auditor       ``unknown_key``
rogue-origin              auditor       ``unauthorized_actor``
unauthorized-publisher    auditor       ``unauthorized_actor``
narrowed-scope            auditor       ``insufficient_scope``
quarantine (x2)           shipping      ``segment_quarantined``
demoted                   auditor       ``insufficient_trust_level``
========================  ============  ============================

Delivery semantics (:data:`DELIVERY_SCENARIOS`), each message handled once:

* ``crash-before-commit``: inventory's consumer dies while handling order 1,
  before committing it; the group's next consumer gets it again as a
  redelivery, accepts it (no signature check: the ring was accepted before)
  and handles it once.
* ``republished-copy``: meanwhile an attacker re-publishes a copy of order 1
  (read from the topic) into ``kafka:orders``; the group accepted that ring
  already: ``replayed``, whichever of the two arrives first.
* ``retried-handler``: shipping's handler fails once for order 2's
  reservation (a carrier timeout); the message is retried through the retry
  queue and handled once, on attempt 2.
* ``broadcast``: the tracking events are read by two consumer groups; each
  verifies and handles each event once. Each group's verification finds
  the chain already checked in this process (the verified-prefix cache):
  the chain prefix of one parent is verified once per process, however many
  derived events and consumers share it.

Consumers accept origin rings from the gateway only: a compromised inventory
service has a valid key, but cannot start a chain for a user of its choosing.
Every consumer name keeps one replay store for the whole run (what replicas
sharing a Redis store do), so a restarted consumer recognises a redelivery.

Every verifier and every legitimate signer uses the demo policy
(``trusthop/demo/policy.toml``: trust levels, membership, per-destination
publishers, scope and path). The last two scenarios are policy *changes*:
messages are produced, wait in the broker, and the operator then swaps the
policy (quarantines the shop namespace; demotes shipping to ``untrusted``).
The waiting messages are judged by the new policy when they are consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from trusthop.bundle import TrustBundle
from trusthop.chain import Chain, HopRing
from trusthop.demo.bus import Bus, Received
from trusthop.errors import TrustError
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.memory import ConsumerCrash
from trusthop.pipeline import ChainSigner, ChainVerifier, TrustedEvent
from trusthop.policy import Policy, parse_policy
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
    "republished-copy": "replayed",
    "replay-other-destination": "wrong_destination",
    "widened-scope": "scope_escalation",
    "ring-removed": "broken_link",
    "unknown-key": "unknown_key",
    "rogue-origin": "unauthorized_actor",
    "unauthorized-publisher": "unauthorized_actor",
    "narrowed-scope": "insufficient_scope",
    "quarantine": "segment_quarantined",
    "demoted": "insufficient_trust_level",
}
# Scenarios with more than one message (every waiting message is refused).
QUARANTINED = 2
EXPECTED_COUNT = {"quarantine": QUARANTINED}
QUARANTINED_NAMESPACE = "shop"

CRASHED_ORDER = 1
"""The order whose first delivery crashes inventory's consumer before commit
(published and consumed alone, so the crashed consumer settled nothing)."""
REPUBLISHED_ORDER = CRASHED_ORDER
"""The order an attacker re-publishes into ``kafka:orders`` (while the
consumer that crashed on it is down)."""
FAILING_ORDER = 2
"""The order whose reservation fails shipping's handler once."""
BROADCAST_GROUPS = ("mailer", "tracker")
"""The consumer groups that both read ``kafka:tracking``."""

DELIVERY_SCENARIOS = {
    "crash-before-commit": "crashed before commit; redelivered, accepted, handled once",
    "republished-copy": "the copy rejected as replayed; the original handled once",
    "retried-handler": "handler failed once; retried, handled once on attempt 2",
    "broadcast": f"each of {len(BROADCAST_GROUPS)} groups verified and handled each event once",
}
"""Scenario → expected outcome."""

COUNTED_AS = {
    "crash-before-commit": "redeliveries",
    "retried-handler": "retries",
    "republished-copy": "replays",
}
"""The counter (of :attr:`DemoReport.counts`) each message of a scenario adds one to."""


def expected_counts() -> dict[str, int]:
    """``redeliveries``, ``retries`` and ``replays`` over all consumers: one
    per message of the scenario that causes it (:data:`COUNTED_AS`), nothing
    else (no other message is redelivered, retried or copied)."""
    counts = dict.fromkeys(COUNTED_AS.values(), 0)
    for scenario, counter in COUNTED_AS.items():
        counts[counter] += EXPECTED_COUNT.get(scenario, 1)
    return counts


def demo_policy_data() -> dict[str, Any]:
    """The demo policy file as parsed TOML (``trusthop/demo/policy.toml``)."""
    text = resources.files("trusthop.demo").joinpath("policy.toml").read_text("utf-8")
    return tomllib.loads(text)


def demo_policy(
    *,
    segments: list[Mapping[str, Any]] | None = None,
    members: list[Mapping[str, Any]] | None = None,
) -> Policy:
    """The demo policy, optionally with extra segment and member entries: the
    policies the demo's operator swaps in."""
    data = demo_policy_data()
    data["segments"] = [*data.get("segments", []), *(dict(s) for s in segments or ())]
    data["members"] = [*data.get("members", []), *(dict(m) for m in members or ())]
    return parse_policy(data, source="trusthop/demo/policy.toml")


@dataclass
class Delivery:
    """One handled delivery; ``kind`` is ``first``, ``redelivery`` or
    ``retry``, ``attempt`` the handler attempt that succeeded."""

    consumer: str
    event_id: str
    type: str
    subject: str
    actors: list[str]
    scope: list[str]
    transaction_id: str
    path: str
    weakest_level: str | None = None
    kind: str = "first"
    attempt: int = 1


@dataclass
class DeliveryScenario:
    """A delivery-semantics scenario: what was expected, what was seen."""

    scenario: str
    consumers: list[str]
    event_ids: list[str]
    expected: str
    observed: str
    ok: bool


@dataclass
class PolicyChange:
    """An operator's policy swap, made while ``waiting`` messages sat in ``destination``."""

    change: str
    destination: str
    waiting: int


@dataclass
class Rejected:
    consumer: str
    scenario: str
    reason: str
    event_id: str | None


@dataclass
class Refused:
    """A publish the producer's own policy check refused before signing."""

    producer: str
    scenario: str
    reason: str


@dataclass
class DemoReport:
    """What the demo observed; ``ok`` when every expectation held."""

    transport: str
    delivered: list[Delivery] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    policy_changes: list[PolicyChange] = field(default_factory=list)
    refused_at_send: list[Refused] = field(default_factory=list)
    scenarios: list[DeliveryScenario] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    """Over all consumers: ``redeliveries``, ``retries``, ``replays``
    (rejected or skipped copies), ``cache_hits`` and ``cache_misses``
    (verified-prefix cache), ``verified`` (accepted deliveries, any kind) and
    ``dead_lettered``."""

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
            "policy_changes": [dataclasses.asdict(c) for c in self.policy_changes],
            "refused_at_send": [dataclasses.asdict(r) for r in self.refused_at_send],
            "scenarios": [dataclasses.asdict(c) for c in self.scenarios],
            "counts": dict(self.counts),
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
    policy = demo_policy()
    verifier = ChainVerifier(cast.bundle, origin_actors=[GATEWAY], policy=policy)
    # The legitimate workloads check the policy before signing; attackers don't.
    gateway = ChainSigner(cast.gateway, policy=policy)
    inventory = ChainSigner(cast.inventory, policy=policy)
    shipper = ChainSigner(cast.shipping, policy=policy)

    def operator(change: str, new: Policy, destination: str, waiting: int) -> None:
        """Swap the policy everywhere; messages already queued get the new one."""
        report.policy_changes.append(PolicyChange(change, destination, waiting))
        verifier.policy = new
        for signer in (gateway, inventory, shipper):
            signer.policy = new

    orders = bus.kafka("orders")
    shipping = bus.amqp("shipping", "order.reserved")
    audit = bus.kafka("audit")
    tracking = bus.kafka("tracking")
    injected: dict[tuple[str, str | None], str] = {}
    crashed: list[str] = []  # event ids whose handler crashed the consumer
    failed: list[str] = []  # event ids whose handler failed once

    async def attack(consumer: str, destination: str, wire: WireEvent, scenario: str) -> None:
        """Write ``wire`` as an attacker would and remember what to expect."""
        await bus.inject(destination, wire)
        injected[(consumer, wire.id)] = scenario

    captured: list[TrustedEvent] = []

    def record(consumer: str, received: Received) -> None:
        trusted = received.trusted
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
                None if trusted.decision is None else trusted.decision.weakest_level,
                received.kind,
                received.attempt,
            )
        )

    # 1. The gateway verified each user's token (elsewhere) and mints an origin.
    now = time.time()

    async def place_order(n: int) -> None:
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
            await attack("inventory", orders, tampered, "tampered-data")
        else:
            await bus.publish(gateway, orders, order, origin=origin)

    # 2. Inventory reserves stock and tells shipping, narrowing the scope.

    async def on_order(received: Received) -> None:
        trusted = received.trusted
        if _order_of(trusted) == CRASHED_ORDER and not crashed:
            crashed.append(received.event_id)
            seen_in_topic.append(trusted.wire)  # what an attacker reads from the topic
            raise ConsumerCrash  # the process dies mid-handler
        record("inventory", received)
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

    async def consume_orders(count: int) -> None:
        await bus.consume(
            orders, consumer="inventory", verifier=verifier, handler=on_order, count=count
        )

    # The first order arrives alone. Inventory's consumer dies while handling
    # it, before reserving anything or committing.
    seen_in_topic: list[WireEvent] = []
    await place_order(CRASHED_ORDER)
    with contextlib.suppress(ConsumerCrash):
        await consume_orders(1)
    owed = len(crashed)  # the crashed order is still uncommitted
    for n in range(1, ORDERS + 1):
        if n != CRASHED_ORDER:
            await place_order(n)
    # Attack: while inventory is down, a copy of the order it was handling
    # (read from the topic: same bytes, same chain, same destination) is
    # re-published into the topic.
    for wire in seen_in_topic:
        await attack("inventory", orders, wire, "republished-copy")
    # The group's next consumer gets the crashed order again (a redelivery),
    # the other orders, and the copy (replayed, in whichever order the
    # partitions deliver them: the crashed delivery was already remembered).
    await consume_orders(owed + ORDERS - 1 + len(seen_in_topic))

    # Attack: a valid event copied from kafka:orders into the shipping exchange.
    replay = captured[0].wire
    await attack("shipping", shipping, replay, "replay-other-destination")

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
        key_tag=cast.inventory.key_tag,
        iat=prev.iat,
        exp=prev.exp,
        scope=prev.scope | {"payments:refund"},
        event_digest=event.digest(),
        destination=shipping,
        consumed_event_id=parent.event_id,
    )
    message = parent.chain.next_signing_input(hop)
    hop = dataclasses.replace(hop, signature=cast.inventory.key.sign(message))
    await attack(
        "shipping", shipping, _with_chain(event, parent.chain.appended(hop)), "widened-scope"
    )

    # 3. Shipping schedules the parcel, reports to the audit topic and
    # announces the parcel on the tracking topic: two derived events of one
    # verified parent. Its handler fails once (a carrier timeout) for one
    # reservation, which is retried.
    at_shipping: list[TrustedEvent] = []

    async def on_reserved(received: Received) -> None:
        trusted = received.trusted
        order = _order_of(trusted)
        if order == FAILING_ORDER and received.attempt == 1 and not failed:
            failed.append(received.event_id)
            raise TimeoutError("the carrier API timed out")
        record("shipping", received)
        at_shipping.append(trusted)
        scheduled = _event(
            "com.example.shipping.scheduled",
            "/shipping",
            {"order": order, "carrier": "ACME"},
        )
        await bus.publish(shipper, audit, scheduled, parent=trusted.context, scope=["audit:write"])
        dispatched = _event(
            "com.example.shipping.dispatched",
            "/shipping",
            {"order": order, "parcel": f"PARCEL-{order}"},
        )
        await bus.publish(
            shipper, tracking, dispatched, parent=trusted.context, scope=["shipping:create"]
        )

    await bus.consume(
        shipping, consumer="shipping", verifier=verifier, handler=on_reserved, count=ORDERS - 1 + 2
    )

    # Broadcast: two consumer groups read the tracking topic at the same
    # time; each verifies and handles every event once.
    def on_tracking(group: str) -> Callable[[Received], Awaitable[None]]:
        async def handle(received: Received) -> None:
            record(group, received)

        return handle

    await asyncio.gather(
        *(
            bus.consume(
                tracking,
                consumer=group,
                verifier=verifier,
                handler=on_tracking(group),
                count=ORDERS - 1,
            )
            for group in BROADCAST_GROUPS
        )
    )

    # Attack: drop the gateway's hop ring from a chain seen at shipping (the
    # attribute is "2.<ring 0>.<ring 1>...": the third dot-separated part goes).
    seen = at_shipping[0].wire.chain
    assert seen is not None
    parts = seen.split(".")
    cut = WireEvent(
        dict(at_shipping[0].wire.attributes),
        at_shipping[0].wire.data,
        ".".join(parts[:2] + parts[3:]),
    )
    cut.attributes["id"] = "ring-removed-1"
    await attack("auditor", audit, cut, "ring-removed")

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
    await attack("auditor", audit, forged, "unknown-key")

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
    # (A compromised workload skips its own policy check.)
    unpoliced_inventory = ChainSigner(cast.inventory)
    rogue_chain = unpoliced_inventory.seal(
        _event(
            "com.example.shipping.scheduled",
            "/inventory",
            {"order": 1, "refund": 999},
            "rogue-origin-1",
        ),
        destination=audit,
        origin=inventory_origin,
    )
    await attack("auditor", audit, rogue_chain, "rogue-origin")

    # Policy, producer side: inventory's own signer checks the same policy and
    # refuses before signing, with the reason the auditor would give.
    try:
        inventory.seal(
            _event("com.example.shipping.scheduled", "/inventory", {"order": 1}, "refused-1"),
            destination=audit,
            parent=captured[0].context,
            scope=["audit:write"],
        )
    except TrustError as error:
        report.refused_at_send.append(
            Refused("inventory", "unauthorized-publisher", error.reason.value)
        )

    # Policy: inventory (valid key, valid chain, but no policy check of its
    # own) reports to the audit topic itself; only logistics may publish there.
    skipped = unpoliced_inventory.seal(
        _event(
            "com.example.shipping.scheduled",
            "/inventory",
            {"order": 1, "carrier": "NONE"},
            "unauthorized-publisher-1",
        ),
        destination=audit,
        parent=captured[0].context,
        scope=["audit:write"],
    )
    await attack("auditor", audit, skipped, "unauthorized-publisher")

    # Policy: shipping narrows its scope below what the audit topic requires.
    unpoliced_shipping = ChainSigner(cast.shipping)
    narrow = unpoliced_shipping.seal(
        _event(
            "com.example.shipping.scheduled",
            "/shipping",
            {"order": 1, "carrier": "ACME"},
            "narrowed-scope-1",
        ),
        destination=audit,
        parent=at_shipping[0].context,
        scope=["shipping:create"],
    )
    await attack("auditor", audit, narrow, "narrowed-scope")

    # 4. The auditor reads the audit topic and keeps every full chain.
    async def on_audit(received: Received) -> None:
        record("auditor", received)

    await bus.consume(
        audit, consumer="auditor", verifier=verifier, handler=on_audit, count=ORDERS - 1 + 5
    )

    # 5. Quarantine: inventory publishes more reservations (allowed when sent);
    # while they wait in the shipping queue the operator quarantines the shop
    # namespace. Shipping then consumes them under the new policy.
    for n in range(1, QUARANTINED + 1):
        parent_delivery = captured[(n - 1) % len(captured)]
        late = _event(
            "com.example.inventory.reserved",
            "/inventory",
            {"order": _order_of(parent_delivery), "reserved": True},
            f"quarantine-{n}",
        )
        await bus.publish(
            inventory,
            shipping,
            late,
            parent=parent_delivery.context,
            scope=["shipping:create", "audit:write"],
        )
        injected[("shipping", late.get_id())] = "quarantine"
    operator(
        f"quarantine namespace {QUARANTINED_NAMESPACE}",
        demo_policy(
            segments=[
                {"name": "shop-quarantine", "namespace": QUARANTINED_NAMESPACE, "deny": ["*"]}
            ]
        ),
        shipping,
        QUARANTINED,
    )

    async def on_late(received: Received) -> None:
        record("shipping", received)  # not expected: _check reports it

    await bus.consume(
        shipping, consumer="shipping", verifier=verifier, handler=on_late, count=QUARANTINED
    )
    operator(f"lift the quarantine of {QUARANTINED_NAMESPACE}", policy, shipping, 0)

    # 6. Demotion: shipping reports once more; while the event waits in the
    # audit topic the operator demotes shipping below the required level.
    late_report = _event(
        "com.example.shipping.scheduled",
        "/shipping",
        {"order": _order_of(at_shipping[0]), "carrier": "ACME"},
        "demoted-1",
    )
    await bus.publish(
        shipper, audit, late_report, parent=at_shipping[0].context, scope=["audit:write"]
    )
    injected[("auditor", late_report.get_id())] = "demoted"
    operator(
        "demote shipping to untrusted",
        demo_policy(members=[{"id": SHIPPING, "level": "untrusted"}]),
        audit,
        1,
    )
    await bus.consume(audit, consumer="auditor", verifier=verifier, handler=on_audit, count=1)
    operator("restore shipping to internal", policy, audit, 0)

    for consumer, destination in (
        ("inventory", orders),
        ("shipping", shipping),
        ("auditor", audit),
        *((group, tracking) for group in BROADCAST_GROUPS),
    ):
        for letter in await bus.dead_letters(destination, consumer=consumer):
            scenario = injected.get((consumer, letter.event_id), "unexpected")
            report.rejected.append(Rejected(consumer, scenario, letter.reason, letter.event_id))
    counters = bus.counters
    report.counts = {
        "redeliveries": counters["redelivered"],
        "retries": counters["retried"],
        "replays": counters["replayed"],  # copies rejected or skipped
        "cache_hits": counters["cache_hits"],
        "cache_misses": counters["cache_misses"],
        "verified": counters["verified"],
        "dead_lettered": len(report.rejected),
    }
    report.scenarios = _delivery_scenarios(report, crashed=crashed, failed=failed)
    _check(report)
    return report


def _delivery_scenarios(
    report: DemoReport, *, crashed: list[str], failed: list[str]
) -> list[DeliveryScenario]:
    """What the delivery-semantics scenarios observed (see :data:`DELIVERY_SCENARIOS`)."""

    def handled(consumer: str, event_id: str) -> list[Delivery]:
        return [d for d in report.delivered if d.consumer == consumer and d.event_id == event_id]

    def kinds(deliveries: list[Delivery]) -> str:
        return ", ".join(f"{d.kind} (attempt {d.attempt})" for d in deliveries) or "none"

    out: list[DeliveryScenario] = []
    crash_id = f"order-{CRASHED_ORDER}"
    seen = handled("inventory", crash_id)
    out.append(
        DeliveryScenario(
            "crash-before-commit",
            ["inventory"],
            [crash_id],
            DELIVERY_SCENARIOS["crash-before-commit"],
            f"{len(crashed)} crash(es); handled {len(seen)}x as {kinds(seen)}",
            crashed == [crash_id] and [d.kind for d in seen] == ["redelivery"],
        )
    )
    copy_id = f"order-{REPUBLISHED_ORDER}"
    seen = handled("inventory", copy_id)
    verdicts = [r.reason for r in report.rejected if r.scenario == "republished-copy"]
    out.append(
        DeliveryScenario(
            "republished-copy",
            ["inventory"],
            [copy_id],
            DELIVERY_SCENARIOS["republished-copy"],
            f"copy dead-lettered as {', '.join(verdicts) or 'nothing'}; "
            f"handled {len(seen)}x as {kinds(seen)}",
            verdicts == [EXPECTED["republished-copy"]] and len(seen) == 1,
        )
    )
    seen = [d for event_id in failed for d in handled("shipping", event_id)]
    out.append(
        DeliveryScenario(
            "retried-handler",
            ["shipping"],
            list(failed),
            DELIVERY_SCENARIOS["retried-handler"],
            f"{len(failed)} failure(s); handled {len(seen)}x as {kinds(seen)}",
            len(failed) == 1 and [(d.kind, d.attempt) for d in seen] == [("retry", 2)],
        )
    )
    per_group = {
        group: sorted(d.event_id for d in report.delivered if d.consumer == group)
        for group in BROADCAST_GROUPS
    }
    events = sorted(set().union(*map(set, per_group.values())))
    out.append(
        DeliveryScenario(
            "broadcast",
            list(BROADCAST_GROUPS),
            events,
            DELIVERY_SCENARIOS["broadcast"],
            "; ".join(f"{g} handled {len(ids)} of {len(events)}" for g, ids in per_group.items()),
            len(events) == ORDERS - 1 and all(ids == events for ids in per_group.values()),
        )
    )
    return out


def _check(report: DemoReport) -> None:
    for outcome in report.scenarios:
        if not outcome.ok:
            report.problems.append(
                f"{outcome.scenario}: expected {outcome.expected}, got {outcome.observed}"
            )
    for name, want_count in expected_counts().items():
        if report.counts.get(name) != want_count:
            report.problems.append(f"{name}: {report.counts.get(name)}, expected {want_count}")
    got: dict[str, list[str]] = {}
    for r in report.rejected:
        got.setdefault(r.scenario, []).append(r.reason)
    for scenario, reason in EXPECTED.items():
        want = [reason] * EXPECTED_COUNT.get(scenario, 1)
        if got.get(scenario) != want:
            report.problems.append(f"{scenario}: expected {want}, got {got.get(scenario)}")
    total = sum(EXPECTED_COUNT.get(scenario, 1) for scenario in EXPECTED)
    if len(report.rejected) != total:
        report.problems.append(f"{len(report.rejected)} rejections, expected {total}")
    # Each legitimate event handled exactly once by each of its consumers.
    for consumer in ("inventory", "shipping", "auditor", *BROADCAST_GROUPS):
        ids = [d.event_id for d in report.delivered if d.consumer == consumer]
        if len(ids) != ORDERS - 1 or len(set(ids)) != len(ids):
            report.problems.append(f"{consumer} handled {ids}, expected {ORDERS - 1} events once")
    audited = [d for d in report.delivered if d.consumer == "auditor"]
    for d in audited:
        if d.actors != [GATEWAY, GATEWAY, INVENTORY, SHIPPING]:
            report.problems.append(f"{d.event_id}: unexpected path {d.actors}")
    for d in report.delivered:
        # Only the gateway (payments) signed what inventory reads; later hops are internal.
        if d.weakest_level != ("payments" if d.consumer == "inventory" else "internal"):
            report.problems.append(f"{d.event_id}: weakest level {d.weakest_level}")
    sent = [(r.scenario, r.reason) for r in report.refused_at_send]
    if sent != [("unauthorized-publisher", EXPECTED["unauthorized-publisher"])]:
        report.problems.append(f"producer-side refusal: {sent}, expected the consumer's reason")
    if len(report.policy_changes) != 4:
        report.problems.append(f"{len(report.policy_changes)} policy changes, expected 4")
