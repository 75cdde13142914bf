"""AMQP publisher wrapper: seal a CloudEvent and publish it with publisher confirms.

:class:`TrustedPublisher` seals for ``amqp:<exchange>/<routing key>`` and
waits for the broker's confirm; anything but an ack (a nack, or a return of an
unroutable ``mandatory`` message) raises :class:`PublishRefused`. The confirm
helpers are shared with the worker, which publishes dead letters the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import aio_pika
from aio_pika import DeliveryMode
from aio_pika.abc import AbstractChannel, AbstractExchange, HeadersType
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq.abc import DeliveredMessage
from cloudevents.core.v1.event import CloudEvent

from trusthop.bindings.amqp import encode_amqp
from trusthop.chain import OriginRing
from trusthop.destination import amqp_destination
from trusthop.event import WireEvent
from trusthop.pipeline import ChainSigner
from trusthop.verify import VerifiedContext


class PublishRefused(Exception):
    """The broker did not take responsibility for a published message.

    Attributes:
        exchange: exchange name the message was published to.
        routing_key: its routing key.
        returned: ``True`` when the broker returned the message as unroutable
            (``mandatory`` and no binding matched), ``False`` for a nack.
        reply_code: AMQP reply code of a return (``312`` NO_ROUTE), else ``None``.
        reply_text: AMQP reply text of a return, else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        exchange: str,
        routing_key: str,
        returned: bool,
        reply_code: int | None = None,
        reply_text: str | None = None,
    ) -> None:
        super().__init__(message)
        self.exchange = exchange
        self.routing_key = routing_key
        self.returned = returned
        self.reply_code = reply_code
        self.reply_text = reply_text


def _returned(exchange: str, routing_key: str, frame: object) -> PublishRefused:
    code = getattr(frame, "reply_code", None)
    text = getattr(frame, "reply_text", None)
    return PublishRefused(
        f"broker returned the message published to exchange {exchange!r} with routing key "
        f"{routing_key!r}: {code} {text} (no queue is bound for it)",
        exchange=exchange,
        routing_key=routing_key,
        returned=True,
        reply_code=code if isinstance(code, int) else None,
        reply_text=text if isinstance(text, str) else None,
    )


async def _publish_confirmed(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    *,
    routing_key: str,
    mandatory: bool,
) -> None:
    """Publish and wait for the broker's confirm; refuse anything but an ack.

    aio-pika 10 reports an unroutable ``mandatory`` message in two ways,
    depending on the channel's ``on_return_raises``: it raises
    :class:`aio_pika.exceptions.PublishError`, or (the default) it *returns*
    the returned message instead of the ``Basic.Ack``. Both become
    :class:`PublishRefused`, as does a nack (``DeliveryError``).
    """
    name = exchange.name
    try:
        result = await exchange.publish(message, routing_key=routing_key, mandatory=mandatory)
    except PublishError as exc:  # returned, channel opened with on_return_raises=True
        raise _returned(name, routing_key, exc.frame) from exc
    except DeliveryError as exc:  # Basic.Nack / Basic.Reject
        raise PublishRefused(
            f"broker refused (nacked) the message published to exchange {name!r} with "
            f"routing key {routing_key!r}",
            exchange=name,
            routing_key=routing_key,
            returned=False,
        ) from exc
    if isinstance(result, DeliveredMessage):  # returned, on_return_raises=False
        raise _returned(name, routing_key, result.delivery)
    if result is None:  # only without publisher confirms, which the wrappers refuse
        raise RuntimeError("publish not confirmed: the channel needs publisher_confirms=True")


def _require_confirms(channel: AbstractChannel, owner: str) -> None:
    if not getattr(channel, "publisher_confirms", False):
        raise ValueError(
            f"{owner} needs a channel opened with publisher_confirms=True "
            "(connection.channel(publisher_confirms=True))"
        )


class TrustedPublisher:
    """Seals CloudEvents and publishes them with publisher confirms.

    Args:
        channel: an aio-pika channel opened with ``publisher_confirms=True``
            (a robust channel from ``connect_robust`` is fine).
        signer: the workload's :class:`~trusthop.pipeline.ChainSigner`.
        structured: publish in structured mode
            (``application/cloudevents+json`` body) instead of binary mode
            (``cloudEvents_*`` headers).

    Raises:
        ValueError: the channel does not use publisher confirms.
    """

    def __init__(
        self, channel: AbstractChannel, *, signer: ChainSigner, structured: bool = False
    ) -> None:
        _require_confirms(channel, "TrustedPublisher")
        self.channel = channel
        self.signer = signer
        self.structured = structured
        self._exchanges: dict[str, AbstractExchange] = {}

    async def _resolve(self, exchange: str | AbstractExchange) -> AbstractExchange:
        if not isinstance(exchange, str):
            return exchange
        if exchange == "":
            return self.channel.default_exchange
        found = self._exchanges.get(exchange)
        if found is None:
            # No declaration and no round trip: the exchange must already exist.
            found = await self.channel.get_exchange(exchange, ensure=False)
            self._exchanges[exchange] = found
        return found

    async def publish(
        self,
        event: CloudEvent,
        *,
        exchange: str | AbstractExchange = "",
        routing_key: str,
        origin: OriginRing | None = None,
        parent: VerifiedContext | None = None,
        scope: Iterable[str] | None = None,
        mandatory: bool = True,
        persistent: bool = True,
        consumed_event_id: str | None = None,
    ) -> WireEvent:
        """Seal ``event`` for ``amqp:<exchange>/<routing_key>`` and publish it.

        Exactly one of ``origin`` (first event of a request, at the edge) or
        ``parent`` (the :attr:`Delivery.context` of the event this one derives
        from) is given; ``scope`` narrows the chain's scope;
        ``consumed_event_id`` also records the parent event's id in the new
        ring (see :meth:`~trusthop.pipeline.ChainSigner.seal`).

        Returns:
            The sealed :class:`~trusthop.event.WireEvent` that was published.

        Raises:
            TrustError: the producer-side checks (``scope_escalation``,
                ``expired``, ``unauthorized_actor``); nothing is published.
            ValueError: neither or both of ``origin``/``parent``, or an
                exchange name containing ``/``; nothing is published.
            PublishRefused: the broker returned the message (``mandatory`` and
                no binding for the routing key) or nacked it.
            aio_pika.exceptions.ChannelClosed: e.g. the exchange does not
                exist (RabbitMQ closes the channel with ``NOT_FOUND``).

        Bound the wait for the confirm with ``asyncio.timeout()`` if needed.
        """
        name = exchange if isinstance(exchange, str) else exchange.name
        wire = self.signer.seal(
            event,
            destination=amqp_destination(name, routing_key),
            origin=origin,
            parent=parent,
            scope=scope,
            consumed_event_id=consumed_event_id,
        )
        headers, body, content_type = encode_amqp(wire, structured=self.structured)
        amqp_headers: HeadersType = dict(headers)
        message = aio_pika.Message(
            body,
            headers=amqp_headers,
            content_type=content_type,
            delivery_mode=DeliveryMode.PERSISTENT if persistent else DeliveryMode.NOT_PERSISTENT,
            # Unique per publish: aiormq matches a broker return to its publish
            # by message_id, so it must not repeat while publishes are in flight.
            message_id=uuid.uuid4().hex,
        )
        target = await self._resolve(exchange)
        await _publish_confirmed(target, message, routing_key=routing_key, mandatory=mandatory)
        return wire
