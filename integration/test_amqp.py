"""TrustedPublisher and TrustedWorker against a real RabbitMQ server.

Every test uses its own exchanges, queues and dead-letter exchange (named from
``unique_name``) and deletes them at the end. Attacks are published with plain
aio-pika, as an attacker with write access to the broker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    HeadersType,
)
from cloudevents.core.v1.event import CloudEvent
from pamqp.commands import Basic

from trusthop.amqp import (
    H_HEADERS_BYTES,
    H_HEADERS_DROPPED,
    Delivery,
    PublishRefused,
    TrustedPublisher,
    TrustedWorker,
    dead_letter_queue_name,
    retry_queue_name,
    routing_key_matches,
)
from trusthop.bindings.amqp import encode_amqp
from trusthop.bindings.structured import CONTENT_TYPE
from trusthop.bundle import TrustBundle
from trusthop.chain import Chain, HopRing, OriginRing
from trusthop.destination import amqp_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_CONSUMER,
    H_DETAIL,
    H_REASON,
    H_SOURCE,
    ChainSigner,
    ChainVerifier,
)
from trusthop.policy.pdp import PdpResult
from trusthop.sign import Identity, append_hop, mint_origin

WAIT = 15.0

DOMAIN = "prod.example.com"
EDGE = Identity.create(f"spiffe://{DOMAIN}/ns/edge/sa/gateway", SigningKey.generate())
ORDERS = Identity.create(f"spiffe://{DOMAIN}/ns/shop/sa/orders", SigningKey.generate())
# The orders actor with a key nobody put in the bundle.
ROGUE = Identity.create(ORDERS.actor, SigningKey.generate())
BUNDLE = TrustBundle.of([EDGE.bundle_key, ORDERS.bundle_key])

SCOPE = frozenset({"orders:read", "orders:write", "payments:charge"})
CASE = "th-case"  # test bookkeeping header: not a CloudEvents header, so not signed


def make_origin(subject: str = "user:alice") -> OriginRing:
    return mint_origin(
        EDGE,
        subject=subject,
        issuer="https://idp.example.com",
        credential=f"token-of-{subject}",
        scope=SCOPE,
        now=time.time(),
        ttl=600,
    )


def order_event(event_id: str, **data: Any) -> CloudEvent:
    return CloudEvent(
        {
            "id": event_id,
            "source": "/shop/orders",
            "type": "order.placed",
            "specversion": "1.0",
            "datacontenttype": "application/json",
        },
        {"order": 42, **data},
    )


def wire_order(event_id: str) -> WireEvent:
    return WireEvent.from_cloudevent(order_event(event_id))


async def eventually(predicate: Callable[[], bool], what: str, *, within: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Rabbit:
    """One test's connection and topology; deletes everything it named."""

    def __init__(self, connection: AbstractRobustConnection, prefix: str, url: str) -> None:
        self.connection = connection
        self.prefix = prefix
        self.url = url
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.dlx = self.name("dlx")
        self.exchanges.append(self.dlx)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def queue(self, suffix: str) -> str:
        name = self.name(suffix)
        self.queues += [name, dead_letter_queue_name(name), retry_queue_name(name)]
        return name

    async def channel(self, *, on_return_raises: bool = False) -> AbstractChannel:
        return await self.connection.channel(
            publisher_confirms=True, on_return_raises=on_return_raises
        )

    async def exchange(self, channel: AbstractChannel, suffix: str) -> AbstractExchange:
        name = self.name(suffix)
        self.exchanges.append(name)
        return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC)

    def worker(self, channel: AbstractChannel, **options: Any) -> TrustedWorker:
        options.setdefault("retry_backoff", 0.01)
        options.setdefault("retry_delay", 0.2)
        return TrustedWorker(
            channel, verifier=ChainVerifier(BUNDLE), dead_letter_exchange=self.dlx, **options
        )

    async def counts(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacked ones are not counted)."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count is not None
            return declared.declaration_result.message_count
        finally:
            await channel.close()

    async def drain(self, queue: str) -> list[AbstractIncomingMessage]:
        """Every message in ``queue``, acked."""
        channel = await self.connection.channel()
        out: list[AbstractIncomingMessage] = []
        try:
            declared = await channel.declare_queue(queue, passive=True)
            while (message := await declared.get(fail=False, timeout=WAIT)) is not None:
                await message.ack()
                out.append(message)
        finally:
            await channel.close()
        return out

    async def cleanup(self) -> None:
        """Delete everything named, on a connection of its own (a test may
        have made the broker close the shared one)."""
        connection = await aio_pika.connect(self.url)
        try:
            await self._delete_all(connection)
        finally:
            await connection.close()

    async def _delete_all(self, connection: aio_pika.abc.AbstractConnection) -> None:
        for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
            for name in names:
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                with contextlib.suppress(Exception):
                    await channel.close()


@pytest.fixture
async def rabbit(amqp_url: str, unique_name: str) -> AsyncIterator[Rabbit]:
    connection = await aio_pika.connect_robust(amqp_url)
    helper = Rabbit(connection, unique_name, amqp_url)
    try:
        yield helper
    finally:
        await helper.cleanup()
        await connection.close()


async def publish_raw(
    exchange: AbstractExchange,
    routing_key: str,
    body: bytes,
    headers: HeadersType,
    content_type: str | None = None,
) -> None:
    """What an attacker with broker write access does: plain aio-pika."""
    result = await exchange.publish(
        aio_pika.Message(body, headers=headers, content_type=content_type),
        routing_key=routing_key,
        mandatory=True,
    )
    assert isinstance(result, Basic.Ack), "test message was not routed"


