"""The CloudEvents JSON event format (structured mode).

Encoding chooses the ``data`` member only when decoding it gives back the
same digest bytes (canonical JSON for JSON content, text for ``text/*``);
anything else travels as ``data_base64``, so a round trip never changes the
event digest.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from trusthop.digest import CHAIN_ATTRIBUTE, canonical_json, data_bytes, is_json_content_type
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent, wire_value

CONTENT_TYPE = "application/cloudevents+json"
MAX_STRUCTURED_BYTES = 1024 * 1024


def is_structured(content_type: str | None) -> bool:
    """True for ``application/cloudevents+json`` (parameters ignored)."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == CONTENT_TYPE


def encode_structured(event: WireEvent) -> bytes:
    """The JSON document for ``event``, chain included."""
    document: dict[str, Any] = dict(event.attributes)
    for name, value in document.items():
        if not isinstance(value, str | bool | int):
            document[name] = wire_value(value)
    if event.chain is not None:
        document[CHAIN_ATTRIBUTE] = event.chain
    if event.data is not None:
        document.update(_data_member(event.data, event.content_type))
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _data_member(data: bytes, content_type: str | None) -> dict[str, Any]:
    if is_json_content_type(content_type):
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            value = None
        else:
            if canonical_json(value) == data:
                return {"data": value}
    elif content_type is not None and content_type.lower().startswith("text/"):
        try:
            return {"data": data.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"data_base64": base64.b64encode(data).decode("ascii")}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal member names wins: refuse both.
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate member name")
    return document


def decode_structured(body: bytes) -> WireEvent:
    """Parse a structured-mode body.

    Raises:
        TrustError(malformed): not a JSON object, a member name that appears
            twice (at any depth), both ``data`` and ``data_base64``, attribute
            values of a type CloudEvents does not have, or a missing required
            attribute.
    """
    if len(body) > MAX_STRUCTURED_BYTES:
        raise TrustError(Reason.MALFORMED, "structured event is over 1 MiB")
    try:
        document = json.loads(
            body, parse_constant=_reject_constant, object_pairs_hook=_unique_members
        )
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise TrustError(Reason.MALFORMED, "structured event is not JSON") from exc
    if not isinstance(document, dict):
        raise TrustError(Reason.MALFORMED, "structured event is not a JSON object")
    has_data = "data" in document
    encoded = document.pop("data_base64", None)
    if has_data and encoded is not None:
        raise TrustError(Reason.MALFORMED, "both 'data' and 'data_base64' are present")
    value = document.pop("data", None)
    chain = document.pop(CHAIN_ATTRIBUTE, None)
    if chain is not None and not isinstance(chain, str):
        raise TrustError(Reason.MALFORMED, "'trustchain' must be a string")
    for name, attr in document.items():
        if isinstance(attr, float) or not isinstance(attr, str | bool | int):
            raise TrustError(Reason.MALFORMED, f"attribute {name[:40]!r} has an unsupported type")
    content_type = document.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise TrustError(Reason.MALFORMED, "'datacontenttype' must be a string")
    payload: bytes | None
    if encoded is not None:
        if not isinstance(encoded, str):
            raise TrustError(Reason.MALFORMED, "'data_base64' must be a string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TrustError(Reason.MALFORMED, "'data_base64' is not base64") from exc
    elif has_data:
        payload = (
            data_bytes(value, content_type, json_default=True) if value is not None else b"null"
        )
    else:
        payload = None
    event = WireEvent(document, payload, chain)
    event.require_cloudevent()
    return event
