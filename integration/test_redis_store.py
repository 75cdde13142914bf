"""RedisReplayStore against a real Redis: atomicity across replicas, expiry,
failures, and the eviction-policy check.

Tests that only read and write keys use the session's Redis (``redis_url``)
under a unique key prefix, deleted afterwards. Tests that change server
configuration (``maxmemory``, ``maxmemory-policy``, ACL users) run against a
private ``redis-server`` on a Unix socket started by this module, so they
never disturb anyone else using the shared server; they fail when no
``redis-server`` binary is on the PATH (every machine of this project's kind
has one; ``.ci/run`` checks it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from trusthop.replay import DeliveryInfo, DeliveryKind, Sighting, accepted, classify
from trusthop.stores.base import Change, StoreError, StoreFull
from trusthop.stores.redis import RedisReplayStore

pytestmark = pytest.mark.integration

KEY = "5e" * 32
NOW = 1_700_000_000.0
REPLICA_TASKS = 50


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest.fixture
def prefix(unique_name: str) -> str:
    return f"{unique_name}:"


@pytest.fixture
async def raw(redis_url: str, prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the session's Redis; deletes the test's keys afterwards."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        names = [name async for name in client.scan_iter(match=f"{prefix}*", count=1000)]
        if names:
            await client.delete(*names)
        await client.aclose()


@pytest.fixture
async def store(
    redis_url: str, prefix: str, raw: redis.asyncio.Redis
) -> AsyncIterator[RedisReplayStore]:
    async with RedisReplayStore.from_url(redis_url, prefix=prefix) as opened:
        yield opened


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """``unix://`` URL of a redis-server owned by this module (its config may change)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no redis-server binary on PATH for the server-configuration tests")
    workdir = Path(tempfile.mkdtemp(prefix="th-redis-"))
    sock = workdir / "redis.sock"
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(unix_socket_path=str(sock), socket_timeout=1) as probe:
                    probe.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "private redis-server did not start: "
                        + (workdir / "redis.log").read_text(errors="replace")[-500:]
                    ) from None
                time.sleep(0.05)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def private_raw(private_redis: str, prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(private_redis)
    try:
        yield client
    finally:
        names = [name async for name in client.scan_iter(match=f"{prefix}*", count=1000)]
        if names:
            await client.delete(*names)
        await client.aclose()


async def config(client: redis.asyncio.Redis, name: str) -> str:
    reply = await client.config_get(name)
    value = reply[name]
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


async def stored_sighting(client: redis.asyncio.Redis, name: str) -> Sighting:
    value = await client.get(name)
    assert isinstance(value, bytes)
    return Sighting.decode(value)


def put(value: bytes | None, ttl: float = 60.0) -> Change:
    return lambda current: (value, ttl)


def claim(delivery: DeliveryInfo, max_uses: int, calls: list[int]) -> Change:
    """The consumer's rule, as a pure change: remember the delivery if accepted."""

    def change(current: bytes | None) -> tuple[bytes | None, float]:
        calls.append(1)
        sighting = None if current is None else Sighting.decode(current)
        kind = classify(sighting, delivery, max_uses=max_uses)
        new = accepted(sighting, delivery, kind, destination="orders", now=NOW, expires=NOW + 3600)
        return (None if new is None else new.encode(), 60.0)

    return change


async def race(redis_url: str, prefix: str, max_uses: int) -> tuple[list[DeliveryKind], int]:
    """Two replicas (two clients), REPLICA_TASKS copies each, all claiming KEY.

    Returns every task's kind (judged on the value its change was finally
    applied to, as the consumer does) and how many times changes ran.
    """
    calls: list[int] = []
    go = asyncio.Event()
    async with (
        RedisReplayStore.from_url(redis_url, prefix=prefix) as one,
        RedisReplayStore.from_url(redis_url, prefix=prefix) as two,
    ):

        async def copy(replica: RedisReplayStore, n: int) -> DeliveryKind:
            delivery = DeliveryInfo(id=f"orders/0@{n}")
            await go.wait()
            seen = await replica.update(KEY, claim(delivery, max_uses, calls))
            prior = None if seen is None else Sighting.decode(seen)
            return classify(prior, delivery, max_uses=max_uses)

        tasks = [
            asyncio.create_task(copy(replica, n))
            for n, replica in enumerate([one, two] * REPLICA_TASKS)
        ]
        await asyncio.sleep(0)
        go.set()
        kinds = await asyncio.gather(*tasks)
    return list(kinds), len(calls)


# --------------------------------------------------------------------------- #
# reads and writes
# --------------------------------------------------------------------------- #


async def test_get_update_roundtrip(store: RedisReplayStore, raw: redis.asyncio.Redis) -> None:
    assert await store.get(KEY) is None
    assert await store.update(KEY, put(b"one")) is None
    assert await store.get(KEY) == b"one"
    assert await raw.get(store.prefix + KEY) == b"one"
    assert await store.update(KEY, put(b"two")) == b"one"
    assert await store.get(KEY) == b"two"


async def test_change_returning_none_writes_nothing(
    store: RedisReplayStore, raw: redis.asyncio.Redis
) -> None:
    seen: list[bytes | None] = []

    def leave(current: bytes | None) -> tuple[bytes | None, float]:
        seen.append(current)
        return None, 600.0

    assert await store.update(KEY, leave) is None
    assert await raw.exists(store.prefix + KEY) == 0

    await store.update(KEY, put(b"kept", 30.0))
    assert await store.update(KEY, leave) == b"kept"
    assert await store.get(KEY) == b"kept"
    assert await raw.pttl(store.prefix + KEY) <= 30_000
    assert seen == [None, b"kept"]


async def test_ttl_applied_never_shortened_and_extended(
    store: RedisReplayStore, raw: redis.asyncio.Redis
) -> None:
    name = store.prefix + KEY
    await store.update(KEY, put(b"a", 20.0))
    assert 19_000 < await raw.pttl(name) <= 20_000

    await store.update(KEY, put(b"b", 2.0))
    assert await store.get(KEY) == b"b"
    assert 18_000 < await raw.pttl(name) <= 20_000

    await store.update(KEY, put(b"c", 0.0))
    assert await store.get(KEY) == b"c"
    assert 18_000 < await raw.pttl(name) <= 20_000

    await store.update(KEY, put(b"d", 300.0))
    assert await store.get(KEY) == b"d"
    assert 299_000 < await raw.pttl(name) <= 300_000


async def test_fractional_and_non_positive_ttls_still_expire(
    store: RedisReplayStore, raw: redis.asyncio.Redis
) -> None:
    await store.update(KEY, put(b"x", 1.2345))
    assert 1_000 < await raw.pttl(store.prefix + KEY) <= 1_235

    other = "ab" * 32
    assert await store.update(other, put(b"y", -5.0)) is None
    assert await raw.pttl(store.prefix + other) in (-2, 0, 1)  # written with 1 ms, never persistent


async def test_key_without_expiry_keeps_none(
    store: RedisReplayStore, raw: redis.asyncio.Redis
) -> None:
    name = store.prefix + KEY
    await raw.set(name, b"foreign")
    assert await store.update(KEY, put(b"mine", 5.0)) == b"foreign"
    assert await raw.get(name) == b"mine"
    assert await raw.pttl(name) == -1


async def test_corrupt_value_is_returned_raw(
    store: RedisReplayStore, raw: redis.asyncio.Redis
) -> None:
    name = store.prefix + KEY
    junk = b"\xc1 not msgpack \xff"
    await raw.set(name, junk, px=60_000)
    assert await store.get(KEY) == junk
    with pytest.raises(ValueError, match="not a trusthop sighting"):
        Sighting.decode(junk)

    def decode_first(current: bytes | None) -> tuple[bytes | None, float]:
        assert current is not None
        Sighting.decode(current)
        return b"never", 60.0

    with pytest.raises(ValueError, match="not a trusthop sighting"):
        await store.update(KEY, decode_first)
    assert await raw.get(name) == junk


async def test_wrong_redis_type_is_a_store_error(
    store: RedisReplayStore, raw: redis.asyncio.Redis
) -> None:
    await raw.rpush(store.prefix + KEY, b"a list")
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await store.get(KEY)
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await store.update(KEY, put(b"x"))


async def test_caller_client_is_not_closed(redis_url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with RedisReplayStore(client, prefix=prefix) as store:
            assert await store.get(KEY) is None
        assert await client.ping()
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- #
# concurrency
# --------------------------------------------------------------------------- #


async def test_replicas_race_exactly_one_first(
    redis_url: str, prefix: str, raw: redis.asyncio.Redis
) -> None:
    kinds, calls = await race(redis_url, prefix, max_uses=1)
    assert Counter(kinds) == {DeliveryKind.FIRST: 1, DeliveryKind.REPLAY: 2 * REPLICA_TASKS - 1}
    assert calls > 2 * REPLICA_TASKS, "no transaction was retried: the race did not happen"
    stored = await stored_sighting(raw, prefix + KEY)
    assert stored.uses == 1
    assert len(stored.deliveries) == 1


async def test_replicas_race_exactly_max_uses_firsts(
    redis_url: str, prefix: str, raw: redis.asyncio.Redis
) -> None:
    kinds, calls = await race(redis_url, prefix, max_uses=3)
    assert Counter(kinds) == {DeliveryKind.FIRST: 3, DeliveryKind.REPLAY: 2 * REPLICA_TASKS - 3}
    assert calls > 2 * REPLICA_TASKS
    stored = await stored_sighting(raw, prefix + KEY)
    assert stored.uses == 3
    assert len(set(stored.deliveries)) == 3


async def test_concurrent_write_reruns_change_on_the_new_value(
    redis_url: str, prefix: str, raw: redis.asyncio.Redis
) -> None:
    seen: list[bytes | None] = []
    with redis.Redis.from_url(redis_url) as other:

        def change(current: bytes | None) -> tuple[bytes | None, float]:
            seen.append(current)
            if len(seen) == 1:
                other.set(prefix + KEY, b"theirs", px=60_000)
            return (current or b"") + b"+mine", 60.0

        async with RedisReplayStore.from_url(redis_url, prefix=prefix, max_attempts=2) as store:
            assert await store.update(KEY, change) == b"theirs"
    assert seen == [None, b"theirs"]
    assert await raw.get(prefix + KEY) == b"theirs+mine"


async def test_gives_up_after_max_attempts(
    redis_url: str, prefix: str, raw: redis.asyncio.Redis
) -> None:
    with redis.Redis.from_url(redis_url) as other:

        def change(current: bytes | None) -> tuple[bytes | None, float]:
            other.incr(prefix + KEY)
            return b"mine", 60.0

        async with RedisReplayStore.from_url(redis_url, prefix=prefix, max_attempts=3) as store:
            with pytest.raises(StoreError, match="after 3 attempts"):
                await store.update(KEY, change)
    assert await raw.get(prefix + KEY) == b"3"


async def test_connection_lost_before_commit_is_a_store_error(
    redis_url: str, prefix: str, raw: redis.asyncio.Redis
) -> None:
    client_name = f"victim-{uuid.uuid4().hex[:8]}"
    with redis.Redis.from_url(redis_url) as admin:

        def change(current: bytes | None) -> tuple[bytes | None, float]:
            killed = [c for c in admin.client_list() if c.get("name") == client_name]
            assert killed
            for entry in killed:
                admin.client_kill_filter(_id=entry["id"])
            return b"mine", 60.0

        async with RedisReplayStore.from_url(
            redis_url, prefix=prefix, client_name=client_name
        ) as store:
            with pytest.raises(StoreError, match="may or may not have been written"):
                await store.update(KEY, change)
            assert await store.get(KEY) is None  # reconnects


# --------------------------------------------------------------------------- #
# failures
# --------------------------------------------------------------------------- #


def no_secret(exc: BaseException, secret: str) -> None:
    assert secret not in "".join(traceback.format_exception(exc))


async def test_unreachable_redis_is_a_store_error_without_password(prefix: str) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    async with RedisReplayStore.from_url(
        f"redis://trusthop:{secret}@127.0.0.1:1/0", prefix=prefix
    ) as store:
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1") as got:
            await store.get(KEY)
        no_secret(got.value, secret)
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1") as got:
            await store.update(KEY, put(b"x"))
        no_secret(got.value, secret)
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1") as got:
            await store.check()
        no_secret(got.value, secret)


async def test_wrong_password_is_a_store_error_without_password(
    redis_url: str, prefix: str
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    url = redis.asyncio.Redis.from_url(redis_url).connection_pool.connection_kwargs
    host, port, db = url.get("host", "127.0.0.1"), url.get("port", 6379), url.get("db", 0)
    user = f"th-nobody-{uuid.uuid4().hex[:8]}"
    async with RedisReplayStore.from_url(
        f"redis://{user}:{secret}@{host}:{port}/{db}", prefix=prefix
    ) as store:
        with pytest.raises(StoreError, match="AuthenticationError") as got:
            await store.get(KEY)
        no_secret(got.value, secret)


async def test_timeout_is_a_store_error(prefix: str) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RedisReplayStore.from_url(
            f"redis://127.0.0.1:{port}/0",
            prefix=prefix,
            socket_timeout=0.2,
            retry=Retry(NoBackoff(), 0),
        ) as store:
            with pytest.raises(StoreError, match="Timeout"):
                await store.get(KEY)
    finally:
        server.close()
        await server.wait_closed()


async def test_full_redis_is_store_full(
    private_redis: str, prefix: str, private_raw: redis.asyncio.Redis
) -> None:
    policy = await config(private_raw, "maxmemory-policy")
    maxmemory = await config(private_raw, "maxmemory")
    async with RedisReplayStore.from_url(private_redis, prefix=prefix) as store:
        await store.update(KEY, put(b"before"))
        try:
            await private_raw.config_set("maxmemory-policy", "noeviction")
            await private_raw.config_set("maxmemory", 1)  # always below used_memory
            with pytest.raises(StoreFull, match="full") as got:
                await store.update("ab" * 32, put(b"new"))
            assert "never lets replay entries be evicted early" in str(got.value)
            with pytest.raises(StoreFull):
                await store.update(KEY, put(b"changed"))
            assert await store.get(KEY) == b"before"
            assert await store.get("ab" * 32) is None
        finally:
            await private_raw.config_set("maxmemory", maxmemory)
            await private_raw.config_set("maxmemory-policy", policy)
        assert await store.update(KEY, put(b"after")) == b"before"


# --------------------------------------------------------------------------- #
# check()
# --------------------------------------------------------------------------- #


async def test_check_reads_the_shared_servers_policy(
    store: RedisReplayStore, raw: redis.asyncio.Redis, redis_url: str, prefix: str
) -> None:
    if await config(raw, "maxmemory-policy") == "noeviction":
        await store.check()
    else:
        with pytest.raises(StoreError, match="noeviction"):
            await store.check()
        async with RedisReplayStore.from_url(
            redis_url, prefix=prefix, allow_eviction=True
        ) as lenient:
            await lenient.check()


async def test_check_refuses_evicting_policies(
    private_redis: str, prefix: str, private_raw: redis.asyncio.Redis
) -> None:
    original = await config(private_raw, "maxmemory-policy")
    async with (
        RedisReplayStore.from_url(private_redis, prefix=prefix) as strict,
        RedisReplayStore.from_url(private_redis, prefix=prefix, allow_eviction=True) as lenient,
    ):
        try:
            await private_raw.config_set("maxmemory-policy", "noeviction")
            await strict.check()
            await lenient.check()
            for policy in ("allkeys-lru", "volatile-ttl"):
                await private_raw.config_set("maxmemory-policy", policy)
                with pytest.raises(StoreError, match=f"maxmemory-policy {policy}") as got:
                    await strict.check()
                assert "maxmemory-policy noeviction" in str(got.value)
                assert "allow_eviction=True" in str(got.value)
                await lenient.check()
        finally:
            await private_raw.config_set("maxmemory-policy", original)
    assert await config(private_raw, "maxmemory-policy") == original


async def test_check_warns_when_config_is_forbidden(
    private_redis: str,
    prefix: str,
    private_raw: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = f"th-noconfig-{uuid.uuid4().hex[:8]}"
    secret = f"pw-{uuid.uuid4().hex}"
    await private_raw.acl_setuser(
        user,
        enabled=True,
        passwords=[f"+{secret}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-config"],
    )
    try:
        url = private_redis.replace("unix://", f"unix://{user}:{secret}@")
        async with RedisReplayStore.from_url(url, prefix=prefix) as store:
            with caplog.at_level(logging.WARNING, logger="trusthop.stores.redis"):
                await store.check()
            assert await store.update(KEY, put(b"ok")) is None
    finally:
        await private_raw.acl_deluser(user)
    messages = [r.getMessage() for r in caplog.records if r.name == "trusthop.stores.redis"]
    assert len(messages) == 1
    assert "noeviction" in messages[0]
    assert secret not in messages[0]
