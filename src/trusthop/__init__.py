"""trusthop: signed trust chains for CloudEvents crossing Kafka and RabbitMQ.

The edge verifies a user's token once and mints an origin ring; every
workload that publishes a derived event appends a signed hop ring; every
consumer verifies the whole chain before its handler runs. See ``docs/``.
"""

from trusthop.admission import Admission, Admitted
from trusthop.amqp import Delivery as AmqpDelivery
from trusthop.amqp import PublishRefused, TrustedPublisher, TrustedWorker
from trusthop.bundle import BundleError, BundleKey, BundleSource, TrustBundle
from trusthop.chain import Chain, HopRing, OriginRing, decode_chain
from trusthop.destination import (
    amqp_destination,
    kafka_destination,
    retry_topic,
    signed_kafka_destination,
)
from trusthop.digest import event_digest
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.kafka import KafkaDelivery, TrustedKafkaConsumer, TrustedKafkaProducer
from trusthop.keys import PublicKey, SigningKey
from trusthop.memory import MemoryBroker, MemoryConsumer, MemoryProducer
from trusthop.metrics import Counters, Metrics, PrometheusMetrics
from trusthop.pipeline import ChainSigner, ChainVerifier, Rejection, TrustedEvent
from trusthop.policy import Decision, Policy, PolicyError, load_policy
from trusthop.replay import DeliveryInfo, DeliveryKind, OnReplay, Sighting
from trusthop.sigcache import SignatureCache
from trusthop.sign import Identity, append_hop, hash_credential, mint_origin
from trusthop.spiffe import SpiffeId, validate_spiffe_id
from trusthop.stores import MemoryReplayStore, ReplayStore, StoreError, StoreFull
from trusthop.verify import Limits, VerifiedContext, verify_chain

__version__ = "0.1.0"

__all__ = [
    "Admission",
    "Admitted",
    "AmqpDelivery",
    "BundleError",
    "BundleKey",
    "BundleSource",
    "Chain",
    "ChainSigner",
    "ChainVerifier",
    "Counters",
    "Decision",
    "DeliveryInfo",
    "DeliveryKind",
    "HopRing",
    "Identity",
    "KafkaDelivery",
    "Limits",
    "MemoryBroker",
    "MemoryConsumer",
    "MemoryProducer",
    "MemoryReplayStore",
    "Metrics",
    "OnReplay",
    "OriginRing",
    "Policy",
    "PolicyError",
    "PrometheusMetrics",
    "PublicKey",
    "PublishRefused",
    "Reason",
    "Rejection",
    "ReplayStore",
    "Sighting",
    "SignatureCache",
    "SigningKey",
    "SpiffeId",
    "StoreError",
    "StoreFull",
    "TrustBundle",
    "TrustError",
    "TrustedEvent",
    "TrustedKafkaConsumer",
    "TrustedKafkaProducer",
    "TrustedPublisher",
    "TrustedWorker",
    "VerifiedContext",
    "WireEvent",
    "__version__",
    "amqp_destination",
    "append_hop",
    "decode_chain",
    "event_digest",
    "hash_credential",
    "kafka_destination",
    "load_policy",
    "mint_origin",
    "retry_topic",
    "signed_kafka_destination",
    "validate_spiffe_id",
    "verify_chain",
]
