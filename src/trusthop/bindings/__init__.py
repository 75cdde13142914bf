"""CloudEvents protocol bindings: Kafka, AMQP 0-9-1 and the JSON structured format.

Pure functions between transport-level pieces (headers, body) and
:class:`trusthop.event.WireEvent`. Decoders never trust their input: every
problem becomes ``TrustError(malformed)``, never another exception.
"""

from trusthop.bindings.amqp import decode_amqp, encode_amqp
from trusthop.bindings.kafka import decode_kafka, encode_kafka
from trusthop.bindings.structured import decode_structured, encode_structured

__all__ = [
    "decode_amqp",
    "decode_kafka",
    "decode_structured",
    "encode_amqp",
    "encode_kafka",
    "encode_structured",
]
