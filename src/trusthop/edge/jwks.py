"""The identity provider's key set: parsing (pure) and fetching (the shell).

:class:`JwksKeySet` turns a JWK Set document into ``kid → JwtKey``, the
algorithm of each key pinned from its type and curve. :class:`JwksClient`
keeps the provider's current set, refetches it when a token names an
unknown key id (at most once per ``min_refetch_interval``, shared by
concurrent callers) or when the set is older than ``max_age``, and keeps the
last good set whenever a fetch fails or returns something unusable.

Which entries a set keeps (an entry is skipped, with the reason recorded in
:attr:`JwksKeySet.skipped`, rather than failing the whole document, so one
exotic key never locks every user out):

* ``kid`` a string of 1 to 256 characters;
* ``kty`` ``RSA`` (2048 to 8192 bits, public exponent odd and below
  ``2**64``), ``EC`` with ``crv`` ``P-256``, or ``OKP`` with ``crv``
  ``Ed25519`` (not of small order); ``oct`` and every other type are skipped,
  so an HMAC secret can never verify anything;
* ``alg``, when present, the one algorithm of that key type (``RS256``,
  ``ES256``, ``EdDSA``); ``use``, when present, ``sig``; ``key_ops``, when
  present, containing ``verify``;
* no private members (``d``, ``p``, ``q``, ``dp``, ``dq``, ``qi``, ``oth``,
  ``k``): a published private key is compromised;
* key material in canonical unpadded base64url.

A document is rejected as a whole (:class:`JwksError`) when it is not an
object with a ``keys`` array, holds a non-object entry, names a key id twice
(which key would be meant is ambiguous), or has no usable key at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from trusthop.canonical import EncodingError, b64url_decode
from trusthop.edge.jwt import (
    EDDSA,
    ES256,
    MAX_KID,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    RS256,
    JwtKey,
)
from trusthop.errors import Reason, TrustError
from trusthop.keys import PublicKey

log = logging.getLogger("trusthop.edge")

MAX_JWKS_BYTES = 1024 * 1024
MAX_JWKS_KEYS = 256
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

Fetch = Callable[[], Awaitable[Mapping[str, Any]]]
"""Returns the parsed JWK Set document; raises on any failure."""


class JwksError(ValueError):
    """A key set document that cannot be used (the message says why)."""


def _b64(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"missing '{name}'")
    try:
        return b64url_decode(value)
    except (EncodingError, UnicodeError) as exc:
        raise ValueError(f"'{name}' is not unpadded base64url") from exc


def _rsa(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    n = int.from_bytes(_b64(jwk, "n"), "big")
    e = int.from_bytes(_b64(jwk, "e"), "big")
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise ValueError(
            f"RSA modulus of {n.bit_length()} bits, outside {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        )
    if e < 3 or e % 2 == 0 or e.bit_length() > 64:
        raise ValueError("RSA public exponent must be odd, at least 3 and below 2**64")
    return rsa.RSAPublicNumbers(e, n).public_key()


def _ec(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("crv") != "P-256":
        raise ValueError(f"EC curve {jwk.get('crv')!r:.40} is not supported (P-256 only)")
    x, y = _b64(jwk, "x"), _b64(jwk, "y")
    if len(x) != 32 or len(y) != 32:
        raise ValueError("P-256 coordinates are 32 bytes each")
    # Raises ValueError for a point that is not on the curve.
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)


def _okp(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    if jwk.get("crv") != "Ed25519":
        raise ValueError(f"OKP curve {jwk.get('crv')!r:.40} is not supported (Ed25519 only)")
    raw = _b64(jwk, "x")
    PublicKey(raw)  # length and small-order checks
    return Ed25519PublicKey.from_public_bytes(raw)


_TYPES: dict[str, tuple[str, Callable[[Mapping[str, Any]], Any]]] = {
    "RSA": (RS256, _rsa),
    "EC": (ES256, _ec),
    "OKP": (EDDSA, _okp),
}


def key_from_jwk(jwk: Mapping[str, Any]) -> JwtKey:
    """One public JWK as a :class:`JwtKey` (rules in the module docstring).

    Raises:
        ValueError: why the entry is not usable (never quoting key material).
    """
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID:
        raise ValueError(f"'kid' must be a string of 1 to {MAX_KID} characters")
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _TYPES:
        raise ValueError(f"key type {kty!r:.40} is not supported")
    private = sorted(_PRIVATE_MEMBERS & jwk.keys())
    if private:
        raise ValueError(f"private key member(s) {private} present")
    use = jwk.get("use", "sig")
    if use != "sig":
        raise ValueError(f"'use' is {use!r:.40}, not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("'key_ops' does not allow 'verify'")
    alg, load = _TYPES[kty]
    declared = jwk.get("alg", alg)
    if declared != alg:
        raise ValueError(f"'alg' {declared!r:.40} does not match a {kty} key (only {alg})")
    return JwtKey(kid, alg, load(jwk))


@dataclass(frozen=True)
class JwksKeySet:
    """An immutable map from key id to :class:`JwtKey`, parsed from a JWK Set.

    ``skipped`` lists, for each entry left out, ``"keys[i] (kid ...): why"``.
    """

    keys: Mapping[str, JwtKey] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @classmethod
    def of(cls, keys: list[JwtKey]) -> JwksKeySet:
        """A set of keys already loaded.

        Raises:
            JwksError: two keys with one key id.
        """
        out: dict[str, JwtKey] = {}
        for key in keys:
            if key.kid in out:
                raise JwksError(f"duplicate key id {key.kid!r:.80}")
            out[key.kid] = key
        return cls(MappingProxyType(out))

    @classmethod
    def parse(cls, document: Mapping[str, Any]) -> JwksKeySet:
        """Read a parsed JWK Set document (see the module docstring).

        Raises:
            JwksError: not an object with a ``keys`` array of objects (at
                most 256), a duplicate key id, or no usable key.
        """
        if not isinstance(document, Mapping):
            raise JwksError("a key set is a JSON object")
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise JwksError("a key set is a JSON object with a 'keys' array")
        if len(entries) > MAX_JWKS_KEYS:
            raise JwksError(f"a key set holds at most {MAX_JWKS_KEYS} keys")
        seen: set[str] = set()
        keys: dict[str, JwtKey] = {}
        skipped: list[str] = []
        for index, jwk in enumerate(entries):
            if not isinstance(jwk, Mapping):
                raise JwksError(f"keys[{index}] is not a JSON object")
            kid = jwk.get("kid")
            if isinstance(kid, str):
                if kid in seen:
                    raise JwksError(f"keys[{index}]: duplicate key id {kid!r:.80}")
                seen.add(kid)
            try:
                key = key_from_jwk(jwk)
            except ValueError as exc:
                skipped.append(f"keys[{index}] (kid {kid!r:.80}): {exc}")
                continue
            keys[key.kid] = key
        if not keys:
            raise JwksError(f"no usable key ({'; '.join(skipped)[:400] or 'empty'})")
        return cls(MappingProxyType(keys), tuple(skipped))

    def get(self, kid: str) -> JwtKey | None:
        return self.keys.get(kid)

    def key(self, kid: str) -> JwtKey:
        """The key for ``kid``.

        Raises:
            TrustError(invalid_token): no such key.
        """
        found = self.keys.get(kid)
        if found is None:
            raise TrustError(
                Reason.INVALID_TOKEN, f"key id {kid!r:.80} is not in the provider's key set"
            )
        return found

    def __contains__(self, kid: object) -> bool:
        return kid in self.keys

    def __len__(self) -> int:
        return len(self.keys)


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate member {name!r:.40}")
        out[name] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_jwks_json(data: bytes) -> Mapping[str, Any]:
    """Strict JSON (UTF-8, no duplicate members, no ``NaN``) for a JWK Set.

    Raises:
        JwksError: anything else, or a document that is not an object.
    """
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_unique_members,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JwksError(f"the key set is not strict JSON ({type(exc).__name__})") from exc
    if not isinstance(value, dict):
        raise JwksError("a key set is a JSON object")
    return value


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never from https down to http."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        old = urllib.parse.urlsplit(req.full_url).scheme.lower()
        new = urllib.parse.urlsplit(newurl).scheme.lower()
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise urllib.error.URLError(f"refusing a redirect from {old} to {new!r:.20}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL with a host.

    Raises:
        ValueError: another scheme (``file:``, ``ftp:``...) or no host.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("the key set URL must be an http:// or https:// URL with a host")
    return url


def url_fetcher(
    url: str,
    *,
    timeout: float = 5.0,
    max_bytes: int = MAX_JWKS_BYTES,
    ssl_context: Any = None,
) -> Fetch:
    """The default fetcher: stdlib ``urllib`` in a worker thread.

    GET ``url`` (http or https; redirects only to http(s) and never from
    https to http), status 200, at most ``max_bytes`` of body, strict JSON
    object. ``ssl_context`` (an :class:`ssl.SSLContext`) replaces the default
    certificate verification for https. Proxy environment variables apply
    as usual for ``urllib``.

    Raises:
        ValueError: (at once) a URL that :func:`check_url` refuses.
    """
    check_url(url)
    handlers: list[urllib.request.BaseHandler] = [_SameSchemeRedirects()]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers)

    def get() -> Mapping[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked above
            url, headers={"Accept": "application/jwk-set+json, application/json"}
        )
        with opener.open(request, timeout=timeout) as response:
            if response.status != 200:
                raise JwksError(f"HTTP status {response.status}")
            data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise JwksError(f"the key set is larger than {max_bytes} bytes")
        return parse_jwks_json(data)

    async def fetch() -> Mapping[str, Any]:
        return await asyncio.to_thread(get)

    return fetch


class JwksClient:
    """The provider's key set, fetched on demand and kept while it is good.

    Args:
        source: the JWKS URL (http or https) fetched with :func:`url_fetcher`,
            or an async callable returning the parsed document (any HTTP
            client; it should raise on failure).
        min_refetch_interval: seconds between two fetch attempts, whether
            they succeeded or not; an unknown key id inside this interval is
            ``invalid_token`` without a fetch (a flood of made-up key ids
            costs the provider one request per interval).
        max_age: seconds after which a good set is refetched at the next
            :meth:`key` call even for a known key id, so a key the provider
            removed (rotated out, compromised) stops verifying; ``None``
            never refreshes a known key. If that fetch fails the old set
            stays in use.
        timeout: seconds a fetch may take (also the socket timeout of the
            default fetcher).
        max_bytes: largest accepted response body (default fetcher only).
        clock: monotonic seconds, for the interval and age (injectable).
        initial: a set to start with (no fetch until it misses or ages).
        ssl_context: for the default fetcher's https connections.

    Use one client per event loop: concurrent callers share the one fetch in
    flight. Failures are logged as warnings on ``trusthop.edge``.
    """

    def __init__(
        self,
        source: str | Fetch,
        *,
        min_refetch_interval: float = 30.0,
        max_age: float | None = 3600.0,
        timeout: float = 5.0,
        max_bytes: int = MAX_JWKS_BYTES,
        clock: Callable[[], float] = time.monotonic,
        initial: JwksKeySet | None = None,
        ssl_context: Any = None,
    ) -> None:
        if not (math.isfinite(min_refetch_interval) and min_refetch_interval >= 0):
            raise ValueError("min_refetch_interval must be a finite number >= 0")
        if max_age is not None and not (math.isfinite(max_age) and max_age > 0):
            raise ValueError("max_age must be a finite number > 0, or None")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a finite number > 0")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if isinstance(source, str):
            self._fetch = url_fetcher(
                source, timeout=timeout, max_bytes=max_bytes, ssl_context=ssl_context
            )
            self.source = source
        else:
            self._fetch = source
            self.source = getattr(source, "__qualname__", type(source).__qualname__)
        self.min_refetch_interval = float(min_refetch_interval)
        self.max_age = max_age
        self.timeout = float(timeout)
        self._clock = clock
        self._keys = initial
        self._fetched_at: float | None = clock() if initial is not None else None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self.fetches = 0
        """Fetch attempts so far (for metrics and tests)."""

    @property
    def keys(self) -> JwksKeySet | None:
        """The last good key set (``None`` before the first good fetch)."""
        return self._keys

    def _may_fetch(self) -> bool:
        last = self._attempted_at
        return last is None or self._clock() - last >= self.min_refetch_interval

    def _stale(self) -> bool:
        if self._keys is None or self.max_age is None or self._fetched_at is None:
            return False
        return self._clock() - self._fetched_at >= self.max_age

    async def _fetch_once(self) -> bool:
        self.fetches += 1
        try:
            async with asyncio.timeout(self.timeout):
                document = await self._fetch()
            keys = JwksKeySet.parse(document)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            kept = "keeping the last good key set" if self._keys else "no key set yet"
            log.warning(
                "JWKS fetch from %s failed (%s: %.200s); %s",
                self.source,
                type(exc).__name__,
                exc,
                kept,
            )
            return False
        for why in keys.skipped:
            log.warning("JWKS from %s: skipped %.300s", self.source, why)
        self._keys = keys
        self._fetched_at = self._clock()
        return True

    async def refresh(self, *, force: bool = False) -> bool:
        """Fetch the set now (sharing a fetch in flight); True if a fetch succeeded.

        Without ``force`` the rate limit applies and ``False`` means no
        fetch was allowed. Never raises for a failed fetch.
        """
        task = self._inflight
        if task is None:
            if not force and not self._may_fetch():
                return False
            self._attempted_at = self._clock()
            task = asyncio.ensure_future(self._fetch_once())
            self._inflight = task
            task.add_done_callback(self._clear_inflight)
        # A cancelled caller must not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    def _clear_inflight(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def key(self, kid: str) -> JwtKey:
        """The provider's key for ``kid``.

        A known key id is answered from the current set (refreshed first
        when older than ``max_age`` and the rate limit allows). An unknown
        one triggers one fetch unless a fetch was attempted less than
        ``min_refetch_interval`` ago; concurrent callers share the fetch.

        Raises:
            TrustError(invalid_token): the key id is unknown after that, or
                no key set could ever be fetched.
        """
        if self._stale():
            await self.refresh()
        keys = self._keys
        if keys is not None and kid in keys:
            return keys.key(kid)
        await self.refresh()
        keys = self._keys
        if keys is None:
            raise TrustError(
                Reason.INVALID_TOKEN,
                "the identity provider's key set could not be fetched",
            )
        return keys.key(kid)
