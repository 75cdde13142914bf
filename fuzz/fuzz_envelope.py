"""Coverage-guided fuzz target (atheris) for trusthop's envelope decoders.

Every input ends in a verdict: a verified event or a
:class:`~trusthop.errors.TrustError`. Anything else raised is a finding
(atheris stops and writes the input as ``crash-<sha1>``). The first byte of
an input picks what the rest of it is:

* ``rings``: ring byte strings (see :func:`rings_of`), each encoded as
  base64url and joined into a version-2 ``trustchain`` (``2.<ring>.<ring>``),
  then verified;
* ``chain-text``: the ``trustchain`` attribute text itself (Latin-1), verified;
* ``hop-body``: the body of a hop ring, signed by a bundled key after a valid
  origin (so the signature holds whatever the bytes are) and verified: the
  rules after the signatures (links, narrowing, delivery, time) see it all;
* ``kafka``: Kafka headers and value (see :func:`kafka_record`), decoded by
  the Kafka binding and verified as consumed from ``kafka:payments``;
* ``amqp-frame``: the properties of an AMQP content header frame, decoded by
  pamqp with trusthop's frame guard (:mod:`trusthop.amqp.frames`), then the
  message checked and verified as the worker does;
* ``structured``: a structured-mode (JSON) body, decoded and verified.

Run it (see ``fuzz/README.md``)::

    pip install -e '.[fuzz]'
    python fuzz/fuzz_envelope.py --make-corpus fuzz/corpus
    python fuzz/fuzz_envelope.py fuzz/corpus -max_total_time=600

Without atheris the module still imports: ``tests/test_attack_catalogue.py``
runs :func:`TestOneInput` over :func:`seed_corpus` in CI.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pamqp import commands, header

from trusthop.amqp.frames import guarded_unmarshal
from trusthop.amqp.messages import verify_delivery
from trusthop.bindings import decode_kafka, decode_structured, encode_amqp, encode_kafka
from trusthop.bindings.structured import encode_structured
from trusthop.bundle import TrustBundle
from trusthop.canonical import b64url_decode, b64url_encode
from trusthop.chain import Chain
from trusthop.errors import TrustError
from trusthop.event import WireEvent
from trusthop.keys import SigningKey
from trusthop.pipeline import ChainVerifier
from trusthop.rings import HOP_DOMAIN, SIGNATURE_BYTES
from trusthop.sign import Identity, append_hop, mint_origin

MODES = ("rings", "chain-text", "kafka", "amqp-frame", "structured", "hop-body")

# A deterministic world: two workloads, one bundle, one valid event per destination.
T0 = 1_767_225_600
NOW = T0 + 30
EDGE = Identity.create(
    "spiffe://prod.example.com/ns/edge/sa/gateway", SigningKey.from_seed(b"\x01" * 32), kid="edge"
)
ORDERS = Identity.create(
    "spiffe://prod.example.com/ns/shop/sa/orders", SigningKey.from_seed(b"\x02" * 32), kid="orders"
)
BUNDLE = TrustBundle.of([EDGE.bundle_key, ORDERS.bundle_key])
KAFKA_TOPIC = "payments"
KAFKA_DEST = f"kafka:{KAFKA_TOPIC}"
AMQP_EXCHANGE, AMQP_KEY = "shipping", "order.reserved"
AMQP_DEST = f"amqp:{AMQP_EXCHANGE}/{AMQP_KEY}"


def _origin() -> Chain:
    return Chain(mint_origin(
        EDGE,
        subject="user:alice",
        issuer="https://idp.example.com",
        credential="token",
        scope={"orders:write", "payments:charge"},
        now=T0,
        ttl=3600,
        transaction_id="txn-1",
    ))


ORIGIN = _origin()


def _sealed(destination: str) -> WireEvent:
    wire = WireEvent(
        {
            "specversion": "1.0",
            "id": "evt-1",
            "source": "/shop/orders",
            "type": "payment.requested",
            "time": "2026-01-01T00:00:10Z",
            "datacontenttype": "application/json",
            "count": "7",
        },
        b'{"amount":999,"order":42}',
    )
    chain = append_hop(
        ORDERS, ORIGIN, event_digest=wire.digest(), destination=destination, now=T0 + 20
    )
    return replace(wire, chain=chain.encode())


KAFKA_EVENT = _sealed(KAFKA_DEST)
AMQP_EVENT = _sealed(AMQP_DEST)
AMQP_HEADERS, AMQP_BODY, AMQP_CONTENT_TYPE = encode_amqp(AMQP_EVENT)


def _verifier() -> ChainVerifier:
    return ChainVerifier(BUNDLE, clock=lambda: NOW, cache_size=0)


def _verify_text(text: str) -> bool:
    wire = replace(KAFKA_EVENT, chain=text)
    _verifier().verify(wire, KAFKA_DEST)
    return True


def rings_of(payload: bytes) -> list[bytes]:
    """Ring byte strings from bytes: each a length (2 bytes, big endian)
    then that many bytes (fewer at the end of the input). Never raises."""
    rings: list[bytes] = []
    at = 0
    while at < len(payload):
        size = int.from_bytes(payload[at : at + 2], "big")
        rings.append(payload[at + 2 : at + 2 + size])
        at += 2 + size
    return rings


def rings_payload(rings: list[bytes]) -> bytes:
    """The inverse of :func:`rings_of` (for seeds)."""
    return b"".join(len(r).to_bytes(2, "big") + r for r in rings)


def _rings(payload: bytes) -> bool:
    return _verify_text(".".join(["2", *(b64url_encode(r) for r in rings_of(payload))]))


def _hop_body(body: bytes) -> bool:
    """``body`` signed by the orders key as the ring after the origin."""
    prev_hash = ORIGIN.hashes()[-1]
    ring = ORDERS.key.sign(HOP_DOMAIN + prev_hash + body) + body
    return _verify_text(f"{ORIGIN.encode()}.{b64url_encode(ring)}")


def kafka_record(payload: bytes) -> tuple[list[tuple[str, bytes | None]], bytes | None]:
    """Headers and value from bytes: a header count (1 byte), then per header
    a name length (1 byte), the name (UTF-8, errors replaced: aiokafka never
    hands over a name that is not UTF-8), a value length (2 bytes, big
    endian; ``0xffff``: ``None``) and the value; the rest is the record
    value (``None`` when nothing is left). Never raises."""
    headers: list[tuple[str, bytes | None]] = []
    count, at = (payload[0], 1) if payload else (0, 0)
    for _ in range(count):
        if at >= len(payload):
            break
        size = payload[at]
        name = payload[at + 1 : at + 1 + size].decode("utf-8", "replace")
        at += 1 + size
        if at + 2 > len(payload):
            headers.append((name, None))
            at = len(payload)
            break
        size = int.from_bytes(payload[at : at + 2], "big")
        at += 2
        if size == 0xFFFF:
            headers.append((name, None))
            continue
        headers.append((name, payload[at : at + size]))
        at += size
    rest = payload[at:]
    return headers, rest if rest else None


def kafka_payload(headers: list[tuple[str, bytes | None]], value: bytes | None) -> bytes:
    """The inverse of :func:`kafka_record` (for seeds)."""
    out = bytearray([len(headers)])
    for name, header_value in headers:
        raw = name.encode()
        out += bytes([len(raw)]) + raw
        if header_value is None:
            out += b"\xff\xff"
        else:
            out += len(header_value).to_bytes(2, "big") + header_value
    return bytes(out) + (value or b"")


def _kafka(payload: bytes) -> bool:
    headers, value = kafka_record(payload)
    _verifier().verify(decode_kafka(headers, value), KAFKA_DEST)
    return True


def _amqp_frame(payload: bytes) -> bool:
    frame = struct.pack(">HHQ", 60, 0, len(AMQP_BODY)) + payload
    decoded = header.ContentHeader()
    try:
        guarded_unmarshal(decoded, frame)
    except (ValueError, struct.error):
        # The fixed part (flags) is truncated: pamqp refuses the frame before
        # any message exists, as RabbitMQ would have refused it on publish.
        return False
    properties = decoded.properties
    verify_delivery(
        _verifier(),
        headers=getattr(properties, "headers", None),
        body=AMQP_BODY,
        content_type=getattr(properties, "content_type", None),
        exchange=AMQP_EXCHANGE,
        routing_key=AMQP_KEY,
    )
    return True


def _structured(payload: bytes) -> bool:
    _verifier().verify(decode_structured(payload), KAFKA_DEST)
    return True


_RUNNERS: dict[str, Callable[[bytes], bool]] = {
    "rings": _rings,
    "chain-text": lambda payload: _verify_text(payload.decode("latin-1")),
    "kafka": _kafka,
    "amqp-frame": _amqp_frame,
    "structured": _structured,
    "hop-body": _hop_body,
}


@dataclass(frozen=True)
class Outcome:
    """What one input came to: its mode and whether it verified."""

    mode: str
    verified: bool


def TestOneInput(data: bytes) -> Outcome:
    """One fuzz input: a verdict, or an exception that is a finding."""
    mode = MODES[data[0] % len(MODES)] if data else MODES[0]
    try:
        verified = _RUNNERS[mode](data[1:])
    except TrustError:
        verified = False
    return Outcome(mode, verified)


def _properties_payload() -> bytes:
    properties = commands.Basic.Properties(
        content_type=AMQP_CONTENT_TYPE, headers=dict(AMQP_HEADERS)
    )
    return header.ContentHeader(0, len(AMQP_BODY), properties).marshal()[12:]


def seed_corpus() -> Iterator[bytes]:
    """Valid inputs of every mode, and a few near misses."""
    pick = {mode: bytes([index]) for index, mode in enumerate(MODES)}
    assert KAFKA_EVENT.chain is not None
    rings = [b64url_decode(segment) for segment in KAFKA_EVENT.chain.split(".")[1:]]
    yield pick["rings"] + rings_payload(rings)
    yield pick["rings"] + rings_payload([rings[0], rings[1][:-1]])
    yield pick["rings"] + rings_payload([rings[0], rings[0], rings[1]])
    yield pick["chain-text"] + KAFKA_EVENT.chain.encode()
    yield pick["chain-text"] + KAFKA_EVENT.chain.encode() + b"="
    yield pick["chain-text"] + b"1" + KAFKA_EVENT.chain.encode()[1:]
    headers, value = encode_kafka(KAFKA_EVENT)
    yield pick["kafka"] + kafka_payload(list(headers), value)
    yield pick["kafka"] + kafka_payload([*headers, ("ce_id", None)], value)
    s_headers, s_value = encode_kafka(KAFKA_EVENT, structured=True)
    yield pick["kafka"] + kafka_payload(list(s_headers), s_value)
    properties = _properties_payload()
    yield pick["amqp-frame"] + properties
    yield pick["amqp-frame"] + properties[:-3]
    yield pick["structured"] + encode_structured(KAFKA_EVENT)
    yield pick["structured"] + encode_structured(AMQP_EVENT)
    body = rings[1][SIGNATURE_BYTES:]
    yield pick["hop-body"] + body  # verifies: the orders ring of KAFKA_EVENT
    yield pick["hop-body"] + body[:-1]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv if argv is None else argv)
    if len(args) == 3 and args[1] == "--make-corpus":
        directory = Path(args[2])
        directory.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seed_corpus()):
            (directory / f"seed-{index:02d}").write_bytes(seed)
        print(f"wrote {index + 1} seeds to {directory}")
        return
    if len(args) >= 3 and args[1] == "--replay":
        for path in args[2:]:
            for file in sorted(Path(path).iterdir()) if Path(path).is_dir() else [Path(path)]:
                print(f"{file}: {TestOneInput(file.read_bytes())}")
        return
    try:
        import atheris  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]' (see fuzz/README.md)")
    # libFuzzer's -jobs/-workers/-fork re-run argv[0] through the shell: make
    # it this interpreter and this script, so the script need not be executable.
    args[0] = f"{sys.executable} {Path(__file__).resolve()}"
    atheris.instrument_all()
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
