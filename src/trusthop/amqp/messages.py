"""AMQP messages without I/O: verification of a delivery, dead-letter headers and names.

Pure helpers of :class:`~trusthop.amqp.worker.TrustedWorker`: decode and
verify one delivered message against ``amqp:<exchange>/<routing key>``, build
the headers of its dead letter, name the dead-letter queue of a queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aio_pika.abc import HeadersType
from pamqp.common import FieldValue

from trusthop.bindings.amqp import decode_amqp
from trusthop.destination import amqp_destination
from trusthop.errors import Reason, TrustError
from trusthop.pipeline import ChainVerifier, Rejection, TrustedEvent

DEFAULT_DEAD_LETTER_EXCHANGE = "trusthop.dlx"
DLQ_SUFFIX = ".dlq"

# Headers never copied from a rejected message into its dead letter:
# ``trusthop-*`` (only the worker writes those) and the sender-selected
# distribution headers RabbitMQ acts on at publish time (``CC`` would route
# copies of an attacker's message to other queues bound to the DLX).
_OWN_PREFIX = "trusthop-"
_ROUTING_HEADERS = frozenset({"cc", "bcc"})


def dead_letter_queue_name(queue: str) -> str:
    """The dead-letter queue of ``queue`` (``<queue>.dlq``)."""
    return queue + DLQ_SUFFIX


def _source(exchange: str | None, routing_key: str | None) -> tuple[str, TrustError | None]:
    """The delivery's destination, or a label and the rejection it implies."""
    exchange, routing_key = exchange or "", routing_key or ""
    try:
        return amqp_destination(exchange, routing_key), None
    except ValueError as exc:
        # No trusthop publisher can have signed for this exchange name.
        return f"amqp:{exchange}/{routing_key}", TrustError(Reason.WRONG_DESTINATION, str(exc))


def verify_delivery(
    verifier: ChainVerifier,
    *,
    headers: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None,
    exchange: str | None,
    routing_key: str | None,
) -> TrustedEvent:
    """Decode and verify one delivered message, as the worker does.

    Pure (no I/O). ``x-*`` and other non-CloudEvents headers are ignored by
    the decoder, so they are neither trusted nor covered by the digest.

    Raises:
        TrustError: the only exception, whatever the headers and body hold.
    """
    destination, refused = _source(exchange, routing_key)
    if refused is not None:
        raise refused
    wire = decode_amqp(headers, body, content_type)
    return verifier.verify(wire, destination)


def _reencodable(value: Any) -> FieldValue:
    # pamqp decodes a non-UTF-8 long string as ``bytes`` but refuses to encode
    # ``bytes``; ``bytearray`` travels as a byte array.
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {str(k): _reencodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reencodable(v) for v in value]
    return value  # type: ignore[no-any-return]


def dead_letter_headers(headers: Mapping[str, Any] | None, rejection: Rejection) -> HeadersType:
    """Headers of a dead letter: the original ones plus the rejection's.

    Original ``trusthop-*`` headers are dropped (a sender cannot forge a
    verdict), as are ``CC``/``BCC`` (RabbitMQ would route extra copies);
    values are made encodable again (``bytes`` become ``bytearray``).
    """
    out: HeadersType = {}
    for key, value in (headers or {}).items():
        name = str(key)
        lowered = name.lower()
        if lowered.startswith(_OWN_PREFIX) or lowered in _ROUTING_HEADERS:
            continue
        out[name] = _reencodable(value)
    out.update(rejection.headers())
    return out
