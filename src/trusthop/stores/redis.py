"""A replay store in Redis, shared by every replica of a consumer scope.

Needs the ``redis`` extra (``pip install 'trusthop[redis]'``). Each entry is
one Redis string under ``prefix + key`` with a millisecond expiry; ``update``
is an optimistic transaction (``WATCH``, ``GET``/``PTTL``, ``MULTI``,
``SET``, ``EXEC``), so replicas racing on one ring agree on who saw it first.

The Redis server must never evict a replay entry before its expiry: a
forgotten sighting lets a copy of the message be accepted again. Run it with
``maxmemory-policy noeviction`` (:meth:`RedisReplayStore.check` verifies
it); a full Redis then refuses writes, which this store reports as
:class:`~trusthop.stores.base.StoreFull`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, cast

import redis.asyncio
import redis.exceptions
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError, WatchError

from trusthop.stores.base import Change, StoreError, StoreFull

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "MAX_TTL_MS", "RedisReplayStore"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "trusthop:replay:"
DEFAULT_MAX_ATTEMPTS = 16
DEFAULT_TIMEOUT = 5.0
"""Seconds :meth:`RedisReplayStore.from_url` waits to connect and for each
reply, unless told otherwise (redis-py's own default is to wait forever)."""

MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000
"""Longest expiry written (a century): longer or infinite ``ttl`` values are
capped here, because Redis refuses expiry times past its clock's range."""

_SAFE_POLICY = "noeviction"
_CONNECTION_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_NO_EXPIRY = -1


def _ttl_ms(seconds: float) -> int:
    """``seconds`` as a Redis ``PX`` value: rounded up, at least 1, at most
    :data:`MAX_TTL_MS`.

    A ``ttl`` of zero or less still writes the entry (for one millisecond)
    rather than skipping the write: the update happened and its effect is
    visible to a racing replica until it expires, exactly as if it had
    expired a moment later.

    Raises:
        ValueError: ``seconds`` is NaN (a bug in the ``change`` function).
    """
    if math.isnan(seconds):
        raise ValueError("change returned a NaN ttl")
    if seconds >= MAX_TTL_MS / 1000:
        return MAX_TTL_MS
    if seconds <= 0:
        return 1
    return max(1, math.ceil(seconds * 1000))


def _expiry_ms(ttl_ms: int, remaining_ms: int) -> int | None:
    """The ``PX`` to write given the key's ``PTTL`` read under ``WATCH``;
    ``None`` means keep the key's current expiry (``KEEPTTL``).

    ``remaining_ms`` is ``-2`` when the key is absent (or expired since the
    ``GET``) and ``-1`` when it exists without an expiry: that key was not
    written by this store and is kept as long as it already is (forever).
    Otherwise the longer of the two wins: the remaining time is re-applied as
    ``PX`` rather than with ``KEEPTTL``, so an entry expiring between the
    read and ``EXEC`` is rewritten with an expiry instead of without one, and
    the re-applied deadline is never earlier than the old one.
    """
    if remaining_ms == _NO_EXPIRY:
        return None
    return max(ttl_ms, remaining_ms)


def _redact(text: str, secret: str | None) -> str:
    if secret:
        return text.replace(secret, "***")
    return text


class RedisReplayStore:
    """A :class:`~trusthop.stores.base.ReplayStore` in Redis.

    Args:
        client: a ``redis.asyncio.Redis`` that returns bytes (not created
            with ``decode_responses=True``). The store does not close it.
        prefix: prepended to every key; keys themselves are opaque hex
            strings chosen by the caller.
        max_attempts: how many times ``update`` runs its transaction when
            other writers keep changing the key between its read and its
            write, before it gives up with
            :class:`~trusthop.stores.base.StoreError`.
        allow_eviction: let :meth:`check` pass on a Redis whose
            ``maxmemory-policy`` may evict entries before they expire (the
            operator accepts that an evicted sighting lets a replay through).

    Each ``update`` holds one pooled connection while its transaction runs,
    so concurrent updates are bounded by the client's ``max_connections``
    (redis-py's pool then fails with a connection error, reported as
    :class:`~trusthop.stores.base.StoreError`).

    Error messages name the server by host, port and database only; the
    password of the client's URL is never in a message.

    Raises:
        ValueError: ``max_attempts < 1``, or ``client`` decodes responses.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        allow_eviction: bool = False,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        settings: dict[str, Any] = client.connection_pool.connection_kwargs
        if settings.get("decode_responses"):
            raise ValueError(
                "the Redis client decodes responses to str; "
                "the replay store needs bytes (decode_responses=False)"
            )
        self.prefix = prefix
        self.max_attempts = max_attempts
        self.allow_eviction = allow_eviction
        self._client = client
        self._owns_client = False
        self._password: str | None = settings.get("password")
        if "path" in settings:
            self._where = f"Redis at unix:{settings['path']} (db {settings.get('db', 0)})"
        else:
            host, port = settings.get("host", "localhost"), settings.get("port", 6379)
            self._where = f"Redis at {host}:{port} (db {settings.get('db', 0)})"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        allow_eviction: bool = False,
        **client_kwargs: Any,
    ) -> Self:
        """A store on a new client for ``url`` (``redis://``, ``rediss://``,
        ``unix://``), closed by :meth:`aclose` or ``async with``.

        ``client_kwargs`` go to ``redis.asyncio.Redis.from_url``;
        ``socket_connect_timeout`` and ``socket_timeout`` default to
        :data:`DEFAULT_TIMEOUT`. No connection is made until first use.

        Raises:
            ValueError: a malformed URL, or ``decode_responses=True``.
        """
        if client_kwargs.get("decode_responses"):
            raise ValueError("the replay store needs bytes (decode_responses=False)")
        client_kwargs.setdefault("socket_connect_timeout", DEFAULT_TIMEOUT)
        client_kwargs.setdefault("socket_timeout", DEFAULT_TIMEOUT)
        client = redis.asyncio.Redis.from_url(url, **client_kwargs)
        store = cls(client, prefix=prefix, max_attempts=max_attempts, allow_eviction=allow_eviction)
        store._owns_client = True
        return store

    async def aclose(self) -> None:
        """Close the client if :meth:`from_url` created it; a client passed
        to the constructor stays open (its owner closes it)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _name(self, key: str) -> str:
        return self.prefix + key

    def _failure(self, action: str, exc: RedisError) -> StoreError:
        """``exc`` as the :class:`StoreError` (or :class:`StoreFull`) to raise."""
        if isinstance(exc, OutOfMemoryError):
            return StoreFull(
                f"{self._where} refused the write because it is full (maxmemory reached "
                "under maxmemory-policy noeviction); trusthop never lets replay entries be "
                "evicted early, so nothing was written: raise maxmemory or wait for entries "
                "to expire"
            )
        detail = _redact(str(exc), self._password) or "no detail"
        return StoreError(f"{self._where}: {action} failed: {type(exc).__name__}: {detail}")

    def _cause(self, exc: RedisError) -> RedisError | None:
        """``exc`` to chain to the :class:`StoreError`, unless its text holds
        the password."""
        if self._password and self._password in str(exc):
            return None
        return exc

    def _as_value(self, reply: object) -> bytes | None:
        if reply is None or isinstance(reply, bytes):
            return reply
        raise StoreError(f"{self._where} answered {type(reply).__name__}, expected bytes")

    async def get(self, key: str) -> bytes | None:
        """The bytes under ``prefix + key``; ``None`` when absent or expired.

        Raises:
            StoreError: Redis is unreachable, timed out or answered an error
                (for example, the key holds another Redis type).
        """
        try:
            reply = await self._client.get(self._name(key))
        except RedisError as exc:
            raise self._failure(f"GET {self._name(key)}", exc) from self._cause(exc)
        return self._as_value(reply)

    async def update(self, key: str, change: Change) -> bytes | None:
        """Apply ``change`` atomically to the value under ``prefix + key``.

        Reads the value and its remaining lifetime under ``WATCH``, calls
        ``change``, and writes the result in ``MULTI``/``EXEC``; when another
        writer changed the key in between, ``EXEC`` does nothing and the
        whole step runs again (``change`` again, on the new value), at most
        ``max_attempts`` times. ``change`` returning ``None`` writes nothing.

        The entry is kept for ``change``'s ``ttl`` (rounded up to whole
        milliseconds, at least 1 ms, at most :data:`MAX_TTL_MS`) or for what
        remained of its previous lifetime, whichever is longer; a key
        without an expiry keeps none.

        Returns:
            The value ``change`` was finally applied to (``None`` when absent).

        Raises:
            StoreFull: Redis is at ``maxmemory`` and refused the write
                (nothing was written).
            StoreError: Redis is unreachable, timed out or answered an error
                (nothing was written); the key kept changing for
                ``max_attempts`` attempts (nothing was written); or the
                connection failed while ``EXEC`` was in flight (the write may
                or may not have happened).
            ValueError: ``change`` returned a NaN ttl. Whatever ``change``
                raises propagates (nothing was written).
        """
        name = self._name(key)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                dropped: BaseException | None = None
                for _ in range(self.max_attempts):
                    try:
                        await pipe.watch(name)
                        current = self._as_value(await pipe.get(name))
                        remaining: int = await pipe.pttl(name)
                    except WatchError as exc:
                        dropped = exc.__context__  # nothing was written yet: read again
                        continue
                    value, ttl = change(current)
                    if value is None:
                        return current
                    px = _expiry_ms(_ttl_ms(ttl), remaining)
                    cast(Callable[[], None], pipe.multi)()  # untyped in redis-py 8.1
                    if px is None:
                        pipe.set(name, value, keepttl=True)
                    else:
                        pipe.set(name, value, px=px)
                    try:
                        await pipe.execute()
                    except WatchError as exc:
                        # redis-py turns a connection failure on a watching pipeline
                        # into a WatchError raised while handling it; once EXEC was
                        # sent, whether Redis ran it is unknown, so it is not retried.
                        lost = exc.__context__
                        if isinstance(lost, _CONNECTION_FAILURES):
                            raise StoreError(
                                f"{self._where}: the connection failed while the update of "
                                f"{name} was being committed; it may or may not have been "
                                f"written ({type(lost).__name__}: "
                                f"{_redact(str(lost), self._password)})"
                            ) from None
                        dropped = None
                        continue
                    return current
        except RedisError as exc:
            raise self._failure(f"update of {name}", exc) from self._cause(exc)
        if isinstance(dropped, _CONNECTION_FAILURES):
            raise StoreError(
                f"{self._where}: gave up updating {name} after {self.max_attempts} attempts: "
                f"the connection kept failing ({type(dropped).__name__}: "
                f"{_redact(str(dropped), self._password)}); nothing was written"
            )
        raise StoreError(
            f"{self._where}: gave up updating {name} after {self.max_attempts} attempts: "
            "other writers kept changing it between the read and the write; nothing was written"
        )

    async def check(self) -> None:
        """Verify that Redis will never evict an entry before it expires.

        Reads ``CONFIG GET maxmemory-policy``. Every policy but
        ``noeviction`` may evict keys that have an expiry, which all replay
        entries do, once Redis reaches ``maxmemory``: a forgotten sighting
        lets a copy of a message be accepted again. When ``CONFIG`` is not
        permitted (managed Redis services often rename or forbid it), logs a
        warning and returns: the operator must make sure of the policy.

        Raises:
            StoreError: the policy may evict and ``allow_eviction`` is false;
                or Redis is unreachable or timed out.
        """
        try:
            reply = await self._client.config_get("maxmemory-policy")
        except ResponseError as exc:
            log.warning(
                "%s does not let trusthop read its maxmemory-policy (%s: %s); the replay "
                "store cannot verify that entries are never evicted early: make sure the "
                "server runs with maxmemory-policy noeviction",
                self._where,
                type(exc).__name__,
                _redact(str(exc), self._password),
            )
            return
        except RedisError as exc:
            raise self._failure("CONFIG GET maxmemory-policy", exc) from self._cause(exc)
        policy = None
        for name, setting in reply.items():
            if _text(name) == "maxmemory-policy":
                policy = _text(setting)
        if policy is None:
            log.warning(
                "%s did not report its maxmemory-policy; the replay store cannot verify that "
                "entries are never evicted early: make sure the server runs with "
                "maxmemory-policy noeviction",
                self._where,
            )
            return
        if policy == _SAFE_POLICY:
            return
        if self.allow_eviction:
            log.warning(
                "%s runs with maxmemory-policy %s: at maxmemory it may evict replay entries "
                "before they expire, letting replayed messages through (allow_eviction=True)",
                self._where,
                policy,
            )
            return
        raise StoreError(
            f"{self._where} runs with maxmemory-policy {policy}, which may evict replay "
            "entries before they expire once it reaches maxmemory; the replay store must "
            "never forget an entry early, or a replayed message is accepted again. Set "
            "maxmemory-policy noeviction on this server (a full Redis then refuses new "
            "entries and trusthop fails closed), or pass allow_eviction=True to accept the risk"
        )


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