def published(
    wire: WireEvent, case: str, *, structured: bool = False
) -> tuple[HeadersType, bytes, str | None]:
    headers, body, content_type = encode_amqp(wire, structured=structured)
    amqp_headers: HeadersType = {**headers, CASE: case}
    return amqp_headers, body, content_type


# --------------------------------------------------------------------------- #
# happy path: an origin event, a derived event, two hops through RabbitMQ
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("structured", [False, True], ids=["binary", "structured"])
async def test_origin_and_derived_event_verified_across_two_exchanges(
    rabbit: Rabbit, structured: bool
) -> None:
    edge_channel = await rabbit.channel()
    orders_channel = await rabbit.channel()
    payments_channel = await rabbit.channel()
    orders_x = await rabbit.exchange(edge_channel, "orders")
    payments_x = await rabbit.exchange(edge_channel, "payments")
    q_orders, q_payments = rabbit.queue("orders-svc"), rabbit.queue("payments-svc")

    edge = TrustedPublisher(edge_channel, signer=ChainSigner(EDGE), structured=structured)
    orders_out = TrustedPublisher(orders_channel, signer=ChainSigner(ORDERS), structured=structured)
    orders_worker = rabbit.worker(orders_channel)
    payments_worker = rabbit.worker(payments_channel)
    seen_orders: list[Delivery] = []
    seen_payments: list[Delivery] = []

    @orders_worker.handler(q_orders, bind=[(orders_x.name, "order.placed")])
    async def on_order(delivery: Delivery) -> None:
        seen_orders.append(delivery)
        order = delivery.event.get_data()
        assert isinstance(order, dict)
        derived = CloudEvent(
            {
                "id": f"pay-{delivery.event.get_id()}",
                "source": "/shop/orders",
                "type": "payment.requested",
                "specversion": "1.0",
                "datacontenttype": "application/json",
            },
            {"amount": 999, "order": order["order"]},
        )
        await orders_out.publish(
            derived,
            exchange=payments_x,  # an exchange object works as well as a name
            routing_key="payment.requested",
            parent=delivery.context,
            scope={"payments:charge"},
            consumed_event_id=delivery.event.get_id(),
        )

    @payments_worker.handler(q_payments, bind=[(payments_x.name, "payment.requested")])
    async def on_payment(delivery: Delivery) -> None:
        seen_payments.append(delivery)

    origin = make_origin()
    async with orders_worker, payments_worker:
        sealed = await edge.publish(
            order_event("order-1"),
            exchange=orders_x.name,
            routing_key="order.placed",
            origin=origin,
            scope={"orders:write", "payments:charge"},
        )
        assert sealed.chain is not None
        await eventually(lambda: len(seen_payments) == 1, "the derived event")

    (first,) = seen_orders
    assert first.attempt == 1 and first.queue == q_orders
    assert first.event.get_id() == "order-1"
    assert first.event.get_data() == {"order": 42}
    assert first.context.actors == (EDGE.actor, EDGE.actor)
    assert first.context.destination == amqp_destination(orders_x.name, "order.placed")
    assert first.context.scope == {"orders:write", "payments:charge"}
    assert first.trusted.wire.chain == sealed.chain
    # How the wire looked on delivery, and what types the headers came back as.
    message = first.message
    assert message.exchange == orders_x.name and message.routing_key == "order.placed"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    if structured:
        assert message.content_type == CONTENT_TYPE
        assert not [k for k in message.headers if k.lower().startswith("cloudevents")]
        assert json.loads(message.body)["trustchain"] == sealed.chain
    else:
        assert message.content_type == "application/json"
        assert message.headers["cloudEvents_trustchain"] == sealed.chain
        assert all(
            type(v) is str for k, v in message.headers.items() if k.startswith("cloudEvents_")
        ), "str header values come back as str, not bytes"

    (second,) = seen_payments
    assert second.event.get_type() == "payment.requested"
    assert second.event.get_data() == {"amount": 999, "order": 42}
    context = second.context
    assert context.actors == (EDGE.actor, EDGE.actor, ORDERS.actor)
    assert context.subject == "user:alice"
    assert context.transaction_id == origin.transaction_id
    assert context.scope == {"payments:charge"}
    assert context.destination == amqp_destination(payments_x.name, "payment.requested")
    newest = context.chain.hops[-1]
    assert newest.consumed_event_id == "order-1"
    assert context.chain.hops[0] == first.context.chain.hops[0]  # the prefix travelled intact

    assert orders_worker.stats.delivered == 1 and payments_worker.stats.delivered == 1
    assert orders_worker.stats.total_dead_lettered == 0
    assert payments_worker.stats.total_dead_lettered == 0
    for channel in (orders_channel, payments_channel):
        await channel.close()  # unacked messages would now be back in their queues
    for queue in (q_orders, q_payments):
        assert await rabbit.counts(queue) == 0
        assert await rabbit.counts(dead_letter_queue_name(queue)) == 0


# --------------------------------------------------------------------------- #
# attacks: every one dead-lettered with its reason, original kept, none lost
# --------------------------------------------------------------------------- #


