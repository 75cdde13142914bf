"""Decoded events: the transport-neutral form the bindings produce and consume.

A :class:`WireEvent` holds the CloudEvents attributes as they were decoded
(strings from headers, JSON values from structured mode), the data bytes the
digest covers, and the ``trustchain`` value. Converting to and from the SDK's
:class:`cloudevents.core.v1.event.CloudEvent` happens here, once per message.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

from trusthop.digest import (
    CHAIN_ATTRIBUTE,
    canonical_time,
    data_bytes,
    event_digest,
    is_json_content_type,
)
from trusthop.errors import Reason, TrustError

REQUIRED = ("specversion", "id", "source", "type")


@dataclass(slots=True)
class WireEvent:
    """One decoded CloudEvent.

    ``attributes`` excludes ``trustchain``, which is in ``chain``. ``data`` is
    exactly the bytes the digest covers (``None`` when the event has no data).
    """

    attributes: dict[str, Any]
    data: bytes | None
    chain: str | None = None

    def __post_init__(self) -> None:
        # AMQP cannot tell an empty body from no body: empty data is no data.
        if self.data == b"":
            self.data = None

    @property
    def id(self) -> str | None:
        value = self.attributes.get("id")
        return value if isinstance(value, str) else None

    @property
    def content_type(self) -> str | None:
        value = self.attributes.get("datacontenttype")
        return value if isinstance(value, str) else None

    def digest(self) -> bytes:
        """The event digest a hop ring signs (see :mod:`trusthop.digest`)."""
        return event_digest(self.attributes, self.data)

    def require_cloudevent(self) -> None:
        """Raise ``malformed`` unless the required attributes are present and 1.0."""
        for name in REQUIRED:
            value = self.attributes.get(name)
            if not isinstance(value, str) or not value:
                raise TrustError(Reason.MALFORMED, f"required attribute {name!r} is missing")
        if self.attributes["specversion"] != "1.0":
            raise TrustError(Reason.MALFORMED, "only CloudEvents specversion 1.0 is supported")

    def to_cloudevent(self) -> CloudEvent:
        """The SDK event a handler receives.

        JSON data is parsed; other data stays bytes. ``time`` becomes a
        timezone-aware datetime; other extension values keep their decoded type.

        Raises:
            TrustError(malformed): the SDK rejects the attributes, or JSON data
                does not parse.
        """
        attributes = dict(self.attributes)
        if "time" in attributes:
            attributes["time"] = datetime.fromisoformat(canonical_time(attributes["time"]))
        data: Any = self.data
        if data is not None and is_json_content_type(self.content_type):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise TrustError(Reason.MALFORMED, "JSON data does not parse") from exc
        try:
            event = CloudEvent(attributes, data)
        except BaseCloudEventException as exc:
            raise TrustError(Reason.MALFORMED, f"not a valid CloudEvent: {exc}") from exc
        if "time" not in self.attributes:
            # The SDK fills in "now"; a handler must only see what was signed.
            event.get_attributes().pop("time", None)
        return event

    @classmethod
    def from_cloudevent(cls, event: CloudEvent, chain: str | None = None) -> WireEvent:
        """The wire form of an SDK event (any ``trustchain`` on it is dropped;
        ``time`` becomes its canonical text, as it travels).

        Raises:
            TrustError(malformed): ``time`` without a UTC offset, or data
                that JSON cannot represent.
        """
        attributes = {k: v for k, v in event.get_attributes().items() if k != CHAIN_ATTRIBUTE}
        moment = attributes.get("time")
        if moment is not None:
            attributes["time"] = canonical_time(moment)
        data = event.get_data()
        if data is not None and not isinstance(data, bytes | str):
            attributes.setdefault("datacontenttype", "application/json")
        content_type = attributes.get("datacontenttype")
        payload = data_bytes(data, content_type if isinstance(content_type, str) else None)
        return cls(attributes, payload, chain)


def wire_value(value: Any) -> str:
    """An attribute value as the string that travels in a header."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return canonical_time(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)
