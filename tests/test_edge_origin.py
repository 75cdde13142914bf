"""The edge shell: JwksClient against a real local HTTP server, and
origin_from_token end to end (mint, seal, encode for Kafka and AMQP, verify),
including the proof that the token never leaves the edge."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import logging
import math
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from chainkit import EDGE, EDGE_ID
from cloudevents.core.v1.event import CloudEvent
from test_edge_kit import (
    ALGS,
    AUDIENCE,
    EC_KEY,
    ISSUER,
    KEYSET,
    KIDS,
    NOW,
    RSA_KEY,
    SUBJECT,
    claims,
    expect_rejected,
    jwk_of,
    jwks_document,
    make_token,
    pyjwt_token,
)

from trusthop.bindings import decode_amqp, decode_kafka, encode_amqp, encode_kafka
from trusthop.bundle import TrustBundle
from trusthop.canonical import b64url_decode
from trusthop.chain import Chain, OriginRing
from trusthop.edge import (
    JwksClient,
    origin_from_token,
    origin_from_token_sync,
    origin_from_verified,
    verify_jwt,
)
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.pipeline import ChainSigner, ChainVerifier
from trusthop.rings import K_TXN, MAX_SCOPE_ENTRIES, MAX_TEXT, decode_origin
from trusthop.sign import hash_credential

R = Reason
INTERVAL = 30.0
ROTATED = "rsa-2"
ROTATED_KEY = RSA_KEY  # the same key material under a new kid is enough


# -- a local identity provider ------------------------------------------------------


class IdP:
    """A JWKS endpoint on 127.0.0.1 whose answer a test can change at any time."""

    def __init__(self) -> None:
        self.body: bytes = json.dumps(jwks_document()).encode()
        self.status = 200
        self.location: str | None = None
        self.delay = 0.0
        self.hits = 0
        self._lock = threading.Lock()
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with idp._lock:
                    idp.hits += 1
                    body, status, location, delay = idp.body, idp.status, idp.location, idp.delay
                if delay:
                    threading.Event().wait(delay)
                if self.path == "/moved" or location is None:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        self.up = True

    def serve(self, document: Any) -> None:
        with self._lock:
            self.body = document if isinstance(document, bytes) else json.dumps(document).encode()
            self.status = 200

    def rotate_in(self, kid: str, key: Any = ROTATED_KEY) -> None:
        self.serve(jwks_document(jwk_of(key, kid, alg="RS256")))

    def stop(self) -> None:
        if self.up:
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(5)
            self.up = False


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP()
    yield server
    server.stop()


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def client(idp: IdP, clock: Clock, **kw: Any) -> JwksClient:
    return JwksClient(idp.url, min_refetch_interval=INTERVAL, clock=clock, **kw)


async def mint(token: str, jwks: JwksClient, **kw: Any) -> OriginRing:
    args: dict[str, Any] = {
        "jwks": jwks,
        "identity": EDGE,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "now": NOW,
    }
    return await origin_from_token(token, **(args | kw))


async def rejected(call: Awaitable[Any], token: str, reason: Reason = R.INVALID_TOKEN) -> str:
    try:
        await call
    except TrustError as error:
        checked = expect_rejected(_raiser(error), token, reason)
        return checked.message
    raise AssertionError("no TrustError was raised")


def _raiser(error: BaseException) -> Callable[[], None]:
    def again() -> None:
        raise error

    return again


# -- JwksClient: fetching, rotation, rate limit ---------------------------------------


async def test_first_use_fetches_then_answers_from_memory(idp: IdP, clock: Clock) -> None:
    jwks = client(idp, clock)
    assert jwks.keys is None
    assert (await jwks.key("rsa-1")).alg == "RS256"
    assert (await jwks.key("ec-1")).alg == "ES256"
    assert (await jwks.key("ed-1")).alg == "EdDSA"
    assert idp.hits == 1
    assert jwks.fetches == 1


async def test_rotation_unknown_kid_triggers_one_refetch_then_rate_limit(
    idp: IdP, clock: Clock
) -> None:
    jwks = client(idp, clock)
    await mint(make_token(), jwks)
    assert idp.hits == 1
    clock.advance(INTERVAL + 1)  # the key set was fetched a while ago

    idp.rotate_in(ROTATED)
    ring = await mint(make_token(kid=ROTATED, key=ROTATED_KEY), jwks)
    assert ring.subject == SUBJECT
    assert idp.hits == 2  # exactly one refetch

    # Another unknown kid inside the interval: no fetch, invalid_token.
    idp.rotate_in("rsa-3")
    clock.advance(INTERVAL - 1)
    token = make_token(kid="rsa-3")
    await rejected(mint(token, jwks), token)
    assert idp.hits == 2
    # The rate limit covers every unknown kid, not only the one seen first.
    token_4 = make_token(kid="rsa-4")
    await rejected(mint(token_4, jwks), token_4)
    assert idp.hits == 2

    clock.advance(1)  # now the interval is over: one more fetch, and rsa-3 is there
    assert (await mint(token, jwks)).subject == SUBJECT
    assert idp.hits == 3


async def test_rotated_out_key_is_gone_after_refetch(idp: IdP, clock: Clock) -> None:
    jwks = client(idp, clock)
    await jwks.key("rsa-1")
    idp.serve({"keys": [jwk_of(EC_KEY, "ec-2")]})  # rsa-1 rotated out
    clock.advance(INTERVAL)
    await jwks.key("ec-2")
    token = make_token()
    await rejected(mint(token, jwks), token)


async def test_max_age_refreshes_a_known_key_so_removed_keys_stop(idp: IdP, clock: Clock) -> None:
    jwks = client(idp, clock, max_age=600.0)
    token = make_token()
    await mint(token, jwks)
    idp.serve({"keys": [jwk_of(EC_KEY, "ec-1", alg="ES256")]})  # rsa-1 withdrawn
    clock.advance(599)
    await mint(token, jwks)  # still fresh: no fetch
    assert idp.hits == 1
    clock.advance(1)
    await rejected(mint(token, jwks), token)
    assert idp.hits == 2


async def test_server_down_keeps_the_last_good_set(
    idp: IdP, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    jwks = client(idp, clock, max_age=600.0, timeout=2.0)
    token = make_token(alg="ES256")
    await mint(token, jwks)
    idp.stop()
    clock.advance(3600)  # stale and outside the interval: a fetch is tried and fails
    with caplog.at_level(logging.WARNING, logger="trusthop.edge"):
        assert (await mint(token, jwks)).subject == SUBJECT
    assert jwks.fetches == 2
    assert "keeping the last good key set" in caplog.text
    for alg in ALGS:
        assert (await mint(make_token(alg=alg), jwks)).subject == SUBJECT
    unknown = make_token(kid="rsa-9")
    clock.advance(INTERVAL)
    await rejected(mint(unknown, jwks), unknown)


async def test_provider_unreachable_from_the_start_fails_closed(idp: IdP, clock: Clock) -> None:
    url = idp.url
    idp.stop()
    jwks = JwksClient(url, min_refetch_interval=INTERVAL, clock=clock, timeout=2.0)
    token = make_token()
    assert "could not be fetched" in await rejected(mint(token, jwks), token)
    await rejected(mint(token, jwks), token)  # rate-limited: no second attempt
    assert jwks.fetches == 1


# A good key set with the new kid, but over the 1 MiB bound: refused for its size alone.
_OVERSIZE = json.dumps(
    jwks_document(jwk_of(RSA_KEY, "rsa-2", alg="RS256")) | {"pad": "x" * (1024 * 1024)}
).encode()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 200),
        (b"<html><body>maintenance</body></html>", 200),
        (b"[]", 200),
        (b'{"keys": "x"}', 200),
        (b'{"keys": []}', 200),
        (b'{"keys": [{"kty": "oct", "kid": "rsa-2", "k": "c2VjcmV0"}]}', 200),
        (b'{"keys": [], "keys": []}', 200),
        (b'{"keys": [{"kty": "RSA", "kid": "a"}, NaN]}', 200),
        (b"\xff\xfe", 200),
        (b"", 200),
        (json.dumps(jwks_document(jwk_of(RSA_KEY, "rsa-2"))).encode(), 500),
        (json.dumps(jwks_document(jwk_of(RSA_KEY, "rsa-2"))).encode(), 404),
        (json.dumps(jwks_document(jwk_of(RSA_KEY, "rsa-2"))).encode(), 204),
        (_OVERSIZE, 200),
    ],
    ids=[
        "not-json",
        "html",
        "array",
        "keys-not-list",
        "no-keys",
        "only-oct",
        "duplicate-member",
        "nan",
        "not-utf8",
        "empty",
        "status-500",
        "status-404",
        "status-204",
        "over-1MiB",
    ],
)
async def test_garbage_keeps_the_last_good_set(
    idp: IdP, clock: Clock, caplog: pytest.LogCaptureFixture, body: bytes, status: int
) -> None:
    jwks = client(idp, clock)
    await jwks.key("rsa-1")
    with idp._lock:
        idp.body, idp.status = body, status
    clock.advance(INTERVAL)
    token = make_token(kid="rsa-2")
    with caplog.at_level(logging.WARNING, logger="trusthop.edge"):
        await rejected(mint(token, jwks), token)
    assert idp.hits == 2
    assert "JWKS fetch" in caplog.text
    assert "keeping the last good key set" in caplog.text
    assert jwks.keys is not None and set(jwks.keys.keys) == set(KIDS.values())
    assert (await mint(make_token(), jwks)).subject == SUBJECT


async def test_response_size_bound_is_exact(idp: IdP, clock: Clock) -> None:
    size = len(idp.body)
    small = client(idp, clock, max_bytes=size - 1)
    token = make_token()
    await rejected(mint(token, small), token)
    exact = client(idp, clock, max_bytes=size)
    assert (await mint(token, exact)).subject == SUBJECT


async def test_concurrent_callers_share_one_fetch(idp: IdP, clock: Clock) -> None:
    jwks = client(idp, clock)
    await jwks.key("rsa-1")
    clock.advance(INTERVAL)
    idp.rotate_in(ROTATED)
    idp.delay = 0.2
    keys = await asyncio.gather(*(jwks.key(ROTATED) for _ in range(20)))
    assert {k.kid for k in keys} == {ROTATED}
    assert idp.hits == 2


async def test_concurrent_callers_for_a_missing_kid_share_one_fetch(idp: IdP, clock: Clock) -> None:
    jwks = client(idp, clock)
    idp.delay = 0.1
    results = await asyncio.gather(
        *(jwks.key(f"nope-{i}") for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, TrustError) and r.reason is R.INVALID_TOKEN for r in results)
    assert idp.hits == 1


async def test_concurrent_first_use_tokens_share_one_fetch(idp: IdP, clock: Clock) -> None:
    jwks = client(idp, clock)
    idp.delay = 0.1
    tokens = [make_token(alg=ALGS[i % 3]) for i in range(20)]
    rings = await asyncio.gather(*(mint(t, jwks) for t in tokens))
    assert all(r.subject == SUBJECT for r in rings)
    assert idp.hits == 1


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("file:///etc/passwd", "not allowed"),  # refused by urllib itself
        ("ftp://127.0.0.1/jwks.json", "refusing a redirect"),  # refused by ours
    ],
)
async def test_redirect_to_another_scheme_is_refused(
    idp: IdP, clock: Clock, caplog: pytest.LogCaptureFixture, location: str, why: str
) -> None:
    jwks = client(idp, clock)
    await jwks.key("rsa-1")
    idp.location = location
    clock.advance(INTERVAL)
    with caplog.at_level(logging.WARNING, logger="trusthop.edge"):
        token = make_token(kid="rsa-2")
        await rejected(mint(token, jwks), token)
    assert why in caplog.text
    assert "keeping the last good key set" in caplog.text
    assert (await jwks.key("rsa-1")).kid == "rsa-1"


async def test_redirect_within_http_is_followed(idp: IdP, clock: Clock) -> None:
    idp.location = idp.url.replace("/jwks.json", "/moved")
    jwks = client(idp, clock)
    assert (await jwks.key("ed-1")).alg == "EdDSA"
    assert idp.hits == 2


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://idp.example.com/jwks.json",
        "idp.example.com/jwks.json",
        "http:///jwks.json",
        "gopher://idp.example.com/",
        "",
    ],
)
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ValueError):
        JwksClient(url)


@pytest.mark.parametrize(
    "kw",
    [
        {"min_refetch_interval": -1},
        {"min_refetch_interval": math.nan},
        {"min_refetch_interval": math.inf},
        {"timeout": 0},
        {"timeout": math.nan},
        {"max_age": 0},
        {"max_age": math.nan},
        {"max_bytes": 0},
    ],
)
def test_client_configuration_is_checked(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        JwksClient("https://idp.example.com/jwks.json", **kw)


# -- JwksClient with an injected fetcher ---------------------------------------------


@dataclass
class FakeFetch:
    documents: list[Any] = field(default_factory=lambda: [jwks_document()])
    calls: int = 0
    gate: asyncio.Event | None = None

    async def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        document = self.documents[min(self.calls, len(self.documents)) - 1]
        if isinstance(document, BaseException):
            raise document
        return document  # type: ignore[no-any-return]


async def test_injected_fetcher(clock: Clock) -> None:
    fetch = FakeFetch([jwks_document(), OSError("connection reset")])
    jwks = JwksClient(fetch, min_refetch_interval=INTERVAL, clock=clock)
    assert (await mint(make_token(), jwks)).subject == SUBJECT
    clock.advance(INTERVAL)
    token = make_token(kid="rsa-2")
    await rejected(mint(token, jwks), token)
    assert fetch.calls == 2
    assert (await mint(make_token(alg="EdDSA"), jwks)).subject == SUBJECT


async def test_a_hanging_fetch_times_out_and_keeps_the_last_good_set(clock: Clock) -> None:
    fetch = FakeFetch()
    jwks = JwksClient(fetch, min_refetch_interval=INTERVAL, clock=clock, timeout=0.05)
    await jwks.key("rsa-1")
    fetch.gate = asyncio.Event()  # never set: the next fetch hangs
    clock.advance(INTERVAL)
    token = make_token(kid="rsa-2")
    await rejected(mint(token, jwks), token)
    assert (await jwks.key("rsa-1")).kid == "rsa-1"


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(clock: Clock) -> None:
    fetch = FakeFetch([jwks_document(jwk_of(RSA_KEY, ROTATED, alg="RS256"))])
    fetch.gate = asyncio.Event()
    jwks = JwksClient(fetch, min_refetch_interval=INTERVAL, clock=clock)
    first = asyncio.ensure_future(jwks.key(ROTATED))
    second = asyncio.ensure_future(jwks.key(ROTATED))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    fetch.gate.set()
    assert (await second).kid == ROTATED
    assert first.cancelled()
    assert fetch.calls == 1


async def test_initial_key_set_needs_no_fetch(clock: Clock) -> None:
    fetch = FakeFetch()
    jwks = JwksClient(fetch, clock=clock, initial=KEYSET)
    assert (await mint(pyjwt_token(alg="ES256"), jwks)).subject == SUBJECT
    assert fetch.calls == 0


# -- origin_from_token: what the ring holds --------------------------------------------


@pytest.fixture
def jwks(idp: IdP, clock: Clock) -> JwksClient:
    return client(idp, clock)


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("maker", ["own", "pyjwt"])
async def test_origin_from_token(jwks: JwksClient, alg: str, maker: str) -> None:
    payload = claims(acr="urn:example:loa:2", amr=["pwd", "hwk"])
    token = make_token(payload, alg=alg) if maker == "own" else pyjwt_token(payload, alg=alg)
    ring = await mint(token, jwks, transaction_id="txn-42")
    assert ring.actor == EDGE_ID
    assert ring.subject == SUBJECT
    assert ring.issuer == ISSUER
    assert ring.credential_hash == hash_credential(token)
    assert ring.credential_hash != hash_credential(make_token(alg=alg))
    assert ring.transaction_id == "txn-42"
    assert ring.acr == "urn:example:loa:2"
    assert ring.amr == ("pwd", "hwk")
    assert ring.scope == frozenset({"orders:read", "orders:write"})
    assert ring.iat == int(NOW)
    assert ring.exp == int(NOW) + 600  # capped by the token's exp
    assert ring.trust_domain == "prod.example.com"  # the actor's: v2 has no field for it
    assert ring.key_tag == EDGE.key_tag and ring.x5c is None
    assert EDGE.key.public_key.verify(ring.signature, Chain(ring).signing_input(0))


async def test_missing_acr_and_amr_are_fine(jwks: JwksClient) -> None:
    ring = await mint(make_token(), jwks)
    assert ring.acr is None
    assert ring.amr is None
    # v2 refuses a chain of an origin alone: the ring itself round-trips.
    assert decode_origin(Chain(ring).ring_bytes[0]) == ring


@pytest.mark.parametrize(
    "txn",
    [
        None,  # a fresh UUID4: travels as 16 bytes
        "0f8c2f4e-1b2a-4c3d-9e8f-0123456789ab",  # canonical UUID: 16 bytes
        "0F8C2F4E-1B2A-4C3D-9E8F-0123456789AB",  # not canonical: text, kept as given
        "txn-42",
    ],
)
async def test_transaction_ids_round_trip_in_their_wire_form(
    jwks: JwksClient, txn: str | None
) -> None:
    ring = await mint(make_token(), jwks, transaction_id=txn)
    raw = Chain(ring).ring_bytes[0]
    body = msgpack.unpackb(raw[64:], strict_map_key=False)
    as_bytes = txn is None or (txn == txn.lower() and txn.count("-") == 4)
    assert isinstance(body[K_TXN], bytes) is as_bytes
    if as_bytes:
        assert str(uuid.UUID(bytes=body[K_TXN])) == ring.transaction_id
    assert decode_origin(raw).transaction_id == ring.transaction_id == (txn or ring.transaction_id)


async def test_claims_at_the_token_limits_fit_a_ring(jwks: JwksClient) -> None:
    """What the token verifier accepts at its limits, the v2 decoder accepts:
    the edge never mints an origin that every consumer would refuse."""
    at_limits = claims(
        sub="s" * MAX_TEXT,
        acr="a" * MAX_TEXT,
        amr=[f"m{i:02d}" + "x" * 61 for i in range(16)],
        scope=" ".join(f"{i:02d}" + "y" * 58 for i in range(MAX_SCOPE_ENTRIES)),
    )
    long_entries = claims(scope=" ".join(f"{i:02d}" + "z" * 254 for i in range(8)))
    for payload in (at_limits, long_entries):
        ring = await mint(make_token(payload), jwks)
        assert decode_origin(Chain(ring).ring_bytes[0]) == ring
    assert len(ring.scope) == 8 and all(len(s) == 256 for s in ring.scope)


async def test_transaction_id_generated_when_absent(jwks: JwksClient) -> None:
    token = make_token()
    first, second = await mint(token, jwks), await mint(token, jwks)
    assert uuid.UUID(first.transaction_id).version == 4
    assert first.transaction_id != second.transaction_id


@pytest.mark.parametrize(
    ("token_scope", "requested", "granted"),
    [
        ("a b c", ["b", "c", "d"], {"b", "c"}),
        ("a b c", None, {"a", "b", "c"}),
        ("a b c", ("c",), {"c"}),
        ("a b c", {"a", "b", "c", "z"}, {"a", "b", "c"}),
    ],
)
async def test_scope_narrowing(
    jwks: JwksClient, token_scope: str, requested: Any, granted: set[str]
) -> None:
    ring = await mint(make_token(claims(scope=token_scope)), jwks, requested_scope=requested)
    assert ring.scope == frozenset(granted)


@pytest.mark.parametrize(
    ("token_scope", "requested"),
    [("a b", ["c"]), (None, ["a"]), (None, None), ("", None), ("a", [])],
)
async def test_empty_grant_is_insufficient_scope(
    jwks: JwksClient, token_scope: str | None, requested: Any
) -> None:
    token = make_token(claims(scope=token_scope) if token_scope is not None else claims(scope=None))
    await rejected(mint(token, jwks, requested_scope=requested), token, R.INSUFFICIENT_SCOPE)
    ring = await mint(token, jwks, requested_scope=requested, allow_empty_scope=True)
    assert ring.scope == frozenset()


async def test_scope_arguments_are_checked(jwks: JwksClient) -> None:
    token = make_token()
    with pytest.raises(TypeError):
        await mint(token, jwks, requested_scope="orders:read")
    with pytest.raises(ValueError):
        await mint(token, jwks, requested_scope=["orders:read", ""])


async def test_more_scopes_than_a_ring_holds(jwks: JwksClient) -> None:
    many = " ".join(f"s{i}" for i in range(65))
    token = make_token(claims(scope=many))
    with pytest.raises(ValueError, match="requested_scope"):
        await mint(token, jwks)
    assert (await mint(token, jwks, requested_scope=["s1", "s64"])).scope == {"s1", "s64"}


@pytest.mark.parametrize(
    ("exp", "ttl", "ring_exp"),
    [
        (NOW + 600, 3600, int(NOW) + 600),
        (NOW + 600, 60, int(NOW) + 60),
        (NOW + 600.9, 3600, int(NOW) + 600),
        (NOW + 1, 3600, int(NOW) + 1),
        (NOW + 10 * 86400, None, int(NOW) + 86400),
    ],
)
async def test_ttl_capped_by_the_token(
    jwks: JwksClient, exp: float, ttl: int | None, ring_exp: int
) -> None:
    token = make_token(claims(exp=exp))
    ring = await mint(token, jwks) if ttl is None else await mint(token, jwks, ttl=ttl)
    assert ring.exp == ring_exp
    assert ring.exp <= exp


@pytest.mark.parametrize("exp", [NOW, NOW - 30, NOW + 0.5])
async def test_token_alive_only_thanks_to_leeway_gives_expired(
    jwks: JwksClient, exp: float
) -> None:
    token = make_token(claims(exp=exp, nbf=NOW - 100, iat=NOW - 100))
    assert verify_jwt(token, KEYSET.key, issuer=ISSUER, audience=AUDIENCE, now=NOW).subject
    await rejected(mint(token, jwks), token, R.EXPIRED)


async def test_expired_and_not_yet_valid_tokens(jwks: JwksClient) -> None:
    expired = make_token(claims(exp=NOW - 3600, nbf=NOW - 7200, iat=NOW - 7200))
    await rejected(mint(expired, jwks), expired, R.EXPIRED)
    early = make_token(claims(nbf=NOW + 3600))
    await rejected(mint(early, jwks), early, R.NOT_YET_VALID)


@pytest.mark.parametrize(
    "kw",
    [
        {"leeway": 301},
        {"leeway": -1},
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": True},
        {"ttl": 1.5},
        {"issuer": ""},
        {"audience": ""},
    ],
)
async def test_bad_arguments_fail_before_the_jwks_is_touched(
    idp: IdP, jwks: JwksClient, kw: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await mint(make_token(), jwks, **kw)
    assert idp.hits == 0


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        make_token(header={"alg": "none", "kid": "zzz"}, signature=b""),
        make_token(header={"alg": "HS256", "kid": "zzz"}, key=b"k", sign_as="HS256"),
        make_token(header={"alg": "RS256", "kid": "zzz", "jku": "https://attacker.example/"}),
    ],
    ids=["garbage", "abc", "none", "hs256", "jku"],
)
async def test_malformed_tokens_never_trigger_a_fetch(
    idp: IdP, jwks: JwksClient, token: str
) -> None:
    await rejected(mint(token, jwks), token)
    assert idp.hits == 0


async def test_forged_signature_fails_after_the_key_lookup(idp: IdP, jwks: JwksClient) -> None:
    token = make_token(claims(sub="user:root"), key=EC_KEY, sign_as="ES256", alg="RS256")
    await rejected(mint(token, jwks), token)
    assert idp.hits == 1


async def test_wrong_issuer_and_audience(jwks: JwksClient) -> None:
    token = make_token()
    await rejected(mint(token, jwks, issuer="https://idp.example.org"), token)
    await rejected(mint(token, jwks, audience="https://other.example"), token)


def test_sync_variant() -> None:
    token = make_token(claims(acr="1"), alg="EdDSA")
    ring = origin_from_token_sync(
        token,
        keys=KEYSET,
        identity=EDGE,
        issuer=ISSUER,
        audience=AUDIENCE,
        requested_scope=["orders:read"],
        transaction_id="t-1",
        ttl=120,
        now=NOW,
    )
    assert (ring.subject, ring.acr, ring.scope, ring.exp) == (
        SUBJECT,
        "1",
        frozenset({"orders:read"}),
        int(NOW) + 120,
    )
    assert ring.credential_hash == hash_credential(token)
    unknown = make_token(kid="rsa-7")
    expect_rejected(
        lambda: origin_from_token_sync(
            unknown, keys=KEYSET, identity=EDGE, issuer=ISSUER, audience=AUDIENCE, now=NOW
        ),
        unknown,
    )


def test_origin_from_verified_refuses_another_token() -> None:
    token = make_token()
    verified = verify_jwt(token, KEYSET.key, issuer=ISSUER, audience=AUDIENCE, now=NOW)
    with pytest.raises(ValueError):
        origin_from_verified(verified, make_token(alg="ES256"), identity=EDGE, now=NOW)
    ring = origin_from_verified(verified, token, identity=EDGE, now=NOW)
    assert ring.credential_hash == verified.token_hash


# -- the token never leaves the edge ---------------------------------------------------


_B64ISH = re.compile(rb"[A-Za-z0-9+/_=-]{8,}")


def _decodings(blob: bytes) -> list[bytes]:
    """Every base64 / base64url reading of every long enough run in ``blob``
    (all four alignments), so an encoded copy cannot hide."""
    out = []
    for run in _B64ISH.findall(blob):
        run = run.replace(b"=", b"").replace(b"+", b"-").replace(b"/", b"_")
        for shift in range(4):
            chunk = run[shift:]
            if len(chunk) % 4 == 1:
                chunk = chunk[:-1]
            if chunk:
                out.append(base64.urlsafe_b64decode(chunk + b"=" * (-len(chunk) % 4)))
    return out


def _leaves(value: Any) -> Iterator[bytes]:
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, str):
        yield value.encode("utf-8", "surrogatepass")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(k)
            yield from _leaves(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v)


def haystacks(messages: list[tuple[Any, bytes | None]]) -> list[bytes]:
    """All bytes of every header (name and value) and body, their base64
    decodings, and every string or bytes inside any decoded trust chain."""
    raw: list[bytes] = []
    for headers, body in messages:
        pairs = headers.items() if isinstance(headers, dict) else headers
        for name, value in pairs:
            raw.append(name.encode())
            raw.append(value if isinstance(value, bytes) else str(value).encode())
        raw.append(body or b"")
    out = list(raw)
    for blob in raw:
        decoded = _decodings(blob)
        out.extend(decoded)
        # A v2 chain is "2." then each ring in base64url, dot-separated; a
        # ring is a 64-byte signature then a msgpack body.
        for segment in re.findall(rb"[A-Za-z0-9_-]{40,}", blob):
            try:
                ring = b64url_decode(segment.decode())
                value = msgpack.unpackb(ring[64:], strict_map_key=False)
            except Exception:
                continue
            out.extend([ring, ring[:64], *_leaves(value)])
    return out


def needles(token: str) -> dict[str, bytes]:
    head, payload, signature = token.split(".")
    raw_signature = b64url_decode(signature)
    return {
        "token": token.encode(),
        "header segment": head.encode(),
        "payload segment": payload.encode(),
        "signature segment": signature.encode(),
        "signature segment (start)": signature[:24].encode(),
        "decoded header": b64url_decode(head),
        "decoded payload": b64url_decode(payload),
        "decoded signature": raw_signature,
        "decoded signature (start)": raw_signature[:24],
        "decoded signature (end)": raw_signature[-24:],
    }


def leaks(token: str, messages: list[tuple[Any, bytes | None]]) -> list[str]:
    stacks = haystacks(messages)
    return [name for name, needle in needles(token).items() if any(needle in h for h in stacks)]


def order_event(**extra: Any) -> CloudEvent:
    return CloudEvent(
        {"id": "o-1", "source": "/gateway", "type": "order.created", **extra},
        {"order": 1, "sku": "A-7"},
    )


def all_encodings(wire_kafka: WireEvent, wire_amqp: WireEvent) -> list[tuple[Any, bytes | None]]:
    messages: list[tuple[Any, bytes | None]] = []
    for structured in (False, True):
        messages.append(encode_kafka(wire_kafka, structured=structured))
        headers, body, content_type = encode_amqp(wire_amqp, structured=structured)
        messages.append(({**headers, "content_type": content_type or ""}, body))
    return messages


@pytest.mark.parametrize("alg", ALGS)
async def test_token_appears_in_no_produced_message(jwks: JwksClient, alg: str) -> None:
    token = make_token(claims(acr="urn:example:loa:2", amr=["pwd"]), alg=alg)
    origin = await mint(token, jwks, requested_scope=["orders:write"])
    signer = ChainSigner(EDGE, clock=lambda: NOW + 1)
    kafka = signer.seal(order_event(), destination="kafka:orders", origin=origin)
    amqp = signer.seal(order_event(), destination="amqp:shipping/order.created", origin=origin)
    messages = all_encodings(kafka, amqp)

    assert leaks(token, messages) == []
    # The chain is really in there (the search looked at it), and carries the hash.
    stacks = haystacks(messages)
    assert any(hash_credential(token) == h for h in stacks)
    assert any(SUBJECT.encode() == h for h in stacks)

    # And what was sent verifies downstream, for the subject of the token.
    verifier = ChainVerifier(
        TrustBundle.of([EDGE.bundle_key]), origin_actors=[EDGE_ID], clock=lambda: NOW + 2
    )
    for structured in (False, True):
        got = verifier.verify(
            decode_kafka(*encode_kafka(kafka, structured=structured)), "kafka:orders"
        )
        assert got.context.subject == SUBJECT
        assert got.context.scope == frozenset({"orders:write"})
        got = verifier.verify(
            decode_amqp(*encode_amqp(amqp, structured=structured)), "amqp:shipping/order.created"
        )
        assert got.context.chain.origin.credential_hash == hash_credential(token)


async def test_leak_detector_finds_a_leaked_token(jwks: JwksClient) -> None:
    """The search above can fail: a token put in an extension attribute, in
    the data, or base64-encoded in the data, is found in every encoding."""
    token = make_token()
    origin = await mint(token, jwks)
    signer = ChainSigner(EDGE, clock=lambda: NOW + 1)
    plain = signer.seal(order_event(authorization=token), destination="kafka:orders", origin=origin)
    assert "token" in leaks(token, all_encodings(plain, plain))

    hidden = base64.b64encode(token.encode()).decode()
    event = CloudEvent({"id": "o-2", "source": "/g", "type": "t"}, {"blob": "x" + hidden})
    wire = signer.seal(event, destination="kafka:orders", origin=origin)
    assert "token" in leaks(token, [encode_kafka(wire)])

    raw_sig = b64url_decode(token.split(".")[2])
    event = CloudEvent(
        {"id": "o-3", "source": "/g", "type": "t", "datacontenttype": "application/octet-stream"},
        b"prefix" + raw_sig,
    )
    wire = signer.seal(event, destination="kafka:orders", origin=origin)
    found = leaks(token, [encode_kafka(wire, structured=True)])
    assert "decoded signature" in found


async def test_errors_never_quote_the_token(jwks: JwksClient) -> None:
    """A sample of rejections through origin_from_token: no message leaks it."""
    cases = [
        make_token(claims(exp=NOW - 3600, nbf=None, iat=None)),
        make_token(claims(aud="https://other.example")),
        make_token(claims(iss="https://idp.example.org")),
        make_token(key=RSA_KEY, alg="ES256", sign_as="RS256"),
        make_token(kid="rsa-404"),
        make_token() + "=",
        make_token().replace(".", "..", 1),
    ]
    for token in cases:
        try:
            await mint(token, jwks)
        except TrustError as error:
            expect_rejected(_raiser(error), token, error.reason)
        else:
            raise AssertionError("accepted")
