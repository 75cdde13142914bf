"""The event digest: what a hop ring binds to, independent of the transport.

The digest is computed over the *decoded* CloudEvents attributes and the data
bytes, never over transport bytes, so the same event yields the same digest in
Kafka binary mode, Kafka structured mode and AMQP headers.

Canonical forms (the exact rules are in ``docs/wire-format.md``):

* every attribute except ``trustchain`` (the chain itself) and the
  distributed-tracing attributes ``traceparent`` / ``tracestate`` (which
  intermediaries rewrite by design) is covered;
* values become strings: ``true``/``false`` for booleans, decimal for
  integers, standard base64 for binary, and ``time`` normalised to UTC
  ``YYYY-MM-DDTHH:MM:SS[.fraction]Z`` with trailing fraction zeros removed;
* data is its bytes; JSON data (a JSON ``datacontenttype``, or none in
  structured mode) that arrives as a parsed value is serialised as canonical
  JSON (sorted keys, no whitespace, UTF-8).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack

from trusthop.errors import Reason, TrustError

CHAIN_ATTRIBUTE = "trustchain"
UNSIGNED_ATTRIBUTES = frozenset({CHAIN_ATTRIBUTE, "traceparent", "tracestate"})
_DOMAIN = "trusthop/v1/event"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # not encodable as UTF-8: never valid text
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAME = re.compile(r"[a-z0-9]{1,20}\Z")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})\Z",
    re.ASCII,  # \d is 0-9 only: other Unicode digits would alias the ASCII timestamp
)


_COMMON_NAMES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "dataschema",
        CHAIN_ATTRIBUTE,
        "traceparent",
        "tracestate",
    }
)


def is_valid_attribute_name(name: str) -> bool:
    """CloudEvents attribute names: lowercase ``a-z0-9``, 1 to 20 characters."""
    return name in _COMMON_NAMES or (type(name) is str and _NAME.match(name) is not None)


def is_json_content_type(content_type: str | None) -> bool:
    """True for ``application/json``, ``text/json`` and any ``*/*+json`` type."""
    if content_type is None:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity.

    Raises:
        TrustError(malformed): the value is not representable as JSON.
    """
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise TrustError(Reason.MALFORMED, f"data is not JSON-serialisable: {exc}") from exc


def data_bytes(data: Any, content_type: str | None, *, json_default: bool = False) -> bytes | None:
    """The bytes the digest covers for ``data``.

    ``json_default`` says that a missing content type means JSON (structured
    mode). Bytes are taken as they are; JSON content is canonical JSON of the
    value (a ``str`` included, which becomes a JSON string); other text is UTF-8.
    """
    if data is None:
        return None
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if is_json_content_type(content_type) or (content_type is None and json_default):
        return canonical_json(data)
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TrustError(Reason.MALFORMED, "text data is not valid Unicode") from exc
    return canonical_json(data)


# Already in canonical form: UTC, "Z", no trailing zero in a fraction.
# Already canonical and plainly valid: UTC, "Z", no trailing zero in a
# fraction, a year from 0001, month 01-12, day 01-28 (any later day is
# checked against its month), hour 00-23, minute and second 00-59.
_CANONICAL_TIME = re.compile(
    r"(?!0000)\d{4}-(?:0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d"
    r"(?:\.\d{0,8}[1-9])?Z\Z",
    re.ASCII,
)


def canonical_time(value: str | datetime) -> str:
    """Normalise an RFC 3339 timestamp to UTC with a ``Z`` suffix.

    Fractions keep their digits (up to nanoseconds) minus trailing zeros.

    Raises:
        TrustError(malformed): not an RFC 3339 date-time with an offset.
    """
    if type(value) is str:
        match = _CANONICAL_TIME.match(value)
        if match is not None:
            if match.group(1) <= "28":
                return value
            try:
                datetime(int(value[:4]), int(value[5:7]), int(value[8:10]))
            except ValueError as exc:
                raise TrustError(Reason.MALFORMED, f"'time' is not a valid date: {exc}") from exc
            return value
    if isinstance(value, datetime):
        # Aware means utcoffset() is not None: a tzinfo answering None would
        # be read as the host's local time by astimezone().
        if value.tzinfo is None or value.utcoffset() is None:
            raise TrustError(Reason.MALFORMED, "'time' has no UTC offset")
        try:
            moment = value.astimezone(UTC)
        except OverflowError as exc:  # as the text form of the same instant
            raise TrustError(Reason.MALFORMED, "'time' is out of range") from exc
        fraction = f"{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
        if moment.year >= 1000:  # the common case, formatted directly
            text = (
                f"{moment.year}-{moment.month:02d}-{moment.day:02d}T"
                f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
            )
            return f"{text}.{fraction}Z" if fraction else f"{text}Z"
        moment = moment.replace(microsecond=0)
    else:
        if not isinstance(value, str):
            raise TrustError(Reason.MALFORMED, "'time' must be a timestamp")
        match = _RFC3339.match(value)
        if not match:
            raise TrustError(Reason.MALFORMED, "'time' is not an RFC 3339 timestamp")
        year, month, day, hour, minute, second, frac, offset = match.groups()
        try:
            moment = datetime(
                int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
            )
        except ValueError as exc:
            raise TrustError(Reason.MALFORMED, f"'time' is not a valid date: {exc}") from exc
        if offset not in ("Z", "z"):
            sign = 1 if offset[0] == "+" else -1
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise TrustError(Reason.MALFORMED, "'time' has an impossible UTC offset")
            try:
                moment -= sign * timedelta(hours=hours, minutes=minutes)
            except OverflowError as exc:
                raise TrustError(Reason.MALFORMED, "'time' is out of range") from exc
        fraction = (frac or "").rstrip("0")
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if len(text) != 19:  # years before 1000 are not zero-padded on every platform
        text = f"{moment.year:04d}" + text[text.index("-") :]
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def canonical_value(name: str, value: Any) -> str:
    """The string form of one attribute value that the digest covers.

    Raises:
        TrustError(malformed): a type no CloudEvents attribute can have.
    """
    if name == "time":
        if isinstance(value, str | datetime):
            return canonical_time(value)
        raise TrustError(Reason.MALFORMED, "'time' must be a timestamp")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if _CONTROL_OR_SURROGATE.search(value):
            raise TrustError(
                Reason.MALFORMED, f"attribute {name!r} holds control characters or surrogates"
            )
        return value
    if isinstance(value, int):
        if not -(2**31) <= value < 2**31:
            raise TrustError(Reason.MALFORMED, f"integer attribute {name!r} is out of range")
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return canonical_time(value)
    raise TrustError(Reason.MALFORMED, f"attribute {name!r} has an unsupported type")


_UNSIGNED_MAX = {"traceparent": 128, "tracestate": 8192}


def _check_unsigned(name: str, value: Any) -> None:
    """Unsigned attributes still reach handlers: same text rules, bounded size."""
    if name == CHAIN_ATTRIBUTE:
        return
    text = canonical_value(name, value)
    if len(text) > _UNSIGNED_MAX[name]:
        raise TrustError(
            Reason.MALFORMED, f"{name!r} is longer than {_UNSIGNED_MAX[name]} characters"
        )


def signed_attributes(attributes: Mapping[str, Any]) -> dict[str, str]:
    """The attributes the digest covers, in canonical string form.

    Raises:
        TrustError(malformed): an invalid attribute name or value.
    """
    out: dict[str, str] = {}
    for name, value in attributes.items():
        if name not in _COMMON_NAMES and not is_valid_attribute_name(name):
            raise TrustError(Reason.MALFORMED, f"invalid attribute name {name[:40]!r}")
        if value is None:
            continue
        if name in UNSIGNED_ATTRIBUTES:
            _check_unsigned(name, value)
            continue
        if type(value) is str and name != "time":
            out[name] = value
        else:
            out[name] = canonical_value(name, value)
    # Strings from headers are the common case: one scan over all of them
    # instead of one per attribute; the slow path names the offender.
    if _CONTROL_OR_SURROGATE.search("".join(out.values())):
        for name, value in out.items():
            canonical_value(name, value)
    return out


def event_digest(attributes: Mapping[str, Any], data: bytes | None) -> bytes:
    """SHA-256 over the canonical attributes and the data bytes (32 bytes).

    ``data`` must already be the digest bytes (see :func:`data_bytes`).
    """
    signed = signed_attributes(attributes)
    # pack() of [domain, map sorted by name, data], without its generic sort.
    payload = msgpack.packb([_DOMAIN, dict(sorted(signed.items())), data])
    return hashlib.sha256(payload).digest()