def _chain_two_hops(
    origin: OriginRing, e1: WireEvent, e2: WireEvent, destination: str, *, hop2_scope: Any = None
) -> Chain:
    """origin -> edge publishes e1 -> orders publishes e2 to ``destination``."""
    now = time.time()
    c1 = append_hop(
        EDGE,
        Chain(origin),
        event_digest=e1.digest(),
        destination="amqp:elsewhere/order.placed",
        now=now,
        scope={"orders:read"},
    )
    return append_hop(
        ORDERS,
        c1,
        event_digest=e2.digest(),
        destination=destination,
        now=now,
        scope=hop2_scope,
        consumed_event_id=e1.id,
    )


async def test_attacks_are_dead_lettered_with_reason_and_nothing_is_lost(rabbit: Rabbit) -> None:
    channel = await rabbit.channel()
    orders_x = await rabbit.exchange(channel, "orders")
    replay_x = await rabbit.exchange(channel, "replay")
    queue = rabbit.queue("billing")
    worker = rabbit.worker(channel)
    handled: list[Delivery] = []

    @worker.handler(
        queue,
        bind=[
            (orders_x.name, "order.placed"),
            (orders_x.name, "order.cancelled"),
            (replay_x.name, "order.placed"),
        ],
    )
    async def on_order(delivery: Delivery) -> None:
        handled.append(delivery)

    attacker = await rabbit.channel()
    a_orders = await attacker.get_exchange(orders_x.name)
    a_replay = await attacker.get_exchange(replay_x.name)
    destination = amqp_destination(orders_x.name, "order.placed")
    edge = ChainSigner(EDGE)
    origin = make_origin()

    def sealed(event_id: str, signer: ChainSigner = edge) -> WireEvent:
        return signer.seal(order_event(event_id), destination=destination, origin=origin)

    # (case, exchange, routing key, headers, body, content type, expected reason or None)
    sent: list[tuple[str, AbstractExchange, str, HeadersType, bytes, str | None, Reason | None]]
    sent = []

    def add(
        case: str,
        message: tuple[HeadersType, bytes, str | None],
        expected: Reason | None,
        *,
        exchange: AbstractExchange = a_orders,
        routing_key: str = "order.placed",
    ) -> None:
        headers, body, content_type = message
        headers = {**headers, CASE: case}
        sent.append((case, exchange, routing_key, headers, body, content_type, expected))

    # Valid traffic, interleaved with the attacks below.
    add("valid-binary", published(sealed("v1"), "v"), None)
    add("valid-structured", published(sealed("v2"), "v", structured=True), None)
    spoof_headers, body, ctype = published(sealed("v3"), "v")
    spoof_headers |= {"x-cloudEvents_id": "spoofed", "x-note": {"nested": [1, "a"]}}
    add("valid-with-x-headers", (spoof_headers, body, ctype), None)  # x-* never read

    # event_mismatch: body tampered (binary), data tampered (structured), an
    # extra CloudEvents attribute injected as a header.
    headers, body, ctype = published(sealed("t1"), "t")
    add("tampered-body", (headers, body.replace(b"42", b"43"), ctype), Reason.EVENT_MISMATCH)
    headers, body, ctype = published(sealed("t2"), "t", structured=True)
    document = json.loads(body)
    document["data"]["order"] = 43
    add(
        "tampered-structured",
        (headers, json.dumps(document).encode(), ctype),
        Reason.EVENT_MISMATCH,
    )
    headers, body, ctype = published(sealed("t3"), "t")
    add(
        "injected-attribute",
        ({**headers, "cloudEvents_subject": "order-666"}, body, ctype),
        Reason.EVENT_MISMATCH,
    )

    # unknown_key: the right actor, a key that is not in the bundle.
    e1, e2 = wire_order("u1"), wire_order("u2")
    rogue_chain = append_hop(
        ROGUE, Chain(origin), event_digest=e2.digest(), destination=destination, now=time.time()
    )
    e2.chain = rogue_chain.encode()
    add("unknown-key", published(e2, "u"), Reason.UNKNOWN_KEY)

    # wrong_destination: a valid event replayed into another exchange, and
    # into another routing key of the same exchange.
    add(
        "replay-other-exchange",
        published(sealed("w1"), "w"),
        Reason.WRONG_DESTINATION,
        exchange=a_replay,
    )
    add(
        "replay-other-routing-key",
        published(sealed("w2"), "w"),
        Reason.WRONG_DESTINATION,
        routing_key="order.cancelled",
    )

    # broken_link: a ring removed from a valid two-hop chain.
    e1, e2 = wire_order("b1"), wire_order("b2")
    full = _chain_two_hops(origin, e1, e2, destination)
    parts = full.encode().split(".")  # "2", ring 0, ring 1, ring 2: ring 1 goes
    e2.chain = ".".join(parts[:2] + parts[3:])
    add("ring-removed", published(e2, "b"), Reason.BROKEN_LINK)

    # scope_escalation: the orders service widens its scope and signs it with
    # its own, legitimate key (append_hop would refuse, so by hand).
    e1, e2 = wire_order("s1"), wire_order("s2")
    narrow = _chain_two_hops(origin, e1, e2, destination)
    widened: HopRing = dataclasses.replace(narrow.hops[1], scope=SCOPE, signature=b"")
    before = Chain(narrow.origin, (narrow.hops[0],))
    widened = dataclasses.replace(
        widened, signature=ORDERS.key.sign(before.next_signing_input(widened))
    )
    e2.chain = before.appended(widened).encode()
    add("scope-widened", published(e2, "s"), Reason.SCOPE_ESCALATION)

    # missing_chain: a well-formed CloudEvent without trustchain, carrying
    # forged verdict headers that must not survive into the dead letter.
    headers, body, ctype = published(wire_order("m1"), "m")
    headers |= {"trusthop-reason": "handler_failed", "Trusthop-Consumer": "x", "trusthop-z": "1"}
    add("no-chain", (headers, body, ctype), Reason.MISSING_CHAIN)

    # malformed: hostile headers of every kind.
    good, body, ctype = published(sealed("h0"), "h")
    chain_value = good["cloudEvents_trustchain"]
    assert isinstance(chain_value, str)
    ce_only = {k: v for k, v in good.items() if k.startswith("cloudEvents_")}
    hostile: dict[str, HeadersType] = {
        "mixed-case-prefix": {**good, "CloudEvents_subject": "s"},
        "both-prefixes": {**good, "cloudEvents:id": "h0"},
        "nested-table": {**good, "cloudEvents_subject": {"a": {"b": [1, None]}}},
        "array-value": {**good, "cloudEvents_subject": ["a", 1]},
        "null-value": {**good, "cloudEvents_subject": None},
        "non-utf8-bytes": {**good, "cloudEvents_subject": bytearray(b"\xff\xfe\x80")},
        "float-value": {**good, "cloudEvents_subject": 1.5},
        "garbage-chain": {**good, "cloudEvents_trustchain": "!!not base64url!!"},
        "chain-as-table": {**good, "cloudEvents_trustchain": {"v": chain_value}},
        "no-specversion": {k: v for k, v in ce_only.items() if k != "cloudEvents_specversion"},
    }
    for case, hostile_headers in hostile.items():
        add(case, (hostile_headers, body, ctype), Reason.MALFORMED)
    add("structured-not-json", ({}, b"{not json", CONTENT_TYPE), Reason.MALFORMED)
    add("after-the-hostile-ones", published(sealed("v4"), "v"), None)

    async with worker:
        for _, exchange, routing_key, headers, body, content_type, _ in sent:
            await publish_raw(exchange, routing_key, body, headers, content_type)
        await eventually(
            lambda: worker.stats.delivered + worker.stats.total_dead_lettered == len(sent),
            "every message to be settled",
        )
    await channel.close()  # anything still unacked would go back to the queue

    valid = [case for case, *_, expected in sent if expected is None]
    attacks = {case: expected for case, *_, expected in sent if expected is not None}
    assert sorted(d.message.headers[CASE] for d in handled) == sorted(valid)  # type: ignore[type-var]
    assert worker.stats.delivered == len(valid)
    assert worker.stats.dead_lettered == Counter(attacks.values())
    assert worker.stats.requeued == 0
    assert await rabbit.counts(queue) == 0

    letters = {m.headers[CASE]: m for m in await rabbit.drain(dead_letter_queue_name(queue))}
    assert set(letters) == set(attacks), "exactly the attacks were dead-lettered"
    originals = {case: (rk, headers, body, ct) for case, _, rk, headers, body, ct, _ in sent}
    for case, expected in attacks.items():
        letter = letters[case]
        routing_key, headers, body, content_type = originals[case]
        assert letter.headers[H_REASON] == expected.value, case
        assert letter.headers[H_CONSUMER] == queue
        assert letter.headers[H_ATTEMPTS] == "1"
        assert letter.headers[H_DETAIL]
        assert str(letter.headers[H_SOURCE]).endswith(f"/{routing_key}")
        assert letter.body == body, f"{case}: original body preserved"
        assert letter.content_type == content_type
        assert letter.routing_key == queue and letter.exchange == rabbit.dlx
        for key, value in headers.items():
            if not key.lower().startswith("trusthop-"):
                assert letter.headers[key] == value, f"{case}: header {key} preserved"
    forged = letters["no-chain"].headers
    assert forged[H_REASON] == "missing_chain" and forged[H_CONSUMER] == queue
    assert "Trusthop-Consumer" not in forged and "trusthop-z" not in forged
    replay = letters["replay-other-exchange"].headers
    assert replay[H_SOURCE] == amqp_destination(replay_x.name, "order.placed")


