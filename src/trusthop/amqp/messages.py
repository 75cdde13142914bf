"""AMQP messages without I/O: verification of a delivery, dead-letter and retry headers, names.

Pure helpers of :class:`~trusthop.amqp.worker.TrustedWorker`: decode and
verify one delivered message against ``amqp:<exchange>/<routing key>`` (after
the routing checks below), build the headers of its dead letter within a byte
budget, name the dead-letter and retry queues of a queue, and read and write
the worker's own retry attempt header (:func:`retry_attempt`,
:func:`retry_headers`).

Retry path: a handler retry is a copy of the message published to
``<queue>.retry`` (:func:`retry_queue_name`), a queue whose message TTL sends
it back, through the default exchange, to ``<queue>``
(:func:`retry_queue_arguments`). The copy carries ``trusthop-retry: n`` (the
handler attempt it is for). The worker believes that header only on a
delivery through the default exchange with the queue's own name as routing
key, the way the retry queue delivers; everywhere else it is ignored. Even
there it is only a claim: the replay store decides (a retry must match the
attempt the consumer itself scheduled, see :mod:`trusthop.replay`), so a
forged header can make a delivery be judged as a replay, never let it in.

Routing checks, run before the chain is decoded:

* a message carrying a ``CC`` or ``BCC`` header is refused with
  ``wrong_destination``: RabbitMQ copies such a message into queues bound to
  the routing keys listed there but reports the publish routing key on
  delivery, so the destination the chain names proves nothing about why the
  message is in this queue;
* when the queue's bindings are known, the delivery's exchange and routing
  key must match one of them (:func:`delivery_matches_bindings`), otherwise
  ``wrong_destination``. RabbitMQ strips ``BCC`` before delivery, so only this
  check catches a ``BCC`` copy.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from aio_pika.abc import HeadersType
from pamqp import encode
from pamqp.common import FieldTable, FieldValue

from trusthop.amqp.frames import undecodable
from trusthop.bindings.amqp import decode_amqp
from trusthop.chain import decode_chain
from trusthop.destination import amqp_destination
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import H_ATTEMPTS, ChainVerifier, Rejection, TrustedEvent
from trusthop.verify import Limits

DEFAULT_DEAD_LETTER_EXCHANGE = "trusthop.dlx"
DLQ_SUFFIX = ".dlq"
RETRY_SUFFIX = ".retry"

H_RETRY = "trusthop-retry"
"""Header of a retry copy: the handler attempt (2, 3, ...) it is published for."""
MAX_RETRY_ATTEMPT = 1000
"""Largest ``trusthop-retry`` value read; anything larger reads as 0 (no retry)."""

# Dead-letter headers added when the original headers are left out.
H_HEADERS_DROPPED = "trusthop-headers-dropped"
H_HEADERS_BYTES = "trusthop-headers-bytes"

DEFAULT_FRAME_MAX = 131072
"""RabbitMQ's default ``frame_max``, used when the negotiated one is unknown."""
HEADER_FRAME_RESERVE = 4096
"""Bytes of a content-header frame kept for everything but the header table.

The frame header and end octet (8), class, weight, body size and property
flags (14), and at most eight short-string properties (8 x 256) fit in it.
"""

# Headers never copied from a rejected message into its dead letter:
# ``trusthop-*`` (only the worker writes those) and the sender-selected
# distribution headers RabbitMQ acts on at publish time (``CC`` would route
# copies of an attacker's message to other queues bound to the DLX).
_OWN_PREFIX = "trusthop-"
_ROUTING_HEADERS = frozenset({"cc", "bcc"})
# Headers RabbitMQ writes when it dead-letters a message (a retry copy
# leaving its retry queue gets them); never copied into a new retry copy.
_BROKER_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

_MAX_TTL_MS = 2**31 - 1

Binding = tuple[str, str]
"""``(exchange name, binding key)`` of a queue binding."""


