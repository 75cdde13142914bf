"""RedisReplayStore's pure parts: expiry arithmetic and construction (no server).

The store's behaviour against a real Redis is in integration/test_redis_store.py.
"""

from __future__ import annotations

import math

import pytest
import redis.asyncio

from trusthop.stores.redis import MAX_TTL_MS, RedisReplayStore, _expiry_ms, _redact, _ttl_ms


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (60.0, 60_000),
        (1.2345, 1_235),
        (0.0001, 1),
        (0.0, 1),
        (-30.0, 1),
        (-math.inf, 1),
        (math.inf, MAX_TTL_MS),
        (1e300, MAX_TTL_MS),
    ],
)
def test_ttl_ms_rounds_up_within_bounds(seconds: float, expected: int) -> None:
    assert _ttl_ms(seconds) == expected


def test_ttl_ms_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _ttl_ms(math.nan)


@pytest.mark.parametrize(
    ("ttl_ms", "remaining_ms", "expected"),
    [
        (5_000, -2, 5_000),  # absent: the new ttl
        (5_000, 9_000, 9_000),  # longer remaining time kept
        (9_000, 5_000, 9_000),  # longer new ttl wins
        (1, 0, 1),
        (5_000, -1, None),  # no expiry: KEEPTTL
    ],
)
def test_expiry_never_shortens(ttl_ms: int, remaining_ms: int, expected: int | None) -> None:
    assert _expiry_ms(ttl_ms, remaining_ms) == expected


def test_redact() -> None:
    assert _redact("auth hunter2 failed", "hunter2") == "auth *** failed"
    assert _redact("no secret", None) == "no secret"
    assert _redact("no secret", "") == "no secret"


def test_constructor_validates() -> None:
    client = redis.asyncio.Redis()
    with pytest.raises(ValueError, match="max_attempts"):
        RedisReplayStore(client, max_attempts=0)
    decoding = redis.asyncio.Redis(decode_responses=True)
    with pytest.raises(ValueError, match="bytes"):
        RedisReplayStore(decoding)
    with pytest.raises(ValueError, match="bytes"):
        RedisReplayStore.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    with pytest.raises(ValueError, match="bytes"):
        RedisReplayStore.from_url("redis://127.0.0.1:6379/0?decode_responses=true")


def test_from_url_defaults_timeouts_and_names_server_without_password() -> None:
    store = RedisReplayStore.from_url("redis://user:hunter2@db.example:6380/3", prefix="p:")
    kwargs = store._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 5.0
    assert store.prefix == "p:"
    assert "hunter2" not in store._where
    assert "db.example:6380" in store._where
    assert "db 3" in store._where