async def test_scope_escalation_refused_at_publish_time(rabbit: Rabbit) -> None:
    channel = await rabbit.channel()
    orders_x = await rabbit.exchange(channel, "orders")
    queue_name = rabbit.queue("sink")
    queue = await channel.declare_queue(queue_name)
    await queue.bind(orders_x, "order.placed")
    destination = amqp_destination(orders_x.name, "order.placed")
    first = ChainSigner(EDGE).seal(
        order_event("p1"), destination=destination, origin=make_origin(), scope={"orders:read"}
    )
    parent = ChainVerifier(BUNDLE).verify(first, destination).context

    publisher = TrustedPublisher(channel, signer=ChainSigner(ORDERS))
    with pytest.raises(TrustError) as refused:
        await publisher.publish(
            order_event("p2"),
            exchange=orders_x.name,
            routing_key="order.placed",
            parent=parent,
            scope={"orders:read", "orders:write"},
        )
    assert refused.value.reason is Reason.SCOPE_ESCALATION
    await publisher.publish(
        order_event("p3"), exchange=orders_x.name, routing_key="order.placed", parent=parent
    )
    received = await rabbit.drain(queue_name)
    assert [m.headers["cloudEvents_id"] for m in received] == ["p3"], "nothing else published"


# --------------------------------------------------------------------------- #
# publisher confirms + mandatory
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("on_return_raises", [False, True])
async def test_unroutable_publish_raises(rabbit: Rabbit, on_return_raises: bool) -> None:
    channel = await rabbit.channel(on_return_raises=on_return_raises)
    lonely = await rabbit.exchange(channel, "lonely")  # no queue bound
    publisher = TrustedPublisher(channel, signer=ChainSigner(EDGE))
    with pytest.raises(PublishRefused) as refused:
        await publisher.publish(
            order_event("r1"), exchange=lonely.name, routing_key="nowhere", origin=make_origin()
        )
    assert refused.value.returned
    assert refused.value.reply_code == 312  # NO_ROUTE
    assert (refused.value.exchange, refused.value.routing_key) == (lonely.name, "nowhere")
    # The channel is still usable after a return.
    queue_name = rabbit.queue("late")
    queue = await channel.declare_queue(queue_name)
    await queue.bind(lonely, "somewhere")
    await publisher.publish(
        order_event("r2"), exchange=lonely.name, routing_key="somewhere", origin=make_origin()
    )
    assert [m.headers["cloudEvents_id"] for m in await rabbit.drain(queue_name)] == ["r2"]