def dead_letter_queue_name(queue: str) -> str:
    """The dead-letter queue of ``queue`` (``<queue>.dlq``)."""
    return queue + DLQ_SUFFIX


def retry_queue_name(queue: str) -> str:
    """The retry queue of ``queue`` (``<queue>.retry``)."""
    return queue + RETRY_SUFFIX


def retry_delay_ms(delay: float) -> int:
    """``delay`` seconds as a RabbitMQ ``x-message-ttl`` (whole milliseconds, at least 1).

    Raises:
        ValueError: ``delay`` is not a positive finite number of seconds, or
            longer than RabbitMQ accepts (2**31 - 1 ms, about 24 days).
    """
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay > 0:
        raise ValueError("retry_delay must be a positive number of seconds")
    if not math.isfinite(delay) or delay * 1000 > _MAX_TTL_MS:
        raise ValueError(f"retry_delay must be at most {_MAX_TTL_MS // 1000} seconds")
    return max(1, round(delay * 1000))


def retry_queue_arguments(queue: str, delay: float) -> FieldTable:
    """Arguments of ``<queue>.retry``: hold each message ``delay`` seconds
    (``x-message-ttl``), then dead-letter it through the default exchange
    (``x-dead-letter-exchange: ""``) with ``queue`` as routing key, which
    puts it back at the tail of ``queue``.

    A queue TTL (not a per-message ``expiration``) is used, so every message
    of the retry queue expires in order at its head. Declaring an existing
    retry queue with another ``delay`` fails (``PRECONDITION_FAILED``).

    Raises:
        ValueError: as :func:`retry_delay_ms`.
    """
    return {
        "x-message-ttl": retry_delay_ms(delay),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
    }


