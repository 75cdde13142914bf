"""A guard on how the AMQP client stack decodes message properties.

aio-pika reads frames through aiormq, which decodes them with pamqp. Two
properties of pamqp 4 matter to a consumer that must survive any message a
publisher can write:

* a content header whose properties pamqp cannot decode (a header name or
  a short-string property such as ``content_type`` that is not UTF-8, a
  field-table value of an unknown type, a ``timestamp`` out of range) makes
  aiormq's frame reader raise and **close the whole connection**. RabbitMQ
  accepts such messages as they are and requeues the unacked one, so a
  single message published by anyone allowed to publish stalls the queue
  for good: every reconnect receives it first and dies again;
* a header table that names one header twice is collapsed, the last value
  silently winning, so the consumer never learns that the message carried
  two ``cloudEvents_trustchain`` (or two ``cloudEvents_type``) headers.

:func:`install_frame_guard` (called by
:class:`~trusthop.amqp.worker.TrustedWorker`) replaces pamqp's
``ContentHeader.unmarshal`` with :func:`guarded_unmarshal`, which decodes the
same bytes the same way, with two differences:

* properties that do not decode no longer raise: the message is delivered
  with default properties and one header, :data:`H_UNDECODABLE`, whose value
  is an :class:`UndecodableProperties` saying why. No byte string on the wire
  decodes to that type, so a publisher cannot forge the marker (and a
  ``trusthop-*`` header of its own is dropped from dead letters as usual);
* a header name that appears twice in the top-level header table adds the
  same marker, next to the headers pamqp would have produced.

:func:`~trusthop.amqp.messages.check_delivery` refuses a message carrying
the marker as ``malformed``, so the worker dead-letters it (with its body)
and goes on. The patch is process-wide: any other aio-pika consumer in the
same process also receives such messages instead of losing its connection.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pamqp import commands, decode, header

H_UNDECODABLE = "trusthop-undecodable"
"""Header carrying an :class:`UndecodableProperties` marker (see the module docstring)."""

_MARK = "_trusthop_frame_guard"


class UndecodableProperties:
    """Stands in for properties pamqp could not decode, or for a header
    table that names a header twice. ``problem`` says what was wrong."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def __repr__(self) -> str:
        # Deterministic: the worker fingerprints messages by their repr.
        return f"UndecodableProperties({self.problem!r})"


def undecodable(headers: Mapping[str, Any] | None) -> UndecodableProperties | None:
    """The marker of a message whose properties did not decode, if any. Never raises."""
    if not isinstance(headers, Mapping):
        return None
    value = headers.get(H_UNDECODABLE)
    return value if isinstance(value, UndecodableProperties) else None


def _describe(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:
        text = ""
    # Escaped like a Python literal: the text ends up in logs and dead letters.
    text = repr(text)[1:-1].encode("ascii", "backslashreplace").decode("ascii")[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def strict_field_table(data: bytes) -> tuple[int, dict[str, Any], str | None]:
    """pamqp's ``decode.field_table``, also reporting a repeated name.

    Returns the bytes consumed, the table (the last value of a repeated
    name, as pamqp gives it) and a description of the first repeated name
    (``None`` when every name is unique).

    Raises:
        ValueError, struct.error, ...: as pamqp's decoder (truncated data, a
            name that is not UTF-8, a value of an unknown type).
    """
    (length,) = struct.unpack(">I", data[0:4])
    offset, end = 4, 4 + length
    if end > len(data):
        raise ValueError("field table length exceeds available data")
    table: dict[str, Any] = {}
    repeated: str | None = None
    while offset < end:
        size = data[offset]
        offset += 1
        if offset + size > end:
            raise ValueError("field table name length exceeds data")
        name = data[offset : offset + size].decode("utf-8")
        offset += size
        consumed, value = decode.embedded_value(data[offset:end])
        offset += consumed
        if name in table and repeated is None:
            repeated = f"header {name[:40]!r} appears twice"
        table[name] = value
    return end, table, repeated


def _unmarshal_properties(flags: int, data: bytes) -> tuple[Any, str | None]:
    """Basic.Properties from ``data``, as pamqp's ``BasicProperties.unmarshal``."""
    properties = commands.Basic.Properties()
    repeated: str | None = None
    value: Any
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        data_type = getattr(type(properties), "_" + name)
        if data_type == "table":
            consumed, value, repeated = strict_field_table(data)
        else:
            consumed, value = decode.by_type(data, data_type)
        setattr(properties, name, value)
        data = data[consumed:]
    return properties, repeated


def guarded_unmarshal(self: Any, data: bytes) -> None:
    """``pamqp.header.ContentHeader.unmarshal`` that never fails on properties.

    The fixed part (class, weight, body size, flags) is decoded as pamqp
    does, and fails as it does: without it the body frames cannot be read.
    """
    self.class_id, self.weight, self.body_size = struct.unpack(">HHQ", data[0:12])
    offset, flags = self._get_flags(data[12:])
    try:
        properties, repeated = _unmarshal_properties(flags, data[12 + offset :])
    except Exception as exc:  # anything a hostile header frame makes pamqp raise
        problem = f"the message properties cannot be decoded ({_describe(exc)})"
        marker: dict[str, Any] = {H_UNDECODABLE: UndecodableProperties(problem)}
        properties = commands.Basic.Properties(headers=marker)
    else:
        if repeated is not None:
            headers = dict(properties.headers or {})
            headers[H_UNDECODABLE] = UndecodableProperties(repeated)
            properties.headers = headers
    self.properties = properties


setattr(guarded_unmarshal, _MARK, True)


def install_frame_guard() -> bool:
    """Make pamqp use :func:`guarded_unmarshal` for every content header.

    Idempotent; returns whether this call installed it.
    """
    if getattr(header.ContentHeader.unmarshal, _MARK, False):
        return False
    header.ContentHeader.unmarshal = guarded_unmarshal  # type: ignore[method-assign]
    return True