async def test_publish_to_missing_exchange_raises(rabbit: Rabbit) -> None:
    channel = await rabbit.channel()
    publisher = TrustedPublisher(channel, signer=ChainSigner(EDGE))
    with pytest.raises(aio_pika.exceptions.ChannelClosed):
        await publisher.publish(
            order_event("x1"),
            exchange=rabbit.name("does-not-exist"),
            routing_key="any",
            origin=make_origin(),
        )


# --------------------------------------------------------------------------- #
# handler failures, ack after the handler, redelivery
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("retry_queue", [True, False], ids=["retry-queue", "in-process"])
async def test_handler_failures_are_retried_then_dead_lettered(
    rabbit: Rabbit, retry_queue: bool
) -> None:
    channel = await rabbit.channel()
    orders_x = await rabbit.exchange(channel, "orders")
    queue = rabbit.queue("flaky")
    worker = rabbit.worker(channel, max_attempts=3, retry_queue=retry_queue)
    attempts: dict[str, list[int]] = {}
    kinds: dict[str, list[str]] = {}

    @worker.handler(queue, bind=[(orders_x.name, "order.placed")])
    async def on_order(delivery: Delivery) -> None:
        event_id = delivery.event.get_id()
        attempts.setdefault(event_id, []).append(delivery.attempt)
        kinds.setdefault(event_id, []).append(delivery.kind.value)
        assert delivery.redelivered is (delivery.attempt > 1)
        if event_id == "always" or (event_id == "twice" and delivery.attempt <= 2):
            raise RuntimeError(f"boom on {event_id}")

    publisher = TrustedPublisher(await rabbit.channel(), signer=ChainSigner(EDGE))
    bodies: dict[str, bytes] = {}
    async with worker:
        for event_id in ("always", "twice", "fine"):
            wire = await publisher.publish(
                order_event(event_id),
                exchange=orders_x.name,
                routing_key="order.placed",
                origin=make_origin(),
            )
            assert wire.data is not None
            bodies[event_id] = wire.data
        await eventually(
            lambda: worker.stats.delivered + worker.stats.total_dead_lettered == 3,
            "three settled messages",
        )
    await channel.close()

    assert attempts == {"always": [1, 2, 3], "twice": [1, 2, 3], "fine": [1]}
    later = "retry" if retry_queue else "first"  # in-process retries are the same delivery
    assert kinds["twice"] == ["first", later, later] and kinds["fine"] == ["first"]
    assert worker.stats.delivered == 2
    assert worker.stats.dead_lettered == Counter({Reason.HANDLER_FAILED: 1})
    assert worker.stats.handler_errors == 5
    assert worker.stats.retried == (4 if retry_queue else 0)
    assert worker.counters["retried"] == worker.stats.retried
    assert worker.counters.rejected == Counter({"handler_failed": 1})
    assert await rabbit.counts(queue) == 0
    if retry_queue:
        assert await rabbit.counts(retry_queue_name(queue)) == 0
    (letter,) = await rabbit.drain(dead_letter_queue_name(queue))
    assert letter.headers[H_REASON] == "handler_failed"
    assert letter.headers[H_ATTEMPTS] == "3"
    assert "boom on always" in str(letter.headers[H_DETAIL])
    assert letter.headers["cloudEvents_id"] == "always"
    assert letter.body == bodies["always"]
    assert "trusthop-retry" not in letter.headers


