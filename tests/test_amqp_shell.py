"""The pure parts of the RabbitMQ shell (no broker): per-message verification,
hostile headers, dead-letter headers, and how publish outcomes are reported.

The broker-facing behaviour is in ``integration/test_amqp.py``.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq.abc import DeliveredMessage
from chainkit import BUNDLE, EDGE, MALLORY_KEY, NOW, ORDERS, S0, T0
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import encode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from trusthop.amqp import (
    PublishRefused,
    TrustedPublisher,
    TrustedWorker,
    dead_letter_headers,
    dead_letter_queue_name,
    verify_delivery,
)
from trusthop.bindings.amqp import encode_amqp
from trusthop.bundle import TrustBundle
from trusthop.destination import amqp_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import H_CONSUMER, H_REASON, ChainSigner, ChainVerifier, Rejection
from trusthop.sign import Identity, mint_origin

EXCHANGE, ROUTING_KEY = "orders", "order.placed"
DESTINATION = amqp_destination(EXCHANGE, ROUTING_KEY)


def clock() -> float:
    return NOW


VERIFIER = ChainVerifier(BUNDLE, clock=clock)


def sealed(*, signer: Identity = EDGE, scope: Any = None, event_id: str = "evt-1") -> WireEvent:
    origin = mint_origin(
        EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="token",
        scope=S0,
        now=T0,
        ttl=3600,
    )
    event = CloudEvent(
        {
            "id": event_id,
            "source": "/shop/orders",
            "type": "order.placed",
            "specversion": "1.0",
            "time": datetime.datetime(2026, 1, 1, 0, 0, 10, tzinfo=datetime.UTC),
            "datacontenttype": "application/json",
        },
        {"order": 42},
    )
    return ChainSigner(signer, clock=clock).seal(
        event, destination=DESTINATION, origin=origin, scope=scope
    )


WIRE = sealed()
HEADERS, BODY, CONTENT_TYPE = encode_amqp(WIRE)


def verify(
    headers: Mapping[str, Any] | None,
    body: bytes = BODY,
    content_type: str | None = CONTENT_TYPE,
    *,
    exchange: str | None = EXCHANGE,
    routing_key: str | None = ROUTING_KEY,
) -> Any:
    return verify_delivery(
        VERIFIER,
        headers=headers,
        body=body,
        content_type=content_type,
        exchange=exchange,
        routing_key=routing_key,
    )


def reason_of(headers: Mapping[str, Any] | None, **kwargs: Any) -> Reason:
    with pytest.raises(TrustError) as info:
        verify(headers, **kwargs)
    return info.value.reason


# --------------------------------------------------------------------------- #
# verify_delivery: what the worker runs before any handler
# --------------------------------------------------------------------------- #


def test_binary_and_structured_deliveries_verify() -> None:
    trusted = verify(HEADERS)
    assert trusted.event.get_id() == "evt-1"
    assert trusted.context.destination == DESTINATION
    assert trusted.context.actors == (EDGE.actor, EDGE.actor)
    headers, body, content_type = encode_amqp(WIRE, structured=True)
    assert headers == {}
    assert verify(headers, body, content_type).context.chain_digest == trusted.context.chain_digest


def test_colon_prefix_and_byte_array_values_are_accepted_on_input() -> None:
    colon = {k.replace("cloudEvents_", "cloudEvents:"): v for k, v in HEADERS.items()}
    assert verify(colon).event.get_id() == "evt-1"
    as_bytes = {k: bytearray(v.encode()) for k, v in HEADERS.items()}
    assert verify(as_bytes).event.get_id() == "evt-1"


def test_broker_and_foreign_headers_are_neither_trusted_nor_signed() -> None:
    noisy: dict[str, Any] = {
        **HEADERS,
        "x-death": [{"count": 3, "reason": "rejected", "queue": "q", "routing-keys": ["a"]}],
        "x-first-death-reason": bytearray(b"\xff\xfe"),
        "x-cloudEvents_id": "spoofed",
        "x-delivery-count": 7,
        "app-decimal": decimal.Decimal("1.5"),
        "app-when": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        "app-null": None,
        "app-float": 2.5,
    }
    trusted = verify(noisy)
    assert trusted.event.get_id() == "evt-1"
    assert "x-cloudEvents_id" not in trusted.wire.attributes


@pytest.mark.parametrize(
    "change",
    [
        {"cloudEvents_subject": {"nested": {"deeper": [1, None, bytearray(b"x")]}}},
        {"cloudEvents_subject": ["a", 1]},
        {"cloudEvents_subject": None},
        {"cloudEvents_subject": bytearray(b"\xff\xfe\x80")},
        {"cloudEvents_subject": b"\xc3\x28"},  # pamqp hands non-UTF-8 strings over as bytes
        {"cloudEvents_subject": 1.5},
        {"cloudEvents_subject": decimal.Decimal("1")},
        {"cloudEvents_subject": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)},
        {"CloudEvents_subject": "s"},
        {"cloudevents_subject": "s"},
        {"CLOUDEVENTS:subject": "s"},
        {"cloudEvents:id": "evt-1"},  # same attribute under both prefixes
        {"cloudEvents_datacontenttype": "text/plain"},
        {"cloudEvents_trustchain": 5},
        {"cloudEvents_trustchain": {"v": "x"}},
        {"cloudEvents_trustchain": "!!not base64url!!"},
        {"cloudEvents_": "empty name"},
        {"cloudEvents_specversion": "0.3"},
        {"cloudEvents_time": "yesterday"},
        {"cloudEvents_time": "0000-01-01T00:00:00+01:00"},
    ],
    ids=repr,
)
def test_hostile_headers_are_malformed(change: dict[str, Any]) -> None:
    assert reason_of({**HEADERS, **change}) is Reason.MALFORMED


@pytest.mark.parametrize(
    ("headers", "body", "content_type"),
    [
        (None, BODY, CONTENT_TYPE),
        ({}, b"", None),
        ({}, b"{not json", "application/cloudevents+json"),
        ({}, b"[1, 2]", "application/cloudevents+json"),
        ({"cloudEvents_id": "x"}, b"{}", "application/cloudevents+json"),
    ],
)
def test_undecodable_messages_are_malformed(
    headers: Mapping[str, Any] | None, body: bytes, content_type: str | None
) -> None:
    assert reason_of(headers, body=body, content_type=content_type) is Reason.MALFORMED


def test_missing_chain() -> None:
    unsealed, body, content_type = encode_amqp(WireEvent(dict(WIRE.attributes), WIRE.data))
    assert reason_of(unsealed, body=body, content_type=content_type) is Reason.MISSING_CHAIN


def test_delivery_is_judged_against_where_it_was_consumed() -> None:
    assert reason_of(HEADERS, exchange="replay") is Reason.WRONG_DESTINATION
    assert reason_of(HEADERS, routing_key="order.cancelled") is Reason.WRONG_DESTINATION
    assert reason_of(HEADERS, exchange=None, routing_key=None) is Reason.WRONG_DESTINATION
    # No trusthop publisher can sign for an exchange whose name holds '/'.
    assert reason_of(HEADERS, exchange="orders/order.placed", routing_key="") is (
        Reason.WRONG_DESTINATION
    )


def test_tampering_and_unknown_keys() -> None:
    assert reason_of(HEADERS, body=BODY.replace(b"42", b"43")) is Reason.EVENT_MISMATCH
    assert reason_of(HEADERS, body=b"\xff not json") is Reason.EVENT_MISMATCH  # digest first
    assert reason_of({**HEADERS, "cloudEvents_subject": "injected"}) is Reason.EVENT_MISMATCH
    rogue = Identity.create(ORDERS.actor, MALLORY_KEY)
    headers, body, content_type = encode_amqp(sealed(signer=rogue))
    with pytest.raises(TrustError) as info:
        verify_delivery(
            ChainVerifier(TrustBundle.of([EDGE.bundle_key]), clock=clock),
            headers=headers,
            body=body,
            content_type=content_type,
            exchange=EXCHANGE,
            routing_key=ROUTING_KEY,
        )
    assert info.value.reason is Reason.UNKNOWN_KEY


_names = st.sampled_from(
    [
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "trustchain",
        "datacontenttype",
        "data",
        "traceparent",
        "",
        "A",
        "x" * 21,
    ]
)
_prefixes = st.sampled_from(
    ["cloudEvents_", "cloudEvents:", "CloudEvents_", "cloudevents:", "CLOUDEVENTS_", "x-", ""]
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=20),
    st.binary(max_size=20).map(bytearray),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.just(datetime.UTC)),
    st.sampled_from(["1.0", "2026-01-01T00:00:10Z", "9999-12-31T23:59:59.999999999-23:59"]),
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_keys = st.builds(str.__add__, _prefixes, _names) | st.text(max_size=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    extra=st.dictionaries(_keys, _values, max_size=6),
    keep=st.booleans(),
    body=st.sampled_from([BODY, b"", b"\x00\xff", b'{"specversion":"1.0"}', b"[]"]),
    content_type=st.sampled_from(
        [CONTENT_TYPE, None, "", "application/cloudevents+json", "text/plain"]
    ),
)
def test_only_trust_errors_come_out_whatever_the_headers(
    extra: dict[str, Any], keep: bool, body: bytes, content_type: str | None
) -> None:
    headers = {**HEADERS, **extra} if keep else extra
    try:
        trusted = verify(headers, body, content_type)
    except TrustError as error:
        assert isinstance(error.reason, Reason)
    else:  # only possible when nothing signed was changed
        assert trusted.wire.digest() == WIRE.digest()


# --------------------------------------------------------------------------- #
# dead-letter headers
# --------------------------------------------------------------------------- #


def test_dead_letter_headers_keep_originals_and_carry_the_verdict() -> None:
    rejection = Rejection(Reason.EVENT_MISMATCH, "digest differs", DESTINATION, "billing")
    original: dict[str, Any] = {
        **HEADERS,
        "x-death": [{"count": 1, "reason": b"\xff"}],
        "app-raw": b"\xc3\x28",  # what pamqp gives for a non-UTF-8 long string
        "trusthop-reason": "handler_failed",  # forged verdicts...
        "TrustHop-Consumer": "someone-else",
        "trusthop-extra": "1",
        "CC": ["other-queue"],  # ...and sender-selected routing
        "bcc": ["hidden"],
    }
    out = dead_letter_headers(original, rejection)
    assert {k: out[k] for k in HEADERS} == HEADERS
    assert out[H_REASON] == "event_mismatch" and out[H_CONSUMER] == "billing"
    assert {k for k in out if k.lower().startswith("trusthop-")} == set(rejection.headers())
    assert "CC" not in out and "bcc" not in out
    assert out["app-raw"] == bytearray(b"\xc3\x28")
    assert out["x-death"] == [{"count": 1, "reason": bytearray(b"\xff")}]
    # What the worker re-publishes must be encodable; the raw headers are not.
    assert encode.field_table(out)
    with pytest.raises(TypeError):
        encode.field_table(original)


def test_dead_letter_queue_name() -> None:
    assert dead_letter_queue_name("billing") == "billing.dlq"
    assert dead_letter_headers(None, Rejection(Reason.MALFORMED, "x", "s", "q")) == {
        **Rejection(Reason.MALFORMED, "x", "s", "q").headers()
    }


# --------------------------------------------------------------------------- #
# publish outcomes, with a stand-in channel (no broker)
# --------------------------------------------------------------------------- #


class FakeExchange:
    def __init__(self, name: str, outcome: Any) -> None:
        self.name = name
        self.outcome = outcome
        self.published: list[tuple[Any, str, bool]] = []

    async def publish(self, message: Any, routing_key: str, *, mandatory: bool = True) -> Any:
        self.published.append((message, routing_key, mandatory))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class FakeChannel:
    def __init__(self, outcome: Any, *, publisher_confirms: bool = True) -> None:
        self.publisher_confirms = publisher_confirms
        self.exchange = FakeExchange("orders", outcome)
        self.default_exchange = FakeExchange("", outcome)

    async def get_exchange(self, name: str, *, ensure: bool = True) -> FakeExchange:
        assert not ensure and name == self.exchange.name
        return self.exchange


RETURN = Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="orders", routing_key="rk")


def returned_message() -> DeliveredMessage:
    return DeliveredMessage(
        delivery=RETURN,
        header=ContentHeader(),
        body=b"",
        channel=None,  # type: ignore[arg-type]
    )


def publisher(outcome: Any) -> tuple[TrustedPublisher, FakeChannel]:
    channel = FakeChannel(outcome)
    return TrustedPublisher(channel, signer=ChainSigner(EDGE, clock=clock)), channel  # type: ignore[arg-type]


def origin() -> Any:
    return mint_origin(
        EDGE, subject="user:alice", issuer="https://idp", credential="t", scope=S0, now=T0
    )


def event() -> CloudEvent:
    return CloudEvent({"id": "e", "source": "/s", "type": "t", "specversion": "1.0"}, None)


async def test_confirmed_publish_returns_the_sealed_event() -> None:
    pub, channel = publisher(Basic.Ack(delivery_tag=1))
    wire = await pub.publish(event(), exchange="orders", routing_key="rk", origin=origin())
    ((message, routing_key, mandatory),) = channel.exchange.published
    assert (routing_key, mandatory) == ("rk", True)
    assert message.headers["cloudEvents_trustchain"] == wire.chain
    assert all(isinstance(v, str) for v in message.headers.values())
    assert message.delivery_mode == 2 and message.message_id
    trusted = verify_delivery(
        VERIFIER,
        headers=message.headers,
        body=message.body,
        content_type=message.content_type,
        exchange="orders",
        routing_key="rk",
    )
    assert trusted.context.destination == "amqp:orders/rk"


@pytest.mark.parametrize(
    "outcome",
    [returned_message(), PublishError(returned_message(), RETURN)],
    ids=["returned", "on_return_raises"],
)
async def test_a_returned_message_raises(outcome: Any) -> None:
    pub, _ = publisher(outcome)
    with pytest.raises(PublishRefused) as refused:
        await pub.publish(event(), exchange="orders", routing_key="rk", origin=origin())
    assert refused.value.returned and refused.value.reply_code == 312
    assert refused.value.reply_text == "NO_ROUTE"


async def test_a_nack_raises() -> None:
    pub, _ = publisher(DeliveryError(None, Basic.Nack(delivery_tag=1)))
    with pytest.raises(PublishRefused) as refused:
        await pub.publish(event(), routing_key="q", origin=origin())
    assert not refused.value.returned and refused.value.exchange == ""


async def test_producer_side_trust_failures_publish_nothing() -> None:
    pub, channel = publisher(Basic.Ack(delivery_tag=1))
    parent = VERIFIER.verify(sealed(scope={"orders:write"}), DESTINATION).context
    with pytest.raises(TrustError) as info:
        await pub.publish(event(), exchange="orders", routing_key="rk", parent=parent, scope=S0)
    assert info.value.reason is Reason.SCOPE_ESCALATION
    with pytest.raises(ValueError, match="must not contain"):
        await pub.publish(event(), exchange="a/b", routing_key="rk", origin=origin())
    with pytest.raises(ValueError, match="exactly one"):
        await pub.publish(event(), exchange="orders", routing_key="rk")
    assert channel.exchange.published == [] and channel.default_exchange.published == []


def test_wrappers_require_publisher_confirms() -> None:
    plain = FakeChannel(None, publisher_confirms=False)
    with pytest.raises(ValueError, match="publisher_confirms"):
        TrustedPublisher(plain, signer=ChainSigner(EDGE))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="publisher_confirms"):
        TrustedWorker(plain, verifier=VERIFIER)  # type: ignore[arg-type]


def test_handler_registration() -> None:
    worker = TrustedWorker(FakeChannel(None), verifier=VERIFIER)  # type: ignore[arg-type]

    async def handle(delivery: Any) -> None:
        return None

    assert worker.handler("billing")(handle) is handle
    with pytest.raises(ValueError, match="already has a handler"):
        worker.handler("billing")
    with pytest.raises(ValueError, match="needs a name"):
        worker.handler("")
    with pytest.raises(ValueError, match="at least 1"):
        TrustedWorker(FakeChannel(None), verifier=VERIFIER, max_attempts=0)  # type: ignore[arg-type]


def test_bare_namespace_is_not_a_channel() -> None:
    with pytest.raises(ValueError, match="publisher_confirms"):
        TrustedPublisher(SimpleNamespace(), signer=ChainSigner(EDGE))  # type: ignore[arg-type]
