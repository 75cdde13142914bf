"""CloudEvents binding for AMQP 0-9-1 (RabbitMQ) message headers.

Binary mode: attributes are headers named ``cloudEvents_<name>`` (``cloudEvents:``
is accepted on input), ``datacontenttype`` is the ``content_type`` property,
the body is the data. Structured mode: ``content_type`` is
``application/cloudevents+json``. Header values are sent as strings (the
encoder refuses ``bytes``). ``x-*`` headers belong to the broker and are
ignored, as is every header that is not a CloudEvents header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trusthop.bindings.structured import (
    CONTENT_TYPE,
    decode_structured,
    encode_structured,
    is_structured,
)
from trusthop.digest import CHAIN_ATTRIBUTE
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent, wire_value

PREFIX = "cloudEvents_"
_PREFIXES = ("cloudevents_", "cloudevents:")


def encode_amqp(
    event: WireEvent, *, structured: bool = False
) -> tuple[dict[str, str], bytes, str | None]:
    """Headers, body and ``content_type`` property for ``event``."""
    if structured:
        return {}, encode_structured(event), CONTENT_TYPE
    headers = {
        PREFIX + name: wire_value(value)
        for name, value in event.attributes.items()
        if name != "datacontenttype"
    }
    if event.chain is not None:
        headers[PREFIX + CHAIN_ATTRIBUTE] = event.chain
    return headers, event.data or b"", event.content_type


def _text(name: str, value: Any) -> str | bool | int:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TrustError(Reason.MALFORMED, f"header {name[:40]!r} is not UTF-8") from exc
    if isinstance(value, str | bool | int):
        return value
    raise TrustError(Reason.MALFORMED, f"header {name[:40]!r} has an unsupported type")


def decode_amqp(
    headers: Mapping[str, Any] | None, body: bytes, content_type: str | None
) -> WireEvent:
    """Decode a delivered message into a :class:`WireEvent`.

    An empty body in binary mode is read as "no data" (AMQP cannot tell the two
    apart), on both the producing and the consuming side.

    Raises:
        TrustError(malformed): the same attribute under both prefixes, a
            prefix in another letter case, values of unsupported types,
            CloudEvents headers on a structured message, or no CloudEvent.
    """
    attributes: dict[str, Any] = {}
    for key, value in (headers or {}).items():
        if not isinstance(key, str):
            raise TrustError(Reason.MALFORMED, "header name is not a string")
        lowered = key.lower()
        if not lowered.startswith(_PREFIXES):
            continue
        if not key.startswith(("cloudEvents_", "cloudEvents:")):
            raise TrustError(Reason.MALFORMED, f"header {key[:40]!r} is not 'cloudEvents_'")
        name = key[len(PREFIX) :]
        if name in attributes or name == "datacontenttype":
            raise TrustError(Reason.MALFORMED, f"attribute {name[:40]!r} appears twice")
        attributes[name] = _text(key, value)
    if is_structured(content_type):
        if attributes:
            raise TrustError(
                Reason.MALFORMED, "structured message also carries CloudEvents headers"
            )
        return decode_structured(body)
    chain = attributes.pop(CHAIN_ATTRIBUTE, None)
    if chain is not None and not isinstance(chain, str):
        raise TrustError(Reason.MALFORMED, "'trustchain' must be a string")
    if content_type:
        attributes["datacontenttype"] = content_type
    event = WireEvent(attributes, bytes(body) if body else None, chain)
    event.require_cloudevent()
    return event
