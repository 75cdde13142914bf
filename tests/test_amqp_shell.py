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
from aio_pika.message import ProcessContext
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ConnectionFrameError
from chainkit import BUNDLE, EDGE, MALLORY_KEY, NOW, ORDERS, S0, T0
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import encode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from trusthop.amqp import (
    H_HEADERS_BYTES,
    H_HEADERS_DROPPED,
    H_RETRY,
    Delivery,
    PublishRefused,
    TrustedPublisher,
    TrustedWorker,
    check_delivery,
    dead_letter_headers,
    dead_letter_queue_name,
    delivery_matches_bindings,
    minimal_dead_letter_headers,
    parse_retry,
    retry_attempt,
    retry_headers,
    retry_queue_arguments,
    retry_queue_name,
    routing_key_matches,
    signed_destination,
    verify_delivery,
)
from trusthop.amqp.messages import (
    DEFAULT_FRAME_MAX,
    encoded_headers_size,
    header_budget,
    retry_delay_ms,
)
from trusthop.bindings.amqp import encode_amqp
from trusthop.bundle import TrustBundle
from trusthop.destination import amqp_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import (
    H_ATTEMPTS,
    H_CONSUMER,
    H_DESTINATION,
    H_DETAIL,
    H_REASON,
    H_SOURCE,
    ChainSigner,
    ChainVerifier,
    Rejection,
)
from trusthop.replay import DeliveryKind
from trusthop.sign import Identity, mint_origin
from trusthop.stores import MemoryReplayStore, StoreError
from trusthop.verify import Limits

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
    **routing: Any,
) -> Any:
    return verify_delivery(
        VERIFIER,
        headers=headers,
        body=body,
        content_type=content_type,
        exchange=exchange,
        routing_key=routing_key,
        **routing,
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


# --------------------------------------------------------------------------- #
# routing checks: CC/BCC headers and the queue's bindings
# --------------------------------------------------------------------------- #

# (binding key, routing key, whether RabbitMQ's topic exchange routes it);
# integration/test_amqp.py compares routing_key_matches with RabbitMQ on every
# pattern and key of this table (and more).
TOPIC_CASES = [
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#", ".", True),
    ("*", "", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*", ".", False),  # two empty words
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "a.", True),
    ("a.#", "b.a", False),
    ("a.#", "ab", False),
    ("a.#", "", False),
    ("#.b", "b", True),
    ("#.b", "a.b", True),
    ("#.b", "x.y.b", True),
    ("#.b", "b.a", False),
    ("#.b", "", False),
    ("*.b.#", "x.b", True),
    ("*.b.#", "x.b.c.d", True),
    ("*.b.#", ".b", True),  # '*' takes an empty word
    ("*.b.#", "b", False),
    ("*.b.#", "x.y.b", False),
    ("*.b.#", "", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a..c", True),
    ("a.*.c", "a.c", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.x.y.c", True),
    ("a.#.c", "a.c.x", False),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    ("#.a.#", "a", True),
    ("#.a.#", "x.a.y", True),
    ("#.a.#", "x.y", False),
    ("", "", True),
    ("", "a", False),
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a*", "ab", False),  # a wildcard inside a word is literal
    ("a*", "a*", True),
    ("a.*", "a.*", True),
    ("a.", "a", False),
    ("*.", "a.", True),
]


@pytest.mark.parametrize(("binding_key", "routing_key", "expected"), TOPIC_CASES)
def test_routing_key_matches_like_a_topic_exchange(
    binding_key: str, routing_key: str, expected: bool
) -> None:
    assert routing_key_matches(binding_key, routing_key) is expected


def test_many_hashes_stay_fast() -> None:
    pattern = ".".join(["#"] * 60 + ["z"])
    assert routing_key_matches(pattern, ".".join(["a"] * 120)) is False
    assert routing_key_matches(pattern, ".".join(["a"] * 120 + ["z"])) is True


def test_delivery_matches_bindings() -> None:
    bindings = [("orders", "order.*"), ("audit", "#")]
    allowed = delivery_matches_bindings
    assert allowed("orders", "order.placed", queue="q", bindings=bindings)
    assert not allowed("orders", "order.placed.eu", queue="q", bindings=bindings)
    assert not allowed("payments", "order.placed", queue="q", bindings=bindings)
    assert allowed("audit", "", queue="q", bindings=bindings)
    # The default exchange routes by queue name, and only that.
    assert allowed("", "q", queue="q", bindings=())
    assert allowed(None, "q", queue="q", bindings=())
    assert not allowed("", "other", queue="q", bindings=bindings)
    assert not allowed("orders", "q", queue="q", bindings=())
    assert not allowed(None, None, queue="q", bindings=bindings)


@pytest.mark.parametrize("name", ["CC", "BCC", "cc", "Bcc"])
@pytest.mark.parametrize("value", [["order.placed"], [], "order.placed", None])
def test_cc_and_bcc_headers_are_refused(name: str, value: Any) -> None:
    with pytest.raises(TrustError) as info:
        verify({**HEADERS, name: value})
    assert info.value.reason is Reason.WRONG_DESTINATION
    assert name in info.value.message


def test_deliveries_are_checked_against_the_queues_bindings() -> None:
    def check(bindings: Any, exchange: str = EXCHANGE, routing_key: str = ROUTING_KEY) -> Any:
        return verify(
            HEADERS, exchange=exchange, routing_key=routing_key, queue="billing", bindings=bindings
        )

    assert check([(EXCHANGE, ROUTING_KEY)]).event.get_id() == "evt-1"
    assert check([(EXCHANGE, "order.#"), ("other", "x")]).event.get_id() == "evt-1"
    for bindings in ([(EXCHANGE, "order.cancelled")], [("other", ROUTING_KEY)], []):
        with pytest.raises(TrustError) as info:
            check(bindings)
        assert info.value.reason is Reason.WRONG_DESTINATION
        assert "none of the bindings" in info.value.message
    # Without bindings only the chain's destination is checked.
    assert verify(HEADERS, queue="billing", bindings=None).event.get_id() == "evt-1"
    # Through the default exchange the chain must name amqp:/<queue>.
    with pytest.raises(TrustError) as info:
        check([], exchange="", routing_key="billing")
    assert info.value.reason is Reason.WRONG_DESTINATION
    assert "signed for" in info.value.message
    with pytest.raises(ValueError, match="queue="):
        verify(HEADERS, bindings=[(EXCHANGE, ROUTING_KEY)])


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


def test_oversized_or_unencodable_headers_are_left_out_of_the_dead_letter() -> None:
    rejection = Rejection(Reason.MALFORMED, "no specversion", DESTINATION, "billing")
    original: dict[str, Any] = {"pad": "A" * 130_990, "app": 1, "trusthop-reason": "x"}
    full = dead_letter_headers(original, rejection)
    assert full["pad"] == original["pad"]  # without a budget, everything is copied
    size = encoded_headers_size(full)
    assert size is not None and size > DEFAULT_FRAME_MAX - 8  # more than one frame holds

    reduced = dead_letter_headers(original, rejection, max_bytes=header_budget(None))
    assert reduced == minimal_dead_letter_headers(original, rejection)
    assert {k: reduced[k] for k in rejection.headers()} == rejection.headers()
    assert reduced[H_HEADERS_DROPPED] == "3"
    copied = encoded_headers_size({"pad": original["pad"], "app": 1})
    assert reduced[H_HEADERS_BYTES] == str(copied)
    assert set(reduced) == {*rejection.headers(), H_HEADERS_DROPPED, H_HEADERS_BYTES}
    assert (encoded_headers_size(reduced) or 0) < 4096

    # Just under the budget: kept; one byte over: reduced.
    small = {"pad": "A" * 10}
    room = header_budget(None) - (encoded_headers_size(dead_letter_headers(small, rejection)) or 0)
    fits = {"pad": "A" * (10 + room)}
    assert dead_letter_headers(fits, rejection, max_bytes=header_budget(None))["pad"] == fits["pad"]
    over = {"pad": "A" * (11 + room)}
    assert H_HEADERS_DROPPED in dead_letter_headers(over, rejection, max_bytes=header_budget(None))

    # A value pamqp cannot encode would make every publish fail: left out too.
    for bad in (decimal.Decimal("NaN"), 2**64, object()):
        out = dead_letter_headers({"bad": bad, "ok": "1"}, rejection, max_bytes=10**9)
        assert out[H_HEADERS_DROPPED] == "2" and out[H_HEADERS_BYTES] == "unencodable"
        assert "ok" not in out and encode.field_table(out)
    assert minimal_dead_letter_headers(None, rejection)[H_HEADERS_DROPPED] == "0"


def test_header_budget() -> None:
    assert header_budget(None) == header_budget(0) == DEFAULT_FRAME_MAX - 4096
    assert header_budget(65536) == 65536 - 4096
    assert header_budget(4096) == 2048  # never below half a frame
    assert encoded_headers_size({}) == 4


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


def test_accept_bindings_registration() -> None:
    worker = TrustedWorker(FakeChannel(None), verifier=VERIFIER)  # type: ignore[arg-type]

    async def handle(delivery: Any) -> None:
        return None

    worker.handler("a", declare=False, accept_bindings=[("orders", "order.*")])(handle)
    worker.handler("b", bind=[("orders", "x")], accept_bindings=[])(handle)
    worker.handler("c", accept_bindings=[])(handle)  # only the default exchange
    for bad in (("orders", "order.placed"), [("orders",)], [(1, "k")], [("orders", 5)]):
        with pytest.raises(ValueError, match="pairs"):
            worker.handler("d", accept_bindings=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pairs"):
        worker.handler("d", bind=("orders", "order.placed"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# the worker's dead-letter ladder, with a stand-in channel and messages
# --------------------------------------------------------------------------- #


class LadderQueue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.callback: Any = None

    async def bind(self, exchange: Any, routing_key: str) -> None:
        return None

    async def consume(self, callback: Any, no_ack: bool = False) -> str:
        self.callback = callback
        return "tag"

    async def cancel(self, tag: str) -> None:
        return None


class LadderExchange:
    """An exchange whose publishes follow a script of outcomes."""

    def __init__(self, outcomes: list[Any], name: str = "dlx") -> None:
        self.name = name
        self.outcomes = outcomes
        self.published: list[Any] = []
        self.routes: list[tuple[str, bool]] = []

    async def publish(self, message: Any, routing_key: str, *, mandatory: bool = True) -> Any:
        outcome = self.outcomes.pop(0) if self.outcomes else Basic.Ack(delivery_tag=1)
        if isinstance(outcome, BaseException):
            raise outcome
        encode.field_table(message.headers)  # what aiormq does before sending
        self.published.append(message)
        self.routes.append((routing_key, mandatory))
        return outcome


class LadderChannel:
    publisher_confirms = True

    def __init__(self, outcomes: list[Any], *, retry_outcomes: list[Any] | None = None) -> None:
        self.dlx = LadderExchange(outcomes)
        self.default_exchange = LadderExchange(retry_outcomes or [], name="")
        self.queues: dict[str, LadderQueue] = {}
        self.declared: dict[str, dict[str, Any]] = {}
        self.prefetch: int | None = None

    async def set_qos(self, prefetch_count: int) -> None:
        self.prefetch = prefetch_count

    async def declare_exchange(self, name: str, *args: Any, **kwargs: Any) -> LadderExchange:
        return self.dlx

    async def declare_queue(self, name: str, **kwargs: Any) -> LadderQueue:
        self.declared[name] = kwargs
        return self.queues.setdefault(name, LadderQueue(name))

    async def deliver(self, queue: str, message: FakeIncoming) -> None:
        await self.queues[queue].callback(message)


class FakeIncoming:
    """Enough of an aio-pika IncomingMessage for the worker."""

    def __init__(
        self,
        body: bytes,
        headers: dict[str, Any],
        *,
        redelivered: bool = False,
        exchange: str = EXCHANGE,
        routing_key: str = ROUTING_KEY,
        content_type: str | None = None,
    ) -> None:
        self.body = body
        self.headers = headers
        self.redelivered = redelivered
        self.exchange, self.routing_key = exchange, routing_key
        self.content_type = content_type
        self.content_encoding = self.correlation_id = self.reply_to = None
        self.message_id, self.type, self.app_id = "m-1", None, None
        self.delivery_mode, self.priority, self.timestamp = 2, None, None
        self.settled: list[str] = []

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    def process(self, requeue: bool = False, ignore_processed: bool = False) -> Any:
        return ProcessContext(
            self,  # type: ignore[arg-type]
            requeue=requeue,
            reject_on_redelivered=False,
            ignore_processed=ignore_processed,
        )

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("requeue" if requeue else "drop")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("requeue" if requeue else "drop")

    def again(self) -> FakeIncoming:
        """The same message as the broker redelivers it."""
        return FakeIncoming(
            self.body,
            dict(self.headers),
            redelivered=True,
            exchange=self.exchange,
            routing_key=self.routing_key,
            content_type=self.content_type,
        )


def refused() -> PublishRefused:
    return PublishRefused("no route", exchange="dlx", routing_key="billing", returned=True)


def killed() -> ConnectionFrameError:
    return ConnectionFrameError(501, "FRAME_ERROR")


async def ladder(
    outcomes: list[Any], *, abandon_after: float = 0.0
) -> tuple[TrustedWorker, LadderChannel]:
    channel = LadderChannel(outcomes)
    fake: Any = channel
    worker = TrustedWorker(fake, verifier=VERIFIER, abandon_after=abandon_after)

    @worker.handler("billing", bind=[(EXCHANGE, ROUTING_KEY)])
    async def handle(delivery: Delivery) -> None:
        raise AssertionError("junk never reaches the handler")

    await worker.start()
    return worker, channel


JUNK = {"app": "kept", "x-note": "1"}


async def test_dead_letter_lost_with_the_connection_is_sent_as_a_stub_next_time() -> None:
    worker, channel = await ladder([killed()])
    first = FakeIncoming(b"junk", dict(JUNK))
    await channel.deliver("billing", first)
    assert first.settled == ["requeue"] and worker.stats.requeued == 1

    second = first.again()
    await channel.deliver("billing", second)
    assert second.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.body == b"junk" and letter.message_id == "m-1"
    assert letter.headers[H_REASON] == "malformed"
    assert letter.headers[H_HEADERS_DROPPED] == "2" and "app" not in letter.headers
    assert worker.stats.dead_lettered == {Reason.MALFORMED: 1} and worker.stats.abandoned == 0

    # The count was cleared: the same content later gets a full dead letter.
    third = FakeIncoming(b"junk", dict(JUNK))
    await channel.deliver("billing", third)
    assert third.settled == ["ack"] and channel.dlx.published[-1].headers["app"] == "kept"


async def test_a_message_whose_dead_letter_keeps_failing_is_abandoned() -> None:
    worker, channel = await ladder([killed(), killed(), killed()])
    message = FakeIncoming(b"junk", dict(JUNK))
    await channel.deliver("billing", message)  # full letter: connection lost
    again = message.again()
    await channel.deliver("billing", again)  # stub: connection lost
    last = again.again()
    await channel.deliver("billing", last)  # not published again: given up
    assert [message.settled, again.settled, last.settled] == [["requeue"], ["requeue"], ["drop"]]
    assert channel.dlx.published == [] and len(channel.dlx.outcomes) == 1
    assert worker.stats.abandoned == 1 and worker.stats.total_dead_lettered == 0
    # Another message is not affected by this one's count.
    other = FakeIncoming(b"other junk", dict(JUNK))
    await channel.deliver("billing", other)
    assert other.settled == ["requeue"]  # the scripted third failure, full letter
    assert worker.stats.abandoned == 1


async def test_a_short_dead_letter_outage_is_ridden_out_not_abandoned() -> None:
    # Red-team finding: two instant failures used to abandon a valid message
    # while its dead-letter queue was away for half a second.
    worker, channel = await ladder([refused()] * 3, abandon_after=30.0)
    message = FakeIncoming(b"junk", dict(JUNK))
    await channel.deliver("billing", message)
    again = message.again()
    await channel.deliver("billing", again)
    assert [message.settled, again.settled] == [["requeue"], ["requeue"]]
    assert worker.stats.abandoned == 0
    last = again.again()
    await channel.deliver("billing", last)  # the dead-letter queue is back
    assert last.settled == ["ack"] and worker.stats.total_dead_lettered == 1


async def test_a_refused_dead_letter_is_retried_as_a_stub_at_once() -> None:
    worker, channel = await ladder([refused()])
    message = FakeIncoming(b"junk", dict(JUNK))
    await channel.deliver("billing", message)
    assert message.settled == ["ack"] and worker.stats.requeued == 0
    (letter,) = channel.dlx.published
    assert letter.headers[H_HEADERS_DROPPED] == "2"


async def test_refused_twice_is_requeued_then_abandoned_when_redelivered() -> None:
    worker, channel = await ladder([refused()] * 4)
    message = FakeIncoming(b"junk", dict(JUNK))
    await channel.deliver("billing", message)
    assert message.settled == ["requeue"]
    again = message.again()
    await channel.deliver("billing", again)
    assert again.settled == ["drop"] and len(channel.dlx.outcomes) == 2
    assert worker.stats.abandoned == 1 and worker.stats.requeued == 1
    # Already redelivered when first seen: stub tried, then given up at once.
    seen_before = FakeIncoming(b"more junk", dict(JUNK), redelivered=True)
    await channel.deliver("billing", seen_before)
    assert seen_before.settled == ["drop"] and channel.dlx.outcomes == []
    assert worker.stats.abandoned == 2


async def test_oversized_headers_are_not_copied_into_the_dead_letter() -> None:
    worker, channel = await ladder([])
    message = FakeIncoming(b"junk", {"pad": "A" * 130_990})
    await channel.deliver("billing", message)
    assert message.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.headers[H_HEADERS_DROPPED] == "1" and "pad" not in letter.headers
    assert int(letter.headers[H_HEADERS_BYTES]) > 130_990
    assert letter.message_id == "m-1" and letter.delivery_mode == 2  # properties kept
    assert worker.stats.dead_lettered == {Reason.MALFORMED: 1}


# --------------------------------------------------------------------------- #
# the retry path: pure helpers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", 2), ("1", 1), ("1000", 1000), (3, 3), (1000, 1000)],
)
def test_a_retry_header_states_an_attempt(value: Any, expected: int) -> None:
    assert parse_retry(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "02",
        "+2",
        "-2",
        " 2",
        "2 ",
        "2.0",
        "1e3",
        "0x2",
        "1001",
        "10000",
        "99999999999999999999",
        "",
        "two",
        "\u0662",  # ARABIC-INDIC DIGIT TWO: int() reads it, the header must not
        "\u00b2",  # SUPERSCRIPT TWO
        0,
        -1,
        1001,
        2**70,
        True,
        False,
        2.0,
        None,
        b"2",
        bytearray(b"2"),
        ["2"],
        {"n": 2},
        decimal.Decimal(2),
    ],
)
def test_anything_but_a_small_positive_integer_is_no_retry(value: Any) -> None:
    assert parse_retry(value) == 0


def test_only_the_retry_queues_path_can_carry_a_retry() -> None:
    headers = {H_RETRY: "2"}
    assert retry_attempt(headers, exchange="", routing_key="billing", queue="billing") == 2
    assert retry_attempt(headers, exchange=None, routing_key="billing", queue="billing") == 2
    # Through any exchange, or to another queue name: the header is ignored.
    assert retry_attempt(headers, exchange=EXCHANGE, routing_key="billing", queue="billing") == 0
    assert retry_attempt(headers, exchange="", routing_key="billing.retry", queue="billing") == 0
    assert retry_attempt(headers, exchange="", routing_key="other", queue="billing") == 0
    assert retry_attempt(None, exchange="", routing_key="billing", queue="billing") == 0
    # Exact header name only.
    upper = {"Trusthop-Retry": "2"}
    assert retry_attempt(upper, exchange="", routing_key="billing", queue="billing") == 0


def test_a_retry_copy_keeps_the_application_headers_and_states_its_attempt() -> None:
    original = {
        **HEADERS,
        "app": "kept",
        "blob": b"\xff",
        "trusthop-reason": "forged",
        "trusthop-retry": "9",
        "CC": ["elsewhere"],
        "x-death": [{"count": 5, "queue": "billing.retry"}],
        "x-first-death-queue": "billing.retry",
        "x-last-death-reason": "expired",
    }
    copy = retry_headers(original, attempts=2, retry=3)
    assert copy[H_RETRY] == "3" and copy[H_ATTEMPTS] == "2"
    assert copy["app"] == "kept" and copy["blob"] == bytearray(b"\xff")
    for name in ("trusthop-reason", "CC", "x-death", "x-first-death-queue", "x-last-death-reason"):
        assert name not in copy
    assert {k: v for k, v in copy.items() if k.startswith("cloudEvents_")} == HEADERS
    encode.field_table(copy)  # publishable as is


def test_retry_queue_names_and_arguments() -> None:
    assert retry_queue_name("billing") == "billing.retry"
    assert retry_queue_arguments("billing", 0.3) == {
        "x-message-ttl": 300,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "billing",
    }
    assert retry_delay_ms(0.0001) == 1 and retry_delay_ms(2) == 2000
    bad: Any
    for bad in (0, -1, float("nan"), float("inf"), True, "1", 3e6):
        with pytest.raises(ValueError, match="retry_delay"):
            retry_delay_ms(bad)


def test_the_signed_destination_of_a_message_when_it_decodes() -> None:
    limits = Limits()
    assert signed_destination(HEADERS, BODY, CONTENT_TYPE, limits=limits) == DESTINATION
    assert signed_destination({}, b"junk", None, limits=limits) is None
    no_chain = {k: v for k, v in HEADERS.items() if k != "cloudEvents_trustchain"}
    assert signed_destination(no_chain, BODY, CONTENT_TYPE, limits=limits) is None
    assert signed_destination(HEADERS, BODY, CONTENT_TYPE, limits=Limits(max_bytes=10)) is None


def test_check_delivery_decodes_and_names_where_it_came_from() -> None:
    wire, destination = check_delivery(
        headers=HEADERS,
        body=BODY,
        content_type=CONTENT_TYPE,
        exchange=EXCHANGE,
        routing_key=ROUTING_KEY,
    )
    assert destination == DESTINATION and wire.id == "evt-1"
    with pytest.raises(TrustError) as info:
        check_delivery(
            headers=HEADERS,
            body=BODY,
            content_type=CONTENT_TYPE,
            exchange="elsewhere",
            routing_key=ROUTING_KEY,
            queue="billing",
            bindings=[(EXCHANGE, ROUTING_KEY)],
        )
    assert info.value.reason is Reason.WRONG_DESTINATION


# --------------------------------------------------------------------------- #
# the worker's admission and retry path, with a stand-in channel
# --------------------------------------------------------------------------- #


def test_worker_replay_options() -> None:
    channel: Any = LadderChannel([])
    one, two = TrustedWorker(channel, verifier=VERIFIER), TrustedWorker(channel, verifier=VERIFIER)
    assert isinstance(one.replay_store, MemoryReplayStore)
    assert one.replay_store is not two.replay_store  # a fresh store per worker

    async def handle(delivery: Any) -> None:
        return None

    store = MemoryReplayStore()
    worker = TrustedWorker(channel, verifier=VERIFIER, replay_store=store, max_uses=3)
    worker.handler("billing")(handle)
    admission = worker.admissions["billing"]
    assert admission.scope == "amqp/billing" and admission.store is store
    assert admission.max_uses == 3 and admission.verifier is VERIFIER
    off = TrustedWorker(channel, verifier=VERIFIER, replay_store=None, retry_queue=False)
    assert off.replay_store is None
    with pytest.raises(ValueError, match="replay store"):
        TrustedWorker(channel, verifier=VERIFIER, replay_store=None)
    for bad in ({"retry_delay": 0}, {"retry_delay": float("nan")}, {"max_uses": 0}):
        with pytest.raises(ValueError):
            TrustedWorker(channel, verifier=VERIFIER, **bad)
    with pytest.raises(ValueError):
        TrustedWorker(channel, verifier=VERIFIER, on_replay="ignore")
    with pytest.raises(ValueError, match="remember"):
        TrustedWorker(channel, verifier=VERIFIER, remember=-1)


class CheckedStore(MemoryReplayStore):
    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error
        self.checked = 0

    async def check(self) -> None:
        self.checked += 1
        if self.error is not None:
            raise self.error


async def test_the_store_is_checked_before_anything_is_declared() -> None:
    async def handle(delivery: Any) -> None:
        return None

    channel = LadderChannel([])
    bad = CheckedStore(StoreError("this Redis may evict entries"))
    worker = TrustedWorker(channel, verifier=VERIFIER, replay_store=bad)  # type: ignore[arg-type]
    worker.handler("billing")(handle)
    with pytest.raises(StoreError, match="evict"):
        await worker.start()
    assert bad.checked == 1 and channel.declared == {} and channel.prefetch is None

    good = CheckedStore(None)
    worker = TrustedWorker(
        channel,  # type: ignore[arg-type]
        verifier=VERIFIER,
        replay_store=good,
        prefetch_count=7,
        retry_delay=0.25,
    )
    worker.handler("billing")(handle)
    await worker.start()
    assert good.checked == 1 and channel.prefetch == 7
    assert channel.declared["billing.retry"] == {
        "durable": True,
        "arguments": retry_queue_arguments("billing", 0.25),
    }
    assert set(channel.declared) == {"billing", "billing.dlq", "billing.retry"}
    await worker.stop()


async def test_in_process_retries_declare_no_retry_queue() -> None:
    channel = LadderChannel([])
    worker = TrustedWorker(channel, verifier=VERIFIER, retry_queue=False)  # type: ignore[arg-type]

    async def handle(delivery: Any) -> None:
        return None

    worker.handler("billing")(handle)
    await worker.start()
    assert set(channel.declared) == {"billing", "billing.dlq"}


def valid(**kwargs: Any) -> FakeIncoming:
    """The sealed event as delivered from its exchange."""
    return FakeIncoming(BODY, dict(HEADERS), content_type=CONTENT_TYPE, **kwargs)


async def failing_worker(
    channel: LadderChannel, *, fail: int, **options: Any
) -> tuple[TrustedWorker, list[Delivery]]:
    """A worker on ``billing`` whose handler fails its first ``fail`` attempts."""
    worker = TrustedWorker(channel, verifier=VERIFIER, **options)  # type: ignore[arg-type]
    calls: list[Delivery] = []

    @worker.handler("billing", bind=[(EXCHANGE, ROUTING_KEY)])
    async def handle(delivery: Delivery) -> None:
        calls.append(delivery)
        if delivery.attempt <= fail:
            raise RuntimeError(f"boom {delivery.attempt}")

    await worker.start()
    return worker, calls


def came_back(copy: Any, queue: str = "billing") -> FakeIncoming:
    """A retry copy as RabbitMQ delivers it after its TTL: default exchange, queue name."""
    return FakeIncoming(
        copy.body, dict(copy.headers), exchange="", routing_key=queue, content_type=CONTENT_TYPE
    )


async def test_a_failed_attempt_goes_through_the_retry_queue_until_max_attempts() -> None:
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=9, max_attempts=2)
    # A retry header on a delivery through the exchange is not believed.
    first = valid()
    first.headers.update({H_RETRY: "2", "app": "kept"})
    await channel.deliver("billing", first)
    assert first.settled == ["ack"] and worker.stats.retried == 1
    ((copy,), (route,)) = channel.default_exchange.published, channel.default_exchange.routes
    assert route == ("billing.retry", True)  # mandatory: a missing retry queue is an error
    assert copy.headers[H_RETRY] == "2" and copy.headers[H_ATTEMPTS] == "1"
    assert copy.headers["app"] == "kept" and copy.body == BODY and copy.message_id == "m-1"
    assert channel.dlx.published == []

    retry = came_back(copy)
    await channel.deliver("billing", retry)
    assert [(d.attempt, d.kind, d.redelivered) for d in calls] == [
        (1, DeliveryKind.FIRST, False),
        (2, DeliveryKind.RETRY, True),
    ]
    assert calls[1].context.destination == DESTINATION  # the remembered destination
    assert retry.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "handler_failed" and letter.headers[H_ATTEMPTS] == "2"
    assert letter.headers[H_DESTINATION] == DESTINATION
    assert letter.headers[H_SOURCE] == "amqp:/billing"
    assert H_RETRY not in letter.headers

    # A second copy of the same retry: a replay, dead-lettered with its attempt.
    twice = came_back(copy)
    await channel.deliver("billing", twice)
    assert len(calls) == 2 and twice.settled == ["ack"]
    assert channel.dlx.published[-1].headers[H_REASON] == "replayed"
    assert channel.dlx.published[-1].headers[H_ATTEMPTS] == "2"
    assert worker.counters["retried"] == 1 and worker.counters["verified"] == 2
    assert worker.counters.rejected == {"handler_failed": 1, "replayed": 1}
    assert worker.stats.dead_lettered == {Reason.HANDLER_FAILED: 1, Reason.REPLAYED: 1}


async def test_a_retry_copy_that_is_not_confirmed_is_dead_lettered_at_once() -> None:
    channel = LadderChannel([], retry_outcomes=[refused()])
    worker, calls = await failing_worker(channel, fail=1)
    message = valid()
    await channel.deliver("billing", message)
    assert len(calls) == 1 and message.settled == ["ack"]  # dead-lettered, not requeued
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "handler_failed" and letter.headers[H_ATTEMPTS] == "1"
    assert "retry 2 not scheduled: PublishRefused" in str(letter.headers[H_DETAIL])
    assert worker.stats.retried == 0 and worker.stats.requeued == 0


async def test_a_retry_copy_too_large_for_a_frame_is_dead_lettered_not_published() -> None:
    channel = LadderChannel([])
    await failing_worker(channel, fail=1)
    message = valid()
    message.headers["pad"] = "A" * 131_000  # arrived at the limit; the copy would not fit
    await channel.deliver("billing", message)
    assert channel.default_exchange.published == [] and message.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert "would not fit" in str(letter.headers[H_DETAIL])


@pytest.mark.parametrize("on_replay", ["reject", "skip"])
async def test_a_copy_of_a_handled_message_is_rejected_or_skipped(on_replay: str) -> None:
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0, on_replay=on_replay)
    original, copy = valid(), valid()
    await channel.deliver("billing", original)
    await channel.deliver("billing", copy)
    assert len(calls) == 1 and original.settled == copy.settled == ["ack"]
    if on_replay == "skip":
        assert channel.dlx.published == [] and worker.stats.skipped == 1
        assert worker.counters["duplicates"] == 1
    else:
        (letter,) = channel.dlx.published
        assert letter.headers[H_REASON] == "replayed"
        assert letter.headers[H_DESTINATION] == DESTINATION


class Died(BaseException):
    """The worker process dies here."""


async def test_a_redelivery_is_handled_again_and_flagged() -> None:
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0)
    first = valid()

    async def die() -> None:
        raise Died

    first.ack = die  # type: ignore[method-assign]  # dies before its ack reaches RabbitMQ
    with pytest.raises(Died):
        await channel.deliver("billing", first)
    again = first.again()
    await channel.deliver("billing", again)
    assert [(d.kind, d.redelivered) for d in calls] == [
        (DeliveryKind.FIRST, False),
        (DeliveryKind.REDELIVERY, True),
    ]
    assert worker.counters["redelivered"] == 1 and worker.stats.delivered == 1
    # Acked now: a copy flagged redelivered (consumed and nacked by someone
    # else on the queue) is a replay, not another redelivery.
    late = first.again()
    await channel.deliver("billing", late)
    assert len(calls) == 2 and channel.dlx.published[-1].headers[H_REASON] == "replayed"


async def test_without_a_store_every_delivery_is_a_first_one() -> None:
    channel = LadderChannel([])
    _, calls = await failing_worker(channel, fail=0, replay_store=None, retry_queue=False)
    await channel.deliver("billing", valid())
    await channel.deliver("billing", valid(redelivered=True))
    assert [(d.kind, d.redelivered) for d in calls] == [
        (DeliveryKind.FIRST, False),
        (DeliveryKind.FIRST, True),  # the broker's flag still tells the handler
    ]


async def test_routing_rejections_are_counted_with_their_destination() -> None:
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0)
    copied = valid()
    copied.headers["CC"] = ["elsewhere"]
    await channel.deliver("billing", copied)
    assert calls == [] and copied.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "wrong_destination"
    assert letter.headers[H_DESTINATION] == DESTINATION
    assert worker.counters.rejected == {"wrong_destination": 1}


class BrokenStore(MemoryReplayStore):
    async def get(self, key: str) -> bytes | None:
        raise OSError("a store that fails outside its contract")


async def test_a_store_failing_outside_its_contract_fails_closed() -> None:
    channel = LadderChannel([])
    worker, calls = await failing_worker(channel, fail=0, replay_store=BrokenStore())
    message = valid()
    await channel.deliver("billing", message)
    assert calls == [] and message.settled == ["ack"]
    (letter,) = channel.dlx.published
    assert letter.headers[H_REASON] == "store_unavailable"
    assert "OSError" in str(letter.headers[H_DETAIL])
    assert worker.counters.rejected == {"store_unavailable": 1}
