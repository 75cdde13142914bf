"""In-process figures: the signature math, chain verification and signing,
ring sizes, the JWT baseline, the per-message pipeline and threads.

Each trusthop figure is interleaved with its own raw-crypto baseline (the
fastest Ed25519 backend installed, measured in the same rounds), so a ratio
never compares two moments of a noisy machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trusthop import keys
from trusthop.admission import Admission
from trusthop.bench.measure import (
    Pair,
    calibrate,
    describe_pair,
    interleave,
    micros,
    per_op,
    rounded,
)
from trusthop.bench.report import Figure, Target, not_measured
from trusthop.bench.workload import ISSUER, SCOPE, SUBJECT, Sealed, Workload, new_event
from trusthop.bindings.kafka import decode_kafka, encode_kafka
from trusthop.canonical import b64url_encode
from trusthop.chain import Chain, check_chain_text
from trusthop.destination import kafka_destination
from trusthop.pipeline import ChainSigner, ChainVerifier
from trusthop.replay import DeliveryInfo
from trusthop.sigcache import SignatureCache
from trusthop.sign import append_hop
from trusthop.stores.memory import MemoryReplayStore
from trusthop.verify import Limits

DEPTHS = (1, 2, 4, 8, 16)
"""Hop rings after the origin; a depth-d chain carries d + 1 signatures."""

WARM_TARGET_DEPTH = 8
CONSUMER_DEPTH = 3


@dataclass(frozen=True)
class Settings:
    """How long the in-process figures measure."""

    rounds: int
    batch_seconds: float
    quick: bool


@dataclass
class RawBackend:
    """One Ed25519 library called directly, with a realistic ring message."""

    name: str
    verify: Callable[[], object]
    sign: Callable[[], object]


def raw_backends(message: bytes) -> dict[str, RawBackend]:
    """The installed Ed25519 libraries, each bound to one key, message and signature."""
    private = Ed25519PrivateKey.from_private_bytes(b"\x2a" * 32)
    public = private.public_key()
    signature = private.sign(message)
    out = {
        keys.CRYPTOGRAPHY: RawBackend(
            keys.CRYPTOGRAPHY,
            lambda: public.verify(signature, message),
            lambda: private.sign(message),
        )
    }
    if keys.NACL in keys.available_ed25519_backends():
        from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair

        raw, secret = crypto_sign_seed_keypair(b"\x2a" * 32)
        out[keys.NACL] = RawBackend(
            keys.NACL,
            lambda: crypto_sign_open(signature + message, raw),
            lambda: crypto_sign(message, secret)[:64],
        )
    return out


class Micro:
    """The in-process figures of one run."""

    def __init__(self, workload: Workload, settings: Settings) -> None:
        self.w = workload
        self.s = settings
        self.limits = Limits()
        consumer = workload.chain(CONSUMER_DEPTH)
        self.message = consumer.chain.signing_input(CONSUMER_DEPTH)
        self.backends = raw_backends(self.message)
        self.fastest = self.backends[keys.available_ed25519_backends()[0]]
        self.raw_verify_us: dict[str, float] = {}
        self.raw_sign_us: dict[str, float] = {}

    # ------------------------------------------------------------- helpers

    def _n(self, operation: Callable[[], object], share: float = 1.0) -> int:
        return calibrate(operation, self.s.batch_seconds * share)

    def _raw(self, kind: str, factor: float = 1.0) -> Callable[[], float]:
        operation = self.fastest.verify if kind == "verify" else self.fastest.sign
        count = self._n(operation, 0.5)
        return lambda: factor * per_op(operation, count)

    def _verify(self, verifier: ChainVerifier, cache: SignatureCache, sealed: Sealed) -> None:
        """Decode and verify ``sealed``'s chain through ``cache`` (what a
        consumer does after computing the event digest)."""
        text = sealed.encoded
        check_chain_text(text, max_bytes=self.limits.max_bytes, max_rings=self.limits.max_rings)
        cache.verify(
            cache.decode(text),
            bundle=self.w.bundle,
            event_digest=sealed.chain.newest.event_digest,  # type: ignore[union-attr]
            destination=sealed.destination,
            now=self.w.now,
            limits=self.limits,
            origin_actors=verifier.origin_actors,
        )

    def _warm(self, cache: SignatureCache, prefix: Sealed | None) -> None:
        """Make ``prefix`` (the origin alone when ``None``) a verified prefix
        of ``cache``: verify one event derived from it."""
        sibling = self._fresh_hops(prefix, 1, kafka_destination("sibling"))[0]
        self._verify(self.w.verifier(), cache, sibling)

    def _fresh_hops(self, prefix: Sealed | None, count: int, destination: str) -> list[Sealed]:
        parent = Chain(self.w.origin) if prefix is None else prefix.chain
        return [self.w.extend(parent, destination=destination) for _ in range(count)]

    # ------------------------------------------------------------- figures

    def backends_figures(self) -> list[Figure]:
        """Raw verify and sign of every installed backend, interleaved."""
        names = list(self.backends)
        figures = []
        for kind in ("verify", "sign"):
            ops = {n: getattr(self.backends[n], kind) for n in names}
            counts = {n: self._n(ops[n], 0.5) for n in names}
            if len(names) == 2:
                slow, fast = keys.CRYPTOGRAPHY, keys.NACL
                pair = interleave(
                    self.s.rounds,
                    partial(per_op, ops[slow], counts[slow]),
                    partial(per_op, ops[fast], counts[fast]),
                )
                times = {slow: pair.a, fast: pair.b}
                speedup: float | None = rounded(1 / pair.ratio, 2)
            else:
                only = names[0]
                times = {only: per_op(ops[only], counts[only])}
                speedup = None
            table = self.raw_verify_us if kind == "verify" else self.raw_sign_us
            for name, seconds in times.items():
                table[name] = micros(seconds)
            best = min(times, key=lambda n: times[n])
            figures.append(
                Figure(
                    f"raw_{kind}",
                    micros(times[best]),
                    "us",
                    detail={
                        "per_backend_us": {n: micros(t) for n, t in times.items()},
                        "fastest": best,
                        "nacl_speedup": speedup,
                        "message_bytes": len(self.message),
                    },
                    summary=f"one raw Ed25519 {kind}, fastest backend ({best}); "
                    + ", ".join(f"{n} {micros(t)} us" for n, t in times.items())
                    + (f"; libsodium {speedup}x faster" if speedup else ""),
                )
            )
        return figures

    def verify_cold(self) -> list[Figure]:
        """Verify a depth-d chain with an empty verified-prefix cache."""
        figures = []
        verifier = self.w.verifier()
        cache = SignatureCache()
        for depth in DEPTHS:
            sealed = self.w.chain(depth)

            def op(sealed: Sealed = sealed) -> None:
                cache.clear()
                self._verify(verifier, cache, sealed)

            count = self._n(op)
            pair = interleave(
                self.s.rounds, self._raw("verify", depth + 1), partial(per_op, op, count)
            )
            figures.append(
                Figure(
                    f"verify_cold[{depth}]",
                    rounded(pair.ratio),
                    "ratio",
                    Target("<=", 1.25),
                    detail={
                        **describe_pair(pair),
                        "signatures": depth + 1,
                        "chain_chars": len(sealed.encoded),
                        "verify_us": micros(pair.b),
                        "raw_verify_us": micros(pair.a / (depth + 1)),
                    },
                    summary=f"{depth + 1} rings: {micros(pair.b)} us vs "
                    f"{depth + 1} x {micros(pair.a / (depth + 1))} us raw",
                )
            )
        return figures

    def verify_warm(self) -> list[Figure]:
        """A new hop on an already verified prefix (one new signature)."""
        figures = []
        verifier = self.w.verifier()
        cache = SignatureCache()
        for depth in DEPTHS:
            prefix = self.w.chain(depth - 1) if depth > 1 else None
            destination = kafka_destination("warm")
            probe = self._fresh_hops(prefix, 1, destination)[0]
            self._warm(cache, prefix)

            def probe_op(probe: Sealed = probe, prefix: Sealed | None = prefix) -> None:
                cache.clear()
                self._warm(cache, prefix)
                self._verify(verifier, cache, probe)

            count = max(1, self._n(probe_op) // 2)
            hops = self._fresh_hops(prefix, count, destination)

            def batch(hops: list[Sealed] = hops, prefix: Sealed | None = prefix) -> float:
                cache.clear()
                self._warm(cache, prefix)
                start = time.perf_counter()
                for sealed in hops:
                    self._verify(verifier, cache, sealed)
                return (time.perf_counter() - start) / len(hops)

            pair = interleave(self.s.rounds, self._raw("verify"), batch)
            figures.append(
                Figure(
                    f"verify_warm[{depth}]",
                    rounded(pair.ratio),
                    "ratio",
                    Target("<=", 1.5) if depth == WARM_TARGET_DEPTH else None,
                    detail={**describe_pair(pair), "signatures": depth + 1, "new": 1},
                    summary=f"{depth + 1} rings, {depth} cached: {micros(pair.b)} us vs "
                    f"{micros(pair.a)} us raw",
                )
            )
        return figures

    def sign_hop(self) -> list[Figure]:
        """Append and sign one hop ring to a decoded, verified parent."""
        parent_sealed = self.w.chain(CONSUMER_DEPTH - 1)
        parent = self.w.decoded(parent_sealed)
        parent.hashes()
        identity = self.w.signer_of(CONSUMER_DEPTH)
        digest = parent_sealed.wire.digest()
        destination = kafka_destination("orders")

        def op() -> None:
            append_hop(
                identity,
                parent,
                event_digest=digest,
                destination=destination,
                now=self.w.now,
            )

        count = self._n(op)
        pair = interleave(self.s.rounds, self._raw("sign"), lambda: per_op(op, count))
        return [
            Figure(
                "sign_hop",
                rounded(pair.ratio),
                "ratio",
                Target("<=", 1.3),
                detail=describe_pair(pair),
                summary=f"append_hop {micros(pair.b)} us vs raw sign {micros(pair.a)} us",
            )
        ]

    def ring_bytes(self) -> list[Figure]:
        """Encoded (base64url) characters a ring adds to the ``trustchain`` attribute.

        A hop as :class:`~trusthop.pipeline.ChainSigner` seals a derived
        event (scope and end of validity inherited); the detail also gives a
        hop that records the consumed event's id and one that narrows scope.
        """

        def increments(chain: Chain) -> list[int]:
            sizes = [len(Chain(chain.origin, chain.hops[:n]).encode()) for n in range(1, 6)]
            return [sizes[i + 1] - sizes[i] for i in range(len(sizes) - 1)]

        deep = self.w.chain(5)
        derived = increments(deep.chain)
        with_id = increments(self.w.chain(5, consumed=True).chain)
        narrowing = increments(self.w.chain(5, narrow=True).chain)
        newest = deep.chain.ring_bytes[-1]
        origin_bytes = deep.chain.ring_bytes[0]
        origin = len(b64url_encode(origin_bytes)) + 1  # and its dot
        return [
            Figure(
                "ring_bytes_hop",
                float(max(derived)),
                "bytes",
                Target("<=", 200),
                detail={
                    "derived_hop": max(derived),
                    "first_hop": increments(deep.chain)[0],
                    "ring_bytes": len(newest),
                    "with_consumed_event_id": max(with_id),
                    "narrowing_scope": max(narrowing),
                    "actor_path_chars": len(deep.chain.hops[-1].actor.split("/", 3)[3]) + 1,
                },
                summary=f"a derived hop adds {max(derived)} chars ({len(newest)} bytes: "
                f"64 signature, 32 event digest, actor path, key and link tags, destination, "
                f"iat); {max(with_id)} naming the consumed event, {max(narrowing)} narrowing "
                "scope",
            ),
            Figure(
                "ring_bytes_origin",
                float(origin),
                "bytes",
                Target("<=", 350),
                detail={"ring_bytes": len(origin_bytes)},
                summary=f"origin ring {origin} chars ({len(origin_bytes)} bytes: 64 signature, "
                "32 credential hash, 16 transaction id, actor, subject, issuer, scope, times)",
            ),
        ]

    def jwt_baseline(self) -> list[Figure]:
        """The status quo: forward the user's JWT, verify it with PyJWT at every hop."""
        try:
            import jwt
            from cryptography.hazmat.primitives.asymmetric import rsa
        except ImportError as exc:
            why = f"PyJWT is not installed ({exc}); pip install 'trusthop[bench]'"
            return [not_measured("jwt_hop[RS256]", "us", None, why)]
        now = int(self.w.now)
        claims = {
            "iss": ISSUER,
            "sub": SUBJECT,
            "aud": ["orders-api", "account"],
            "exp": now + 300,
            "iat": now,
            "nbf": now,
            "auth_time": now - 60,
            "jti": "0f8a2c7e-5b1d-4e9f-a3c6-7d2e9b4f1a08",
            "azp": "web-shop",
            "sid": "b3c1e6f2-9a7d-4c58-8e2b-1f6a9d3c7e50",
            "typ": "Bearer",
            "acr": "1",
            "scope": "openid profile email " + " ".join(SCOPE),
            "email": "alice@example.com",
            "email_verified": True,
            "preferred_username": "alice",
            "realm_access": {"roles": ["default-roles-prod", "offline_access", "customer"]},
        }
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "rsa-2026-01"})
        public = private.public_key()

        def jwt_op() -> None:
            jwt.decode(token, public, algorithms=["RS256"], audience="orders-api", issuer=ISSUER)

        ed_private = Ed25519PrivateKey.from_private_bytes(b"\x33" * 32)
        ed_token = jwt.encode(claims, ed_private, algorithm="EdDSA")
        ed_public = ed_private.public_key()

        def jwt_ed_op() -> None:
            jwt.decode(
                ed_token, ed_public, algorithms=["EdDSA"], audience="orders-api", issuer=ISSUER
            )

        verifier = self.w.verifier()
        cache = SignatureCache()
        prefix = self.w.chain(CONSUMER_DEPTH - 1)
        self._warm(cache, prefix)
        probe = self._fresh_hops(prefix, 1, kafka_destination("warm"))[0]
        count = self._n(lambda: self._verify(verifier, cache, probe))
        hops = self._fresh_hops(prefix, count, kafka_destination("warm"))

        def warm_batch() -> float:
            cache.clear()
            self._warm(cache, prefix)
            start = time.perf_counter()
            for sealed in hops:
                self._verify(verifier, cache, sealed)
            return (time.perf_counter() - start) / len(hops)

        jwt_count = self._n(jwt_op)
        pair = interleave(self.s.rounds, lambda: per_op(jwt_op, jwt_count), warm_batch)
        ed_us = micros(per_op(jwt_ed_op, self._n(jwt_ed_op)))
        hop_bytes = self.ring_bytes()[0].value
        return [
            Figure(
                "jwt_hop[RS256]",
                micros(pair.a),
                "us",
                detail={
                    **describe_pair(pair),
                    "token_bytes": len(token),
                    "eddsa_token_bytes": len(ed_token),
                    "eddsa_jwt_us": ed_us,
                    "trusthop_warm_hop_us": micros(pair.b),
                    "trusthop_hop_ring_bytes": hop_bytes,
                    "trusthop_over_jwt": rounded(pair.ratio),
                },
                summary=f"PyJWT RS256 verify per hop, {len(token)}-byte token at every hop "
                f"(EdDSA JWT {ed_us} us); trusthop new hop on a verified prefix "
                f"{micros(pair.b)} us (x{rounded(pair.ratio, 2)}), +{hop_bytes:.0f} B per hop",
            )
        ]

    def pipeline(self) -> list[Figure]:
        """Per message through the pipeline (no broker): seal and verify."""
        figures = []
        parent = self.w.chain(CONSUMER_DEPTH - 1)
        context = self.w.context(parent)
        signer = ChainSigner(self.w.signer_of(CONSUMER_DEPTH))
        destination = kafka_destination("orders")
        count = self._n(lambda: signer.seal(new_event(), destination=destination, parent=context))
        events = [new_event() for _ in range(count)]

        def seal_batch() -> float:
            start = time.perf_counter()
            for event in events:
                signer.seal(event, destination=destination, parent=context)
            return (time.perf_counter() - start) / len(events)

        pair = interleave(self.s.rounds, self._raw("sign"), seal_batch)
        figures.append(
            Figure(
                "pipeline_seal",
                rounded(pair.ratio),
                "ratio",
                detail=describe_pair(pair),
                summary=f"ChainSigner.seal (digest, append_hop, encode) {micros(pair.b)} us "
                f"vs raw sign {micros(pair.a)} us",
            )
        )
        verifier = self.w.verifier()
        # As a consumer holds them: decoded from Kafka binary-mode records.
        wires = [
            decode_kafka(*encode_kafka(sealed.wire))
            for sealed in self._fresh_hops(parent, count, destination)
        ]
        assert verifier.signature_cache is not None
        cache = verifier.signature_cache

        def verify_batch() -> float:
            cache.clear()
            self._warm(cache, parent)
            start = time.perf_counter()
            for wire in wires:
                verifier.verify(wire, destination)
            return (time.perf_counter() - start) / len(wires)

        pair = interleave(self.s.rounds, self._raw("verify"), verify_batch)
        figures.append(
            Figure(
                "pipeline_verify",
                rounded(pair.ratio),
                "ratio",
                detail={**describe_pair(pair), "depth": CONSUMER_DEPTH},
                summary=f"ChainVerifier.verify of a Kafka record's event (digest, decode, "
                "1 new signature, CloudEvent) "
                f"{micros(pair.b)} us vs raw verify {micros(pair.a)} us",
            )
        )

        async def admit_all(admission: Admission) -> float:
            start = time.perf_counter()
            for index, wire in enumerate(wires):
                await admission.admit(wire, destination, DeliveryInfo(id=f"d{index}"))
            return (time.perf_counter() - start) / len(wires)

        def admit_batch() -> float:
            cache.clear()
            self._warm(cache, parent)
            admission = Admission(verifier, scope="bench", store=MemoryReplayStore())
            return asyncio.run(admit_all(admission))

        pair = interleave(self.s.rounds, self._raw("verify"), admit_batch)
        figures.append(
            Figure(
                "pipeline_admit",
                rounded(pair.ratio),
                "ratio",
                detail={**describe_pair(pair), "depth": CONSUMER_DEPTH},
                summary=f"Admission.admit with the memory replay store {micros(pair.b)} us "
                f"vs raw verify {micros(pair.a)} us",
            )
        )
        return figures

    def backend_chains(self) -> list[Figure]:
        """trusthop itself on each backend: verify_cold[4] and sign_hop."""
        if len(self.backends) < 2:
            why = "PyNaCl is not installed (pip install 'trusthop[nacl]')"
            return [not_measured("backend_speedup", "x", None, why)]
        before = keys.ed25519_backend()
        verifier = self.w.verifier()
        cache = SignatureCache()
        sealed = self.w.chain(4)

        def op() -> None:
            cache.clear()
            self._verify(verifier, cache, sealed)

        def on(backend: str) -> Callable[[], float]:
            def batch() -> float:
                keys.set_ed25519_backend(backend)
                try:
                    return per_op(op, count)
                finally:
                    keys.set_ed25519_backend(before)

            return batch

        count = self._n(op)
        pair = interleave(self.s.rounds, on(keys.CRYPTOGRAPHY), on(keys.NACL))
        return [
            Figure(
                "backend_speedup",
                rounded(1 / pair.ratio, 2),
                "x",
                detail={
                    "cryptography_us": micros(pair.a),
                    "nacl_us": micros(pair.b),
                    "what": "verify_cold[4] (5 signatures) on each backend",
                    "rounds": len(pair.ratios),
                },
                summary=f"a 5-ring chain: cryptography {micros(pair.a)} us, "
                f"nacl {micros(pair.b)} us",
            )
        ]

    def threads(self) -> list[Figure]:
        """Independent events verified on two threads vs one (the backends release the GIL)."""
        parent = self.w.chain(CONSUMER_DEPTH - 1)
        destination = kafka_destination("orders")
        count = max(64, min(2000, int(self.s.batch_seconds / 150e-6)))
        hops = self._fresh_hops(parent, count, destination)
        verifiers = [self.w.verifier(), self.w.verifier()]

        def warm() -> None:
            for verifier in verifiers:
                assert verifier.signature_cache is not None
                verifier.signature_cache.clear()
                self._warm(verifier.signature_cache, parent)

        def run(verifier: ChainVerifier, items: list[Sealed]) -> None:
            for sealed in items:
                verifier.verify(sealed.wire, destination)

        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-verify")

        def serial() -> float:
            warm()
            start = time.perf_counter()
            run(verifiers[0], hops)
            return (time.perf_counter() - start) / len(hops)

        def parallel() -> float:
            warm()
            halves = [hops[0::2], hops[1::2]]
            start = time.perf_counter()
            futures = [pool.submit(run, v, h) for v, h in zip(verifiers, halves, strict=True)]
            for future in futures:
                future.result()
            return (time.perf_counter() - start) / len(hops)

        raw = self.fastest.verify

        def raw_serial() -> float:
            return per_op(raw, count)

        def raw_parallel() -> float:
            start = time.perf_counter()
            futures = [pool.submit(lambda: [raw() for _ in range(count // 2)]) for _ in range(2)]
            for future in futures:
                future.result()
            return (time.perf_counter() - start) / (2 * (count // 2))

        try:
            pair: Pair = interleave(self.s.rounds, serial, parallel)
            raw_pair = interleave(self.s.rounds, raw_serial, raw_parallel)
        finally:
            pool.shutdown()
        return [
            Figure(
                "threads_verify[2]",
                rounded(1 / pair.ratio, 2),
                "x",
                detail={
                    "serial_us": micros(pair.a),
                    "two_threads_us": micros(pair.b),
                    "raw_speedup": rounded(1 / raw_pair.ratio, 2),
                    "rounds": len(pair.ratios),
                    "events": len(hops),
                },
                summary=f"independent events (depth {CONSUMER_DEPTH}, warm prefix) on 2 threads: "
                f"{micros(pair.a)} -> {micros(pair.b)} us per event "
                f"(raw verify alone: x{rounded(1 / raw_pair.ratio, 2)})",
            )
        ]

    def all(self) -> list[Figure]:
        """Every in-process figure, in report order."""
        return [
            *self.backends_figures(),
            *self.verify_cold(),
            *self.verify_warm(),
            *self.sign_hop(),
            *self.ring_bytes(),
            *self.jwt_baseline(),
            *self.pipeline(),
            *self.backend_chains(),
            *self.threads(),
        ]


def summary_of(figures: list[Figure]) -> dict[str, Any]:
    """Raw per-op times for the broker figures' bounds."""
    out: dict[str, Any] = {}
    for figure in figures:
        if figure.name in ("raw_verify", "raw_sign") and figure.value is not None:
            out[figure.name] = figure.value
    return out