def parse_retry(value: object) -> int:
    """The attempt number a ``trusthop-retry`` header value states, or 0.

    Strict: an ``int`` (not a ``bool``) or a string of ASCII digits without
    sign, spaces or leading zero, between 1 and :data:`MAX_RETRY_ATTEMPT`.
    Anything else (``"+2"``, ``" 2"``, ``"2.0"``, ``"٢"``, bytes, a huge
    number) is 0. The header is writable by anyone who can publish to the
    queue, so a lenient parser would only widen what a forger can say;
    reading junk as 0 ("not a retry") judges the delivery as a first delivery
    or a replay, the strictest reading. Never raises.
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        number = value
    elif (
        isinstance(value, str)
        and 0 < len(value) <= 4
        and value.isascii()
        and value.isdigit()
        and value[0] != "0"
    ):
        number = int(value)
    else:
        return 0
    return number if 1 <= number <= MAX_RETRY_ATTEMPT else 0


def retry_attempt(
    headers: Mapping[str, Any] | None,
    *,
    exchange: str | None,
    routing_key: str | None,
    queue: str,
) -> int:
    """The retry attempt a delivery to ``queue`` claims, or 0.

    Only a delivery through the default exchange (``""``) with ``queue`` as
    routing key, the way ``<queue>.retry`` dead-letters it back, can be a
    retry; there the ``trusthop-retry`` header (exact name) is read with
    :func:`parse_retry`. Any other delivery is 0, whatever it carries.
    Never raises.
    """
    if (exchange or "") != "" or (routing_key or "") != queue or not headers:
        return 0
    return parse_retry(headers.get(H_RETRY))


def retry_headers(headers: Mapping[str, Any] | None, *, attempts: int, retry: int) -> HeadersType:
    """Headers of a retry copy: the original ones without ``trusthop-*``,
    ``CC``/``BCC`` and the broker's ``x-death``/``x-first-death-*``/
    ``x-last-death-*``, plus ``trusthop-attempts`` (handler attempts made)
    and ``trusthop-retry`` (the attempt the copy is for). Values are made
    encodable again as in :func:`dead_letter_headers`. Never raises.
    """
    out = {
        key: value
        for key, value in _copied(headers).items()
        if key.lower() not in _BROKER_DEATH_HEADERS
    }
    out[H_ATTEMPTS] = str(attempts)
    out[H_RETRY] = str(retry)
    return out


def signed_destination(
    headers: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None,
    *,
    limits: Limits,
) -> str | None:
    """The destination the newest ring of a delivered message was signed
    for, when the message decodes within ``limits``; otherwise ``None``.

    For the ``trusthop-destination`` header of a dead letter (the original
    destination). Not verified: a rejected message's chain may be forged.
    Never raises.
    """
    try:
        wire = decode_amqp(headers, body, content_type)
        if not isinstance(wire.chain, str):
            return None
        chain = decode_chain(wire.chain, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
    except Exception:  # any decode failure: no destination to report
        return None
    destination = getattr(chain.newest, "destination", None)
    return destination if isinstance(destination, str) else None


# --------------------------------------------------------------------------- #
# routing checks
# --------------------------------------------------------------------------- #


def _words(key: str) -> list[str]:
    # As RabbitMQ splits a topic key: "" is no word at all, "a." is "a" and "".
    return key.split(".") if key else []


def routing_key_matches(binding_key: str, routing_key: str) -> bool:
    """Whether a binding with ``binding_key`` takes a message with ``routing_key``.

    Exact equality, or AMQP topic semantics when ``binding_key`` holds a
    wildcard word: words are separated by ``.``, a word ``*`` matches exactly
    one word, a word ``#`` matches zero or more words. As in RabbitMQ, the
    empty key has no words (so ``#`` matches it and ``*`` does not) and a
    wildcard character inside a longer word (``a*``) is literal.

    For a direct exchange a binding key containing a ``*`` or ``#`` word is
    literal to RabbitMQ, so this is more permissive there (the chain's
    destination check still applies). Fanout and headers exchanges ignore the
    routing key: state their bindings with the key ``#``.

    Pure, linear in the product of the word counts; never raises.
    """
    if binding_key == routing_key:
        return True
    pattern, words = _words(binding_key), _words(routing_key)
    if "*" not in pattern and "#" not in pattern:
        return False
    # reach[j]: the pattern words seen so far can match the first j words.
    reach = [True] + [False] * len(words)
    for part in pattern:
        if part == "#":
            seen = False
            for j, ok in enumerate(reach):
                seen = seen or ok
                reach[j] = seen
        elif part == "*":
            reach = [False, *reach[:-1]]
        else:
            reach = [False] + [reach[j] and words[j] == part for j in range(len(words))]
    return reach[-1]


def delivery_matches_bindings(
    exchange: str | None,
    routing_key: str | None,
    *,
    queue: str,
    bindings: Collection[Binding],
) -> bool:
    """Whether a delivery to ``queue`` can have come through one of ``bindings``.

    True when some binding names the delivery's exchange and its key matches
    the routing key (:func:`routing_key_matches`), or when the message came
    through the default exchange (``""``) with the queue's name as routing key
    (every queue is bound there). ``None`` counts as ``""``. Pure; never raises.
    """
    exchange, routing_key = exchange or "", routing_key or ""
    if exchange == "" and routing_key == queue:
        return True
    return any(
        bound == exchange and routing_key_matches(key, routing_key) for bound, key in bindings
    )


def routing_headers(headers: Mapping[str, Any] | None) -> list[str]:
    """The ``CC``/``BCC`` headers of a message (any letter case), in order.

    RabbitMQ acts on ``CC`` and ``BCC`` exactly; other spellings are listed
    too, since no trusthop publisher sets any of them.
    """
    return [str(k) for k in (headers or {}) if str(k).lower() in _ROUTING_HEADERS]


def _source(exchange: str | None, routing_key: str | None) -> tuple[str, TrustError | None]:
    """The delivery's destination, or a label and the rejection it implies."""
    exchange, routing_key = exchange or "", routing_key or ""
    try:
        return amqp_destination(exchange, routing_key), None
    except ValueError as exc:
        # No trusthop publisher can have signed for this exchange name.
        return f"amqp:{exchange}/{routing_key}", TrustError(Reason.WRONG_DESTINATION, str(exc))


def check_delivery(
    *,
    headers: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None,
    exchange: str | None,
    routing_key: str | None,
    queue: str | None = None,
    bindings: Collection[Binding] | None = None,
) -> tuple[WireEvent, str]:
    """The routing checks and decoding of :func:`verify_delivery`, without
    the chain's verification: the decoded event and the destination the
    delivery came from (``amqp:<exchange>/<routing key>``).

    What the worker runs before :meth:`~trusthop.admission.Admission.admit`.
    Pure (no I/O).

    Raises:
        TrustError: ``wrong_destination`` for the routing checks,
            ``malformed`` when the message is no CloudEvent, or carries the
            marker of properties the client could not decode or of a header
            named twice (:mod:`trusthop.amqp.frames`).
        ValueError: ``bindings`` given without ``queue``.
    """
    if bindings is not None and queue is None:
        raise ValueError("bindings= needs queue= (the default exchange routes by queue name)")
    marker = undecodable(headers)
    if marker is not None:
        raise TrustError(Reason.MALFORMED, marker.problem)
    copied = routing_headers(headers)
    if copied:
        raise TrustError(
            Reason.WRONG_DESTINATION,
            f"the message carries a {copied[0][:8]!r} header: RabbitMQ copies it into queues "
            "bound to other routing keys than the one it reports, so trusthop refuses it",
        )
    destination, refused = _source(exchange, routing_key)
    if refused is not None:
        raise refused
    if (
        bindings is not None
        and queue is not None
        and not delivery_matches_bindings(exchange, routing_key, queue=queue, bindings=bindings)
    ):
        raise TrustError(
            Reason.WRONG_DESTINATION,
            f"{destination[:300]} matches none of the bindings expected for queue {queue[:255]!r}",
        )
    return decode_amqp(headers, body, content_type), destination


def verify_delivery(
    verifier: ChainVerifier,
    *,
    headers: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None,
    exchange: str | None,
    routing_key: str | None,
    queue: str | None = None,
    bindings: Collection[Binding] | None = None,
) -> TrustedEvent:
    """Decode and verify one delivered message, as the worker does (the
    worker runs :func:`verify_delivery_async`, which also asks the
    verifier's external decision point).

    In order: a ``CC``/``BCC`` header (:func:`routing_headers`) is refused;
    an exchange name no trusthop publisher can sign for is refused; when
    ``bindings`` is given, a delivery to ``queue`` that none of them (nor the
    default exchange) can have routed is refused
    (:func:`delivery_matches_bindings`); then the message is decoded and its
    chain verified against ``amqp:<exchange>/<routing key>``. With
    ``bindings=None`` only the chain's destination is checked.

    Pure (no I/O). ``x-*`` and other non-CloudEvents headers are ignored by
    the decoder, so they are neither trusted nor covered by the digest.

    Raises:
        TrustError: the only exception, whatever the headers and body hold;
            ``wrong_destination`` for the three routing checks.
        ValueError: ``bindings`` given without ``queue`` (a caller's bug).
        RuntimeError: the verifier has a PDP (use :func:`verify_delivery_async`).
    """
    wire, destination = check_delivery(
        headers=headers,
        body=body,
        content_type=content_type,
        exchange=exchange,
        routing_key=routing_key,
        queue=queue,
        bindings=bindings,
    )
    return verifier.verify(wire, destination)


async def verify_delivery_async(
    verifier: ChainVerifier,
    *,
    headers: Mapping[str, Any] | None,
    body: bytes,
    content_type: str | None,
    exchange: str | None,
    routing_key: str | None,
    queue: str | None = None,
    bindings: Collection[Binding] | None = None,
) -> TrustedEvent:
    """:func:`verify_delivery`, with the verifier's external decision point.

    The same routing checks and decoding, then
    :meth:`ChainVerifier.verify_async` (which awaits the PDP, if one is
    configured). No broker I/O. What the worker runs.

    Raises:
        TrustError: as :func:`verify_delivery`, plus ``pdp_unavailable`` or
            the PDP's deny reason.
        ValueError: ``bindings`` given without ``queue`` (a caller's bug).
    """
    wire, destination = check_delivery(
        headers=headers,
        body=body,
        content_type=content_type,
        exchange=exchange,
        routing_key=routing_key,
        queue=queue,
        bindings=bindings,
    )
    return await verifier.verify_async(wire, destination)


# --------------------------------------------------------------------------- #
# dead-letter headers
# --------------------------------------------------------------------------- #


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


def encoded_headers_size(headers: Mapping[str, Any]) -> int | None:
    """Bytes of ``headers`` encoded as an AMQP field table, as aio-pika sends it.

    Returns ``None`` when pamqp cannot encode them (a value of an unsupported
    type or out of range). Never raises.
    """
    try:
        return len(encode.field_table(dict(headers)))
    except Exception:  # any encoder failure means "cannot be sent as is"
        return None


def header_budget(frame_max: int | None) -> int:
    """Largest header table a dead letter may carry on a connection with ``frame_max``.

    ``frame_max`` minus :data:`HEADER_FRAME_RESERVE` (the other properties
    and the frame overhead), but at least half of ``frame_max``. ``None`` or
    ``0`` (unknown, or "no limit") count as :data:`DEFAULT_FRAME_MAX`.
    """
    frame = frame_max or DEFAULT_FRAME_MAX
    return max(frame - HEADER_FRAME_RESERVE, frame // 2)


def _copied(headers: Mapping[str, Any] | None) -> HeadersType:
    out: HeadersType = {}
    for key, value in (headers or {}).items():
        name = str(key)
        lowered = name.lower()
        if lowered.startswith(_OWN_PREFIX) or lowered in _ROUTING_HEADERS:
            continue
        out[name] = _reencodable(value)
    return out


def minimal_dead_letter_headers(
    headers: Mapping[str, Any] | None, rejection: Rejection
) -> HeadersType:
    """Headers of a dead letter that leaves every original header out.

    The rejection's ``trusthop-*`` headers, plus ``trusthop-headers-dropped``
    (how many original headers there were) and ``trusthop-headers-bytes``
    (the encoded size of those that a full dead letter would have copied, or
    ``unencodable`` when pamqp cannot encode them). All values are strings.
    Never raises.
    """
    copied = _copied(headers)
    size = encoded_headers_size(copied)
    out: HeadersType = dict(rejection.headers())
    out[H_HEADERS_DROPPED] = str(len(headers or {}))
    out[H_HEADERS_BYTES] = "unencodable" if size is None else str(size)
    return out


def dead_letter_headers(
    headers: Mapping[str, Any] | None, rejection: Rejection, *, max_bytes: int | None = None
) -> HeadersType:
    """Headers of a dead letter: the original ones plus the rejection's.

    Original ``trusthop-*`` headers are dropped (a sender cannot forge a
    verdict), as are ``CC``/``BCC`` (RabbitMQ would route extra copies);
    values are made encodable again (``bytes`` become ``bytearray``).

    With ``max_bytes``, the result is checked once encoded: if it is larger,
    or pamqp cannot encode it, :func:`minimal_dead_letter_headers` is returned
    instead (RabbitMQ closes the whole connection on a content-header frame
    larger than ``frame_max``, and a value pamqp refuses would make every
    publish of the dead letter fail). Never raises.
    """
    out = _copied(headers)
    out.update(rejection.headers())
    if max_bytes is not None:
        size = encoded_headers_size(out)
        if size is None or size > max_bytes:
            return minimal_dead_letter_headers(headers, rejection)
    return out