async def test_pdp_decides_and_fails_closed(rabbit: Rabbit) -> None:
    # The worker awaits the verifier's PDP: allow delivers, deny and a hung
    # PDP dead-letter (unauthorized_actor, pdp_unavailable), nothing is lost.
    channel = await rabbit.channel()
    orders_x = await rabbit.exchange(channel, "pdp-orders")
    queue = rabbit.queue("pdp")
    asked: list[str] = []

    async def pdp(request: dict[str, Any]) -> PdpResult:
        asked.append(request["resource"]["id"])
        if request["context"]["transaction_id"] == "hang":
            await asyncio.sleep(3600)
        return PdpResult(request["context"]["transaction_id"] != "deny", "not today")

    worker = TrustedWorker(
        channel,
        verifier=ChainVerifier(BUNDLE, pdp=pdp, pdp_timeout=0.1),
        dead_letter_exchange=rabbit.dlx,
    )
    delivered: list[str] = []

    @worker.handler(queue, bind=[(orders_x.name, "order.placed")])
    async def on_order(delivery: Delivery) -> None:
        delivered.append(delivery.context.transaction_id)

    publisher = TrustedPublisher(await rabbit.channel(), signer=ChainSigner(EDGE))
    async with worker:
        for txn in ("allow", "deny", "hang"):
            origin = mint_origin(
                EDGE,
                subject="user:alice",
                issuer="https://idp.example.com",
                credential="token",
                scope=SCOPE,
                now=time.time(),
                ttl=600,
                transaction_id=txn,
            )
            await publisher.publish(
                order_event(txn), exchange=orders_x.name, routing_key="order.placed", origin=origin
            )
        await eventually(
            lambda: worker.stats.delivered + worker.stats.total_dead_lettered == 3,
            "three settled messages",
        )
    await channel.close()

    assert delivered == ["allow"]
    assert asked == [amqp_destination(orders_x.name, "order.placed")] * 3
    letters = await rabbit.drain(dead_letter_queue_name(queue))
    reasons = {str(m.headers["cloudEvents_id"]): m.headers[H_REASON] for m in letters}
    assert reasons == {"deny": "unauthorized_actor", "hang": "pdp_unavailable"}


async def test_ack_only_after_handler_and_redelivery_is_accepted(rabbit: Rabbit) -> None:
    first_channel = await rabbit.channel()
    orders_x = await rabbit.exchange(first_channel, "orders")
    queue = rabbit.queue("slow")
    first = rabbit.worker(first_channel)
    started, release = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    @first.handler(queue, bind=[(orders_x.name, "order.placed")])
    async def slow(delivery: Delivery) -> None:
        started.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("returned")

    publisher = TrustedPublisher(await rabbit.channel(), signer=ChainSigner(EDGE))
    await first.start()
    try:
        await publisher.publish(
            order_event("slow-1"),
            exchange=orders_x.name,
            routing_key="order.placed",
            origin=make_origin(),
        )
        await asyncio.wait_for(started.wait(), WAIT)
        # The consumer dies while its handler runs: no ack was sent, so the
        # broker gives the message to the next consumer, flagged redelivered.
        await first_channel.close()

        second = rabbit.worker(await rabbit.channel())
        redelivered: list[Delivery] = []

        @second.handler(queue, bind=[(orders_x.name, "order.placed")])
        async def fast(delivery: Delivery) -> None:
            redelivered.append(delivery)

        async with second:
            await eventually(lambda: len(redelivered) == 1, "the redelivery")
    finally:
        release.set()
        await first.stop()

    (delivery,) = redelivered
    assert delivery.message.redelivered is True
    assert delivery.event.get_id() == "slow-1"
    assert delivery.context.actors == (EDGE.actor, EDGE.actor)
    assert second.stats.delivered == 1 and second.stats.total_dead_lettered == 0
    # Closing the channel cancels the running handler (aiormq cancels consumer
    # tasks); the first worker never acked nor counted the message.
    assert outcome == ["cancelled"]
    assert first.stats.delivered == 0
    assert await rabbit.counts(queue) == 0
    assert await rabbit.counts(dead_letter_queue_name(queue)) == 0


async def test_worker_refuses_bad_configuration(rabbit: Rabbit) -> None:
    plain = await rabbit.connection.channel(publisher_confirms=False)
    with pytest.raises(ValueError, match="publisher_confirms"):
        TrustedWorker(plain, verifier=ChainVerifier(BUNDLE))
    with pytest.raises(ValueError, match="publisher_confirms"):
        TrustedPublisher(plain, signer=ChainSigner(EDGE))
    worker = rabbit.worker(await rabbit.channel())
    with pytest.raises(RuntimeError, match="no handler"):
        await worker.start()


# --------------------------------------------------------------------------- #
# routing: CC/BCC copies and the queue's own bindings
# --------------------------------------------------------------------------- #


