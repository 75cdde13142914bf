"""CloudEvents Kafka protocol binding (binary and structured content modes).

Binary mode: each attribute is a ``ce_<name>`` header with a UTF-8 value,
``datacontenttype`` is the ``content-type`` header, the value is the data.
Structured mode: ``content-type: application/cloudevents+json`` and the JSON
document as the value. Headers are aiokafka's ``(str, bytes | None)`` pairs;
keys may repeat and values may be ``None`` or not UTF-8, so decoding checks
everything and turns every problem into ``TrustError(malformed)``. Headers
that are not CloudEvents headers are ignored (never signed, never passed on).
"""

from __future__ import annotations

from collections.abc import Sequence

from trusthop.bindings.structured import (
    CONTENT_TYPE,
    decode_structured,
    encode_structured,
    is_structured,
)
from trusthop.digest import CHAIN_ATTRIBUTE
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent, wire_value

PREFIX = "ce_"
CONTENT_TYPE_HEADER = "content-type"

KafkaHeaders = list[tuple[str, bytes]]


def encode_kafka(
    event: WireEvent, *, structured: bool = False
) -> tuple[KafkaHeaders, bytes | None]:
    """Headers and value for ``event`` (the chain travels as ``ce_trustchain``)."""
    if structured:
        return [(CONTENT_TYPE_HEADER, CONTENT_TYPE.encode())], encode_structured(event)
    headers: KafkaHeaders = []
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            headers.append((CONTENT_TYPE_HEADER, str(value).encode("utf-8")))
        else:
            headers.append((PREFIX + name, wire_value(value).encode("utf-8")))
    if event.chain is not None:
        headers.append((PREFIX + CHAIN_ATTRIBUTE, event.chain.encode("ascii")))
    return headers, event.data


def _text(name: str, value: bytes | None) -> str:
    try:
        if type(value) is bytes:  # what aiokafka hands out: no copy
            return value.decode("utf-8")
        if value is None:
            raise TrustError(Reason.MALFORMED, f"header {name[:40]!r} has no value")
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError) as exc:
        raise TrustError(Reason.MALFORMED, f"header {name[:40]!r} is not UTF-8") from exc


def decode_kafka(
    headers: Sequence[tuple[str, bytes | None]] | None, value: bytes | None
) -> WireEvent:
    """Decode a consumed record into a :class:`WireEvent`.

    Raises:
        TrustError(malformed): a repeated CloudEvents header, a ``ce_`` header
            in another letter case, ``None`` or non-UTF-8 values, ``ce_``
            headers on a structured-mode record, or a record that is no
            CloudEvent at all.
    """
    content_type: str | None = None
    attributes: dict[str, str] = {}
    for raw_key, raw_value in headers or ():
        key = raw_key if isinstance(raw_key, str) else str(raw_key)
        # The exact spellings first (every header of a well-formed record);
        # any other name is lowered once, to refuse the mis-cased ones.
        if key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            if name in attributes or name == "datacontenttype":
                raise TrustError(Reason.MALFORMED, f"attribute {name[:40]!r} appears twice")
            attributes[name] = _text(key, raw_value)
            continue
        if key == CONTENT_TYPE_HEADER:
            if content_type is not None:
                raise TrustError(Reason.MALFORMED, "repeated or mis-cased content-type header")
            content_type = _text(key, raw_value)
            continue
        lowered = key.lower()
        if lowered == CONTENT_TYPE_HEADER:
            raise TrustError(Reason.MALFORMED, "repeated or mis-cased content-type header")
        if lowered.startswith(PREFIX):
            raise TrustError(Reason.MALFORMED, f"header {key[:40]!r} is not lowercase 'ce_'")
    if is_structured(content_type):
        if attributes:
            raise TrustError(Reason.MALFORMED, "structured-mode record also carries ce_ headers")
        if value is None:
            raise TrustError(Reason.MALFORMED, "structured-mode record has no value")
        return decode_structured(bytes(value))
    chain = attributes.pop(CHAIN_ATTRIBUTE, None)
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    event = WireEvent(attributes, bytes(value) if value is not None else None, chain)
    event.require_cloudevent()
    return event
