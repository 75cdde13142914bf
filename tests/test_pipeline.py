"""The per-message pipeline (ChainSigner / ChainVerifier / Rejection), end to end
through the Kafka and AMQP bindings, with a fixed clock and no broker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from chainkit import (
    BUNDLE,
    EDGE,
    ORDERS,
    PAYMENTS,
    S0,
    S2,
    T0,
    FixedClock,
    Story,
    make_bundle,
    rejected,
)
from cloudevents.core.v1.event import CloudEvent

from trusthop.bindings import decode_amqp, decode_kafka, encode_amqp, encode_kafka
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import H_REASON, ChainSigner, ChainVerifier, Rejection, TrustedEvent

R = Reason


def order_event(event_id: str = "o-1", **extra: Any) -> CloudEvent:
    return CloudEvent(
        {
            "id": event_id,
            "source": "/shop",
            "type": "order.placed",
            "time": datetime(2026, 1, 1, tzinfo=UTC),
            **extra,
        },
        {"order": 42},
    )


def through_kafka(wire: WireEvent) -> WireEvent:
    return decode_kafka(*encode_kafka(wire))


def through_amqp(wire: WireEvent) -> WireEvent:
    return decode_amqp(*encode_amqp(wire))


@pytest.fixture
def edge_signer(clock: FixedClock) -> ChainSigner:
    return ChainSigner(EDGE, clock=clock)


@pytest.fixture
def verifier(clock: FixedClock) -> ChainVerifier:
    return ChainVerifier(BUNDLE, clock=clock)


def test_seal_and_verify_an_origin_event(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier
) -> None:
    wire = edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
    trusted = verifier.verify(through_kafka(wire), "kafka:orders")
    assert isinstance(trusted, TrustedEvent)
    assert trusted.context.subject == "user:alice"
    assert trusted.context.scope == S0
    assert trusted.context.event_id == "o-1"
    assert trusted.event.get_data() == {"order": 42}


def test_derived_event_names_the_consumed_event(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier, clock: FixedClock
) -> None:
    first = verifier.verify(
        through_kafka(
            edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
        ),
        "kafka:orders",
    )
    clock.now += 5
    derived = ChainSigner(ORDERS, clock=clock).seal(
        order_event("p-1"), destination="amqp:billing/charge", parent=first.context, scope=S2
    )
    second = verifier.verify(through_amqp(derived), "amqp:billing/charge")
    chain = second.context.chain
    # v2: the parent ring's event digest names the consumed event exactly, and
    # the new ring's signature covers the parent's hash; the id is opt-in.
    assert chain.hops[-1].consumed_event_id is None
    assert chain.hops[-2].event_digest == first.wire.digest()
    assert chain.hashes()[:2] == first.context.chain.hashes()
    assert second.context.actors == (EDGE.actor, EDGE.actor, ORDERS.actor)
    assert second.context.scope == S2
    named = ChainSigner(ORDERS, clock=clock).seal(
        order_event("p-2"),
        destination="amqp:billing/charge",
        parent=first.context,
        scope=S2,
        consumed_event_id=first.context.event_id,
    )
    third = verifier.verify(through_amqp(named), "amqp:billing/charge")
    assert third.context.chain.hops[-1].consumed_event_id == "o-1"


def test_seal_needs_exactly_one_parent(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier
) -> None:
    with pytest.raises(ValueError):
        edge_signer.seal(order_event(), destination="kafka:orders")
    ctx = verifier.verify(
        through_kafka(
            edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
        ),
        "kafka:orders",
    )
    with pytest.raises(ValueError):
        edge_signer.seal(
            order_event(), destination="kafka:orders", origin=story.origin, parent=ctx.context
        )


def test_producer_refuses_a_wider_scope(
    story: Story, clock: FixedClock, verifier: ChainVerifier
) -> None:
    ctx = verifier.verify(
        through_kafka(
            ChainSigner(EDGE, clock=clock).seal(
                order_event(), destination="kafka:orders", origin=story.origin, scope=S2
            )
        ),
        "kafka:orders",
    )
    rejected(
        lambda: ChainSigner(PAYMENTS, clock=clock).seal(
            order_event("p-2"), destination="kafka:x", parent=ctx.context, scope=S0
        ),
        R.SCOPE_ESCALATION,
    )


def test_bundle_swap_applies_to_the_next_message(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier
) -> None:
    wire = through_kafka(
        edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
    )
    verifier.verify(wire, "kafka:orders")
    verifier.bundle = make_bundle(revoked_kids=["edge-1"])
    rejected(lambda: verifier.verify(wire, "kafka:orders"), R.REVOKED, 0)


def test_verifier_clock_decides_expiry(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier, clock: FixedClock
) -> None:
    wire = through_kafka(
        edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
    )
    clock.now = story.origin.exp + verifier.limits.leeway
    verifier.verify(wire, "kafka:orders")
    clock.now += 1
    rejected(lambda: verifier.verify(wire, "kafka:orders"), R.EXPIRED)


def test_verifier_rejections(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier
) -> None:
    wire = through_kafka(
        edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
    )
    rejected(
        lambda: verifier.verify(WireEvent(wire.attributes, wire.data, None), "kafka:orders"),
        R.MISSING_CHAIN,
    )
    tampered = WireEvent(wire.attributes | {"subject": "x\n"}, wire.data, wire.chain)
    rejected(lambda: verifier.verify(tampered, "kafka:orders"), R.MALFORMED)
    rejected(lambda: verifier.verify(wire, "kafka:other"), R.WRONG_DESTINATION)


def test_signature_valid_event_with_data_the_sdk_cannot_parse_is_malformed(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier
) -> None:
    """A legitimately signed event whose JSON data is hostile must not crash the consumer."""
    event = CloudEvent(
        {
            "id": "o-9",
            "source": "/shop",
            "type": "t",
            "time": datetime(2026, 1, 1, tzinfo=UTC),
            "datacontenttype": "application/json",
        },
        b"[" * 50_000,
    )
    wire = edge_signer.seal(event, destination="kafka:orders", origin=story.origin)
    rejected(lambda: verifier.verify(through_kafka(wire), "kafka:orders"), R.MALFORMED)


def test_rejection_record() -> None:
    error = TrustError(R.BROKEN_LINK, "ring 2 does not link" + "!" * 1000, ring=2)
    rejection = Rejection.of(error, source="kafka:orders", consumer="billing", attempts=3)
    headers = rejection.headers()
    assert headers[H_REASON] == "broken_link"
    assert len(headers["trusthop-detail"]) == 512
    assert headers["trusthop-source"] == "kafka:orders"
    assert headers["trusthop-consumer"] == "billing"
    assert headers["trusthop-attempts"] == "3"
    assert all(isinstance(v, str) for v in headers.values())


def test_signed_time_is_what_the_handler_sees(
    story: Story, edge_signer: ChainSigner, verifier: ChainVerifier
) -> None:
    wire = edge_signer.seal(order_event(), destination="kafka:orders", origin=story.origin)
    delivered = verifier.verify(through_kafka(wire), "kafka:orders").event
    assert delivered.get_time() == datetime(2026, 1, 1, tzinfo=UTC)
    assert int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) == T0


def test_hostile_text_in_a_record_is_a_typed_rejection_never_a_crash() -> None:
    # Found by red-teaming: a lone surrogate in structured JSON reached msgpack
    # and raised UnicodeEncodeError, stalling a Kafka consumer for good.
    from trusthop.bindings import decode_kafka
    from trusthop.bundle import TrustBundle
    from trusthop.errors import Reason, TrustError
    from trusthop.pipeline import ChainVerifier

    verifier = ChainVerifier(TrustBundle())
    structured = [("content-type", b"application/cloudevents+json")]
    poisons = [
        b'{"specversion":"1.0","id":"\\ud800","source":"/x","type":"t","trustchain":"AAAA"}',
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","data":{"k":"\\udc00"}}',
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","traceparent":"00-\\r\\n"}',
        b'{"specversion":"1.0","id":"1","source":"/x","type":"t","tracestate":"'
        + b"x" * 9000
        + b'"}',
    ]
    for value in poisons:
        try:
            verifier.verify(decode_kafka(structured, value), "kafka:t")
        except TrustError as error:
            assert error.reason is Reason.MALFORMED, value[:60]
        else:
            raise AssertionError(f"accepted {value[:60]!r}")


def test_text_data_with_a_lone_surrogate_is_malformed() -> None:
    from trusthop.bindings import decode_structured
    from trusthop.errors import Reason, TrustError

    body = (
        b'{"specversion":"1.0","id":"x","source":"/s","type":"t",'
        b'"datacontenttype":"text/plain","data":"\\ud800"}'
    )
    try:
        decode_structured(body)
    except TrustError as error:
        assert error.reason is Reason.MALFORMED
    else:
        raise AssertionError("accepted")


def test_origin_actors_must_be_a_collection_not_one_id() -> None:
    import pytest

    from trusthop.bundle import TrustBundle
    from trusthop.pipeline import ChainVerifier

    with pytest.raises(TypeError):
        ChainVerifier(TrustBundle(), origin_actors="spiffe://prod.example.com/gateway")