async def test_cc_and_bcc_copies_are_dead_lettered(rabbit: Rabbit) -> None:
    """A CC/BCC header makes RabbitMQ copy an event signed for another routing
    key into queues bound to ``order.reserved``, reporting ``order.cancelled``
    on delivery: the chain's destination check alone would pass it."""
    channel = await rabbit.channel()
    shop = await rabbit.exchange(channel, "shop")
    sink_name = rabbit.queue("cancellations")  # where order.cancelled belongs
    sink = await channel.declare_queue(sink_name)
    await sink.bind(shop, "order.cancelled")
    # q_bind: bound by the worker (one topic wildcard); q_accept: bound here,
    # stated to the worker with accept_bindings; q_plain: bound here, neither.
    q_bind, q_accept, q_plain = (rabbit.queue(s) for s in ("bind", "accept", "plain"))
    for name, keys in (
        (q_accept, ("order.reserved", "shipment.*.eu")),
        (q_plain, ("order.reserved",)),
    ):
        queue = await channel.declare_queue(name, durable=True)
        for key in keys:
            await queue.bind(shop, key)

    worker = rabbit.worker(channel)
    handled: dict[str, list[str]] = {q_bind: [], q_accept: [], q_plain: []}

    async def record(delivery: Delivery) -> None:
        handled[delivery.queue].append(str(delivery.message.headers[CASE]))

    worker.handler(q_bind, bind=[(shop.name, "order.reserved"), (shop.name, "shipment.#")])(record)
    worker.handler(
        q_accept,
        declare=False,
        accept_bindings=[(shop.name, "order.reserved"), (shop.name, "shipment.*.eu")],
    )(record)
    worker.handler(q_plain, declare=False)(record)

    edge = ChainSigner(EDGE)
    origin = make_origin()
    attacker = await rabbit.channel()
    a_shop = await attacker.get_exchange(shop.name)

    async def send(
        case: str,
        signed_for: str,
        routing_key: str,
        extra: HeadersType | None = None,
        *,
        exchange: AbstractExchange = a_shop,
    ) -> None:
        wire = edge.seal(order_event(case), destination=signed_for, origin=origin)
        headers, body, content_type = published(wire, case)
        await publish_raw(exchange, routing_key, body, {**headers, **(extra or {})}, content_type)

    cancelled = amqp_destination(shop.name, "order.cancelled")
    async with worker:
        await send(
            "legit-reserved", amqp_destination(shop.name, "order.reserved"), "order.reserved"
        )
        await send(
            "legit-shipment",
            amqp_destination(shop.name, "shipment.created.eu"),
            "shipment.created.eu",
        )
        await send(
            "legit-default-exchange",
            amqp_destination("", q_bind),
            q_bind,
            exchange=attacker.default_exchange,
        )
        await send("cc-replay", cancelled, "order.cancelled", {"CC": ["order.reserved"]})
        await send("bcc-replay", cancelled, "order.cancelled", {"BCC": ["order.reserved"]})
        await eventually(
            lambda: worker.stats.delivered + worker.stats.total_dead_lettered == 12,
            "every copy to be settled",
        )
    await channel.close()

    assert sorted(handled[q_bind]) == ["legit-default-exchange", "legit-reserved", "legit-shipment"]
    assert sorted(handled[q_accept]) == ["legit-reserved", "legit-shipment"]
    # Documented limit: with neither bind= nor accept_bindings=, a BCC copy
    # (RabbitMQ strips the header) is indistinguishable from the original.
    assert sorted(handled[q_plain]) == ["bcc-replay", "legit-reserved"]
    assert worker.stats.dead_lettered == Counter({Reason.WRONG_DESTINATION: 5})
    assert worker.stats.requeued == 0 and worker.stats.abandoned == 0

    expected = {q_bind: {"cc-replay", "bcc-replay"}, q_accept: {"cc-replay", "bcc-replay"}}
    expected[q_plain] = {"cc-replay"}
    for queue, cases in expected.items():
        assert await rabbit.counts(queue) == 0
        letters = {
            str(m.headers[CASE]): m for m in await rabbit.drain(dead_letter_queue_name(queue))
        }
        assert set(letters) == cases, queue
        for case, letter in letters.items():
            assert letter.headers[H_REASON] == "wrong_destination"
            assert letter.headers[H_SOURCE] == cancelled
            assert "CC" not in letter.headers and "BCC" not in letter.headers
            detail = str(letter.headers[H_DETAIL])
            assert ("'CC' header" if case == "cc-replay" else "none of the bindings") in detail
    # The originals went where they were signed for; RabbitMQ kept CC, dropped BCC.
    originals = {str(m.headers[CASE]): m for m in await rabbit.drain(sink_name)}
    assert set(originals) == {"cc-replay", "bcc-replay"}
    assert originals["cc-replay"].headers["CC"] == ["order.reserved"]
    assert "BCC" not in originals["bcc-replay"].headers


TOPIC_PATTERNS = ["#", "*", "a.#", "#.b", "*.b.#", "a.*.c", "a.#.c", "#.#", "#.a.#", "*.*"]
TOPIC_PATTERNS += ["", "a", "a.b", "a*", "a.*", "a.", "*.", ".#", "#.*.#"]
TOPIC_KEYS = ["", "a", "b", "ab", "a*", "a.*", "a.b", "b.a", "x.b", "a.c", "a.b.c", "a..c"]
TOPIC_KEYS += [
    "a.x.y.c",
    "a.c.x",
    "x.y",
    "x.y.b",
    "x.b.c.d",
    "x.a.y",
    ".",
    "a.",
    ".b",
    "..",
    "a.b.c.d.e",
]


async def test_routing_key_matches_agrees_with_a_topic_exchange(rabbit: Rabbit) -> None:
    """The pure matcher against RabbitMQ itself: every pattern with every key."""
    channel = await rabbit.channel()
    topic = await rabbit.exchange(channel, "topic")
    queues: dict[str, str] = {}
    for index, pattern in enumerate(TOPIC_PATTERNS):
        queues[pattern] = rabbit.queue(f"pattern-{index}")
        queue = await channel.declare_queue(queues[pattern])
        await queue.bind(topic, pattern)
    for key in TOPIC_KEYS:
        message = aio_pika.Message(b"", headers={"rk": key})
        await topic.publish(message, routing_key=key, mandatory=False)
    for pattern, queue in queues.items():
        got = {str(m.headers["rk"]) for m in await rabbit.drain(queue)}
        expected = {key for key in TOPIC_KEYS if routing_key_matches(pattern, key)}
        assert got == expected, f"binding key {pattern!r}"


# --------------------------------------------------------------------------- #
# dead letters that cannot be published as they are
# --------------------------------------------------------------------------- #


async def test_oversized_header_poison_is_dead_lettered_once(rabbit: Rabbit) -> None:
    """A header that fits one frame, but not with the trusthop-* headers added:
    copied as is, the dead letter made RabbitMQ close the connection
    (FRAME_ERROR), the poison came back forever and the valid messages behind
    it were handled again and again."""
    # The worker on a connection of its own, as in production: the publishers
    # below must not share its fate.
    worker_connection = await aio_pika.connect_robust(rabbit.url)
    channel = await worker_connection.channel(publisher_confirms=True)
    orders_x = await rabbit.exchange(channel, "orders")
    queue = rabbit.queue("poisoned")
    worker = rabbit.worker(channel)
    handled: list[str] = []

    @worker.handler(queue, bind=[(orders_x.name, "order.placed")])
    async def on_order(delivery: Delivery) -> None:
        handled.append(delivery.event.get_id())

    attacker = await rabbit.channel()
    a_orders = await attacker.get_exchange(orders_x.name)
    edge = ChainSigner(EDGE)
    destination = amqp_destination(orders_x.name, "order.placed")
    valid = [f"ok-{i}" for i in range(5)]
    async with worker:
        await publish_raw(a_orders, "order.placed", b"junk", {"pad": "A" * 130_990})
        for event_id in valid:
            wire = edge.seal(order_event(event_id), destination=destination, origin=make_origin())
            headers, body, content_type = published(wire, event_id)
            await publish_raw(a_orders, "order.placed", body, headers, content_type)
        await eventually(
            lambda: worker.stats.delivered >= len(valid) and worker.stats.total_dead_lettered >= 1,
            "the valid messages and the poison to be settled",
        )
        await asyncio.sleep(0.5)  # room for a redelivery, had the connection died
    await worker_connection.close()

    assert sorted(handled) == valid, "each valid message handled exactly once"
    assert worker.stats.dead_lettered == Counter({Reason.MALFORMED: 1})
    assert worker.stats.requeued == 0 and worker.stats.abandoned == 0
    assert await rabbit.counts(queue) == 0
    (letter,) = await rabbit.drain(dead_letter_queue_name(queue))
    assert letter.body == b"junk"
    assert letter.headers[H_REASON] == "malformed" and letter.headers[H_CONSUMER] == queue
    assert letter.headers[H_HEADERS_DROPPED] == "1" and "pad" not in letter.headers
    assert int(str(letter.headers[H_HEADERS_BYTES])) > 130_990


async def test_unpublishable_dead_letter_is_abandoned_not_looped(rabbit: Rabbit) -> None:
    """The dead-letter queue is gone, so every dead letter comes back
    unroutable: the message is tried as full and stub letter, requeued once,
    then rejected without requeue (here into the queue's own native DLX)."""
    channel = await rabbit.channel()
    orders_x = await rabbit.exchange(channel, "orders")
    native_x = await rabbit.exchange(channel, "native-dlx")
    native_name = rabbit.queue("native")
    native = await channel.declare_queue(native_name)
    await native.bind(native_x, "#")
    queue = rabbit.queue("no-dlq")
    await channel.declare_queue(
        queue, durable=True, arguments={"x-dead-letter-exchange": native_x.name}
    )
    worker = rabbit.worker(channel, abandon_after=0.0)
    handled: list[str] = []

    @worker.handler(queue, declare=False, bind=[(orders_x.name, "order.placed")])
    async def on_order(delivery: Delivery) -> None:
        handled.append(delivery.event.get_id())

    publisher = TrustedPublisher(await rabbit.channel(), signer=ChainSigner(EDGE))
    attacker = await rabbit.channel()
    a_orders = await attacker.get_exchange(orders_x.name)
    async with worker:
        admin = await rabbit.channel()
        await admin.queue_delete(dead_letter_queue_name(queue))
        await publish_raw(a_orders, "order.placed", b"junk", {CASE: "junk"})
        await eventually(lambda: worker.stats.abandoned == 1, "the junk to be abandoned")
        await publisher.publish(
            order_event("after"),
            exchange=orders_x.name,
            routing_key="order.placed",
            origin=make_origin(),
        )
        await eventually(lambda: handled == ["after"], "the next message")
        await asyncio.sleep(0.3)  # room for a further (looping) redelivery
    await channel.close()

    assert worker.stats.abandoned == 1 and worker.stats.requeued == 1
    assert worker.stats.total_dead_lettered == 0 and worker.stats.delivered == 1
    assert await rabbit.counts(queue) == 0
    (kept,) = await rabbit.drain(native_name)
    assert kept.body == b"junk" and kept.headers[CASE] == "junk"
    (death,) = kept.headers["x-death"]  # type: ignore[misc]
    assert death["reason"] == "rejected" and death["queue"] == queue  # type: ignore[index]


async def test_queues_the_worker_declares_dead_letter_natively_into_their_dlq(
    rabbit: Rabbit,
) -> None:
    # What the worker cannot dead-letter itself (the abandon path) is rejected
    # without requeue; the queue's own arguments must then route it to <queue>.dlq.
    channel = await rabbit.channel()
    queue_name = rabbit.queue("native-dlq")
    worker = rabbit.worker(channel)

    @worker.handler(queue_name)
    async def never(delivery: Delivery) -> None:
        raise AssertionError("nothing is published while the worker runs")

    async with worker:
        pass
    await channel.default_exchange.publish(aio_pika.Message(b"orphan"), routing_key=queue_name)
    queue = await channel.get_queue(queue_name, ensure=False)
    message = await queue.get(timeout=5)
    assert message is not None
    await message.reject(requeue=False)
    dlq = await channel.get_queue(dead_letter_queue_name(queue_name), ensure=False)
    for _ in range(50):
        letter = await dlq.get(no_ack=True, fail=False)
        if letter is not None:
            break
        await asyncio.sleep(0.05)
    assert letter is not None and letter.body == b"orphan"
