"""The trust bundle: which keys and authorities a verifier trusts (no I/O but files).

A bundle is a SPIFFE trust bundle: a JWK Set per trust domain, with optional
``spiffe_sequence`` and ``spiffe_refresh_hint``. Entries are read by their
``use``:

* ``"sig"`` (also when ``use`` is absent): a workload's ring-signing key,
  with a ``kid``, a ``spiffe_id`` naming the one actor allowed to sign with
  it, and optionally ``"revoked": true`` or ``"retired_at": <epoch seconds>``
  (rings signed after that time are refused; older ones stay valid until
  they expire: rotation without breaking queued messages);
* ``"x509-svid"``: an X.509 authority of the trust domain (``x5c`` with one
  CA certificate), against which rings signed with an X.509-SVID are
  validated;
* ``"jwt-svid"``: a JWT-SVID authority; kept, not used for rings;
* any other ``use`` is ignored, as the SPIFFE bundle format requires.

Top-level ``revoked_actors`` (SPIFFE IDs) and ``revoked_segments`` (SPIFFE
IDs whose whole subtree is revoked, e.g. ``spiffe://td/ns/shop``) revoke
actors whatever key they use.

A **bundle map** is a JSON object from trust domain (``td`` or
``spiffe://td``) to such a bundle; :meth:`TrustBundle.from_document` reads
either. Key ids are unique across the whole bundle (which makes them unique
per trust domain, as required). See ``docs/identity.md``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from trusthop.keys import PublicKey
from trusthop.reloading import ReloadingFile
from trusthop.spiffe import SpiffeId, trust_domain_of, validate_spiffe_id

MAX_BUNDLE_BYTES = 4 * 1024 * 1024
T = TypeVar("T")


class BundleError(ValueError):
    """A bundle file or entry that cannot be used (message names the entry)."""


@dataclass(frozen=True, slots=True)
class BundleKey:
    """One bundled key: its id, the actor it is bound to, the key itself,
    whether it is revoked, and when it was retired (``None``: in use)."""

    kid: str
    actor: str
    key: PublicKey
    revoked: bool = False
    retired_at: int | None = None


@dataclass(frozen=True)
class TrustBundle:
    """An immutable map from key id to :class:`BundleKey`, plus revocations,
    X.509 authorities per trust domain and the SPIFFE bundle metadata."""

    keys: Mapping[str, BundleKey] = field(default_factory=dict)
    revoked_actors: frozenset[str] = frozenset()
    revoked_segments: frozenset[str] = frozenset()
    authorities: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    """X.509 authorities (CA certificates) per trust domain name."""
    jwt_authorities: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)
    """JWT-SVID authority JWKs per trust domain name (not used for rings)."""
    sequence: Mapping[str, int] = field(default_factory=dict)
    """``spiffe_sequence`` per trust domain, where given."""
    refresh_hint: Mapping[str, int] = field(default_factory=dict)
    """``spiffe_refresh_hint`` (seconds) per trust domain, where given."""

    @classmethod
    def of(
        cls,
        entries: Iterable[BundleKey],
        *,
        revoked_actors: Iterable[str] = (),
        revoked_segments: Iterable[str] = (),
        authorities: Mapping[str, Iterable[x509.Certificate]] | None = None,
    ) -> TrustBundle:
        """Build a bundle, refusing duplicate key ids, one key bound to two
        actors, and invalid SPIFFE IDs."""
        keys: dict[str, BundleKey] = {}
        for entry in entries:
            if entry.kid in keys:
                raise BundleError(f"duplicate key id {entry.kid!r}")
            validate_spiffe_id(entry.actor)
            keys[entry.kid] = entry
        _one_actor_per_key(keys.values())
        return cls(
            keys,
            frozenset(validate_spiffe_id(a) for a in revoked_actors),
            frozenset(validate_spiffe_id(s) for s in revoked_segments),
            {td: tuple(certs) for td, certs in (authorities or {}).items()},
        )

    def __post_init__(self) -> None:
        # Read-only views: verifiers cache what a bundle object said, so the
        # object must not change under them.
        setter = object.__setattr__
        for name in ("keys", "authorities", "jwt_authorities", "sequence", "refresh_hint"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                setter(self, name, MappingProxyType(dict(value)))
        _one_actor_per_key(self.keys.values())  # however the bundle was built
        # Rings name their key by (actor, key tag); both lookups are indexed
        # once per bundle, and so is each keyed actor's revocation.
        index: dict[tuple[str, int], BundleKey] = {}
        for entry in self.keys.values():
            slot = (entry.actor, entry.key.key_tag)
            first = index.get(slot)
            if first is None:
                index[slot] = entry
            elif first.key != entry.key:
                raise BundleError(
                    f"key ids {first.kid!r} and {entry.kid!r} of {entry.actor} share the key "
                    f"tag {slot[1]:#06x} that rings name their key by: generate another key "
                    "for one of them"
                )
            else:  # one key under two ids: the stricter entry counts
                index[slot] = _stricter(first, entry)
        setter(self, "_index", index)
        setter(self, "_by_key", {(e.key.alg, e.key.raw): e for e in index.values()})
        setter(self, "_actor_revoked", {e.actor: self._revoked(e.actor) for e in index.values()})

    def get(self, kid: str) -> BundleKey | None:
        """The entry with key id ``kid``."""
        return self.keys.get(kid)

    def key_for(self, actor: str, key_tag: int) -> BundleKey | None:
        """The key of ``actor`` with ``key_tag`` (what a ring names), if bundled."""
        index: dict[tuple[str, int], BundleKey] = self._index  # type: ignore[attr-defined]
        return index.get((actor, key_tag))

    def entry_of(self, key: PublicKey) -> BundleKey | None:
        """The bundle entry holding ``key`` (an X.509-SVID leaf's key, say), if any."""
        by_key: dict[tuple[str, bytes], BundleKey] = self._by_key  # type: ignore[attr-defined]
        return by_key.get((key.alg, key.raw))

    def with_key(self, entry: BundleKey) -> TrustBundle:
        """A new bundle with ``entry`` added (replacing a key of the same id).

        Raises:
            BundleError: ``entry``'s key is bound to another actor under another id.
        """
        keys = dict(self.keys)
        keys[entry.kid] = entry
        _one_actor_per_key(keys.values())
        return _replace(self, keys=keys)

    def is_revoked_actor(self, actor: str) -> bool:
        """Whether ``actor`` is revoked by name or by one of its segments."""
        known: bool | None = self._actor_revoked.get(actor)  # type: ignore[attr-defined]
        return self._revoked(actor) if known is None else known

    def _revoked(self, actor: str) -> bool:
        if actor in self.revoked_actors:
            return True
        return any(actor == s or actor.startswith(s + "/") for s in self.revoked_segments)

    def x509_authorities(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        """The X.509 authorities of ``trust_domain`` (empty when none)."""
        return self.authorities.get(trust_domain, ())

    @classmethod
    def from_jwks(
        cls, document: Mapping[str, Any], *, trust_domain: str | None = None
    ) -> TrustBundle:
        """Read one parsed SPIFFE trust bundle (a JWK Set).

        ``trust_domain`` names the bundle's trust domain; it is needed for
        ``x509-svid`` and ``jwt-svid`` entries, and may also be given by a
        top-level ``trust_domain`` member.

        Raises:
            BundleError: naming the entry (by index and kid) and what is wrong.
        """
        return _read_one(document, trust_domain, where="")

    @classmethod
    def from_document(cls, document: Any) -> TrustBundle:
        """Read a SPIFFE trust bundle or a bundle map (trust domain → bundle).

        Raises:
            BundleError: the document is neither, an entry is malformed, or a
                key id appears twice.
        """
        if not isinstance(document, dict):
            raise BundleError("a bundle is a JSON object")
        if "keys" in document:
            return cls.from_jwks(document)
        if not document:
            raise BundleError("a bundle map names at least one trust domain")
        parts = []
        for name, value in document.items():
            domain = _domain_name(name)
            if not isinstance(value, dict):
                raise BundleError(f"{name!r}: a trust bundle is a JSON object")
            parts.append(_read_one(value, domain, where=f"{domain}: "))
        return merge(parts)

    @classmethod
    def load(cls, path: str | Path) -> TrustBundle:
        """Read a bundle or bundle map file.

        Raises:
            BundleError: unreadable, over 4 MiB, not JSON, or invalid.
        """
        try:
            raw = Path(path).read_bytes()
            if len(raw) > MAX_BUNDLE_BYTES:
                raise BundleError(f"{path}: larger than {MAX_BUNDLE_BYTES} bytes")
            document = json.loads(raw, object_pairs_hook=_no_duplicates)
        except (OSError, ValueError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{path}: {exc}") from exc
        try:
            return cls.from_document(document)
        except BundleError as exc:
            raise BundleError(f"{path}: {exc}") from None

    def to_jwks(self) -> dict[str, Any]:
        """The ring keys and revocations as one JWK Set document (what
        :meth:`from_jwks` reads); authorities are written by :meth:`to_map`."""
        keys = [_key_jwk(entry) for entry in self.keys.values()]
        document: dict[str, Any] = {"keys": keys}
        if self.revoked_actors:
            document["revoked_actors"] = sorted(self.revoked_actors)
        if self.revoked_segments:
            document["revoked_segments"] = sorted(self.revoked_segments)
        return document

    def to_map(self) -> dict[str, Any]:
        """The bundle as a bundle map: one SPIFFE trust bundle per trust
        domain, with its ring keys, X.509 and JWT authorities, sequence and
        refresh hint. Revocations go to the trust domain they name."""
        domains = (
            {trust_domain_of(e.actor) for e in self.keys.values()}
            | set(self.authorities)
            | set(self.jwt_authorities)
            | {trust_domain_of(a) for a in self.revoked_actors | self.revoked_segments}
        )
        out: dict[str, Any] = {}
        for domain in sorted(domains):
            keys: list[dict[str, Any]] = [
                _key_jwk(e) for e in self.keys.values() if trust_domain_of(e.actor) == domain
            ]
            keys += [
                {"use": "x509-svid", "kty": _kty(c), "x5c": [_b64(c)]}
                for c in self.authorities.get(domain, ())
            ]
            keys += [dict(j) for j in self.jwt_authorities.get(domain, ())]
            doc: dict[str, Any] = {"keys": keys}
            if domain in self.sequence:
                doc["spiffe_sequence"] = self.sequence[domain]
            if domain in self.refresh_hint:
                doc["spiffe_refresh_hint"] = self.refresh_hint[domain]
            actors = sorted(a for a in self.revoked_actors if trust_domain_of(a) == domain)
            segments = sorted(s for s in self.revoked_segments if trust_domain_of(s) == domain)
            if actors:
                doc["revoked_actors"] = actors
            if segments:
                doc["revoked_segments"] = segments
            out[f"spiffe://{domain}"] = doc
        return out


def merge(bundles: Iterable[TrustBundle]) -> TrustBundle:
    """One bundle holding every key, revocation and authority of ``bundles``.

    Raises:
        BundleError: a key id appears in two of them, one key is bound to
            two actors, or one trust domain's authorities, sequence or
            refresh hint are given twice.
    """
    keys: dict[str, BundleKey] = {}
    actors: set[str] = set()
    segments: set[str] = set()
    authorities: dict[str, tuple[x509.Certificate, ...]] = {}
    jwt: dict[str, tuple[Mapping[str, Any], ...]] = {}
    sequence: dict[str, int] = {}
    hint: dict[str, int] = {}
    for bundle in bundles:
        for kid, entry in bundle.keys.items():
            if kid in keys:
                raise BundleError(f"duplicate key id {kid!r} across trust bundles")
            keys[kid] = entry
        actors |= bundle.revoked_actors
        segments |= bundle.revoked_segments
        _merge_per_domain(authorities, bundle.authorities, "X.509 authorities")
        _merge_per_domain(jwt, bundle.jwt_authorities, "JWT authorities")
        _merge_per_domain(sequence, bundle.sequence, "spiffe_sequence")
        _merge_per_domain(hint, bundle.refresh_hint, "spiffe_refresh_hint")
    _one_actor_per_key(keys.values())
    return TrustBundle(
        keys, frozenset(actors), frozenset(segments), authorities, jwt, sequence, hint
    )


def _one_actor_per_key(entries: Iterable[BundleKey]) -> None:
    """Refuse one public key bound to two actors (under two key ids).

    A bundle entry names "the only actor that may sign with it": the holder
    of a key bound to two actors could sign rings as either. The same key
    under two ids of one actor (an id renamed during a rotation) is allowed.

    Raises:
        BundleError: naming both key ids and actors.
    """
    owners: dict[tuple[str, bytes], BundleKey] = {}
    for entry in entries:
        first = owners.setdefault((entry.key.alg, entry.key.raw), entry)
        if first.actor != entry.actor:
            raise BundleError(
                f"key id {entry.kid!r} binds the key of key id {first.kid!r} "
                f"to {entry.actor}, but that key belongs to {first.actor}"
            )


def _stricter(a: BundleKey, b: BundleKey) -> BundleKey:
    """One key listed under two ids: revoked if either is, retired at the earlier time."""
    retired = [t for t in (a.retired_at, b.retired_at) if t is not None]
    return dataclasses.replace(
        a, revoked=a.revoked or b.revoked, retired_at=min(retired) if retired else None
    )


def _merge_per_domain(target: dict[str, T], source: Mapping[str, T], what: str) -> None:
    for domain, value in source.items():
        if domain in target:
            raise BundleError(f"{domain}: {what} given by two bundles")
        target[domain] = value


def _replace(bundle: TrustBundle, **changes: Any) -> TrustBundle:
    return dataclasses.replace(bundle, **changes)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise BundleError(f"duplicate JSON member {name[:100]!r}")
        out[name] = value
    return out


def _domain_name(name: Any) -> str:
    if not isinstance(name, str):
        raise BundleError("a bundle map's keys are trust domain names")
    text = name if name.startswith("spiffe://") else f"spiffe://{name}"
    try:
        parsed = SpiffeId.parse(text)
    except ValueError as exc:
        raise BundleError(f"{name[:100]!r}: not a trust domain: {exc}") from None
    if parsed.path:
        raise BundleError(f"{name[:100]!r}: a trust domain name has no path")
    return parsed.trust_domain


def _non_negative_int(document: Mapping[str, Any], name: str, where: str) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BundleError(f"{where}'{name}' must be a non-negative integer")
    return value


def _spiffe_ids(document: Mapping[str, Any], name: str, where: str) -> list[str]:
    values = document.get(name, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BundleError(f"{where}'{name}' must be a list of SPIFFE IDs")
    for value in values:
        try:
            validate_spiffe_id(value)
        except ValueError as exc:
            raise BundleError(f"{where}'{name}': {value[:100]!r}: {exc}") from None
    return values


def _read_one(document: Mapping[str, Any], trust_domain: str | None, *, where: str) -> TrustBundle:
    raw_keys = document.get("keys")
    if not isinstance(raw_keys, list):
        raise BundleError(f"{where}a bundle is a JSON object with a 'keys' array")
    declared = document.get("trust_domain")
    if declared is not None:
        name = _domain_name(declared)
        if trust_domain is not None and name != trust_domain:
            raise BundleError(f"{where}declares trust domain {name}, expected {trust_domain}")
        trust_domain = name
    sequence = _non_negative_int(document, "spiffe_sequence", where)
    hint = _non_negative_int(document, "spiffe_refresh_hint", where)
    entries: list[BundleKey] = []
    authorities: list[x509.Certificate] = []
    jwt: list[Mapping[str, Any]] = []
    seen_certs: set[bytes] = set()
    jwt_kids: set[str] = set()
    for index, jwk in enumerate(raw_keys):
        at = f"{where}keys[{index}]"
        if not isinstance(jwk, dict):
            raise BundleError(f"{at}: not a JSON object")
        use = jwk.get("use", "sig")
        if use == "sig":
            entries.append(_ring_key(jwk, at))
        elif use == "x509-svid":
            cert = _authority(jwk, at, trust_domain)
            der = cert.public_bytes(_DER)
            if der in seen_certs:
                raise BundleError(f"{at}: duplicate X.509 authority")
            seen_certs.add(der)
            authorities.append(cert)
        elif use == "jwt-svid":
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid or not isinstance(jwk.get("kty"), str):
                raise BundleError(f"{at}: a jwt-svid authority needs 'kid' and 'kty'")
            if trust_domain is None:
                raise BundleError(f"{at}: a jwt-svid authority needs the bundle's trust domain")
            if kid in jwt_kids:
                raise BundleError(f"{at}: duplicate jwt-svid key id {kid[:100]!r}")
            jwt_kids.add(kid)
            jwt.append(dict(jwk))
        # Any other use is ignored, as the SPIFFE trust bundle format requires.
    actors = _spiffe_ids(document, "revoked_actors", where)
    segments = _spiffe_ids(document, "revoked_segments", where)
    for actor in [e.actor for e in entries] + actors + segments:
        if trust_domain is not None and trust_domain_of(actor) != trust_domain:
            raise BundleError(f"{where}{actor[:100]} is outside trust domain {trust_domain}")
    try:
        bundle = TrustBundle.of(entries, revoked_actors=actors, revoked_segments=segments)
    except ValueError as exc:
        raise BundleError(f"{where}{exc}") from exc
    if trust_domain is None:
        return bundle
    return _replace(
        bundle,
        authorities={trust_domain: tuple(authorities)} if authorities else {},
        jwt_authorities={trust_domain: tuple(jwt)} if jwt else {},
        sequence={trust_domain: sequence} if sequence is not None else {},
        refresh_hint={trust_domain: hint} if hint is not None else {},
    )


def _ring_key(jwk: dict[str, Any], at: str) -> BundleKey:
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise BundleError(f"{at}: missing 'kid'")
    where = f"{at} (kid {kid[:100]!r})"
    actor = jwk.get("spiffe_id")
    if not isinstance(actor, str):
        raise BundleError(f"{where}: missing 'spiffe_id' binding the key to an actor")
    try:
        validate_spiffe_id(actor)
        key = PublicKey.from_jwk(jwk)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from exc
    revoked = jwk.get("revoked", False)
    if not isinstance(revoked, bool):
        raise BundleError(f"{where}: 'revoked' must be true or false")
    retired = _non_negative_int(jwk, "retired_at", f"{where}: ")
    return BundleKey(kid, actor, key, revoked, retired)


_DER = serialization.Encoding.DER


def _authority(jwk: dict[str, Any], at: str, trust_domain: str | None) -> x509.Certificate:
    if trust_domain is None:
        raise BundleError(
            f"{at}: an x509-svid authority needs the bundle's trust domain "
            "(a bundle map, a 'trust_domain' member, or --trust-domain)"
        )
    chain = jwk.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise BundleError(f"{at}: an x509-svid authority has 'x5c' with exactly one certificate")
    try:
        der = base64.b64decode(chain[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{at}: 'x5c' is not a base64 DER certificate ({exc})") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise BundleError(f"{at}: an X.509 authority must be a CA certificate")
    return cert


def _b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(_DER)).decode("ascii")


def _kty(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "OKP"
    return "unknown"


def _key_jwk(entry: BundleKey) -> dict[str, Any]:
    jwk = entry.key.to_jwk() | {"kid": entry.kid, "use": "sig", "spiffe_id": entry.actor}
    if entry.revoked:
        jwk["revoked"] = True
    if entry.retired_at is not None:
        jwk["retired_at"] = entry.retired_at
    return jwk


class BundleSource(ReloadingFile[TrustBundle]):
    """The current trust bundle (or bundle map) of one file, reloaded on
    demand (``reload()``) or on change (``poll()``, ``watch()``).

    :class:`~trusthop.pipeline.ChainVerifier` accepts it wherever it accepts
    a :class:`TrustBundle` and reads it at every message, so rotation and
    revocation apply at once, also to queued messages and redeliveries,
    without restarting consumers. A file that fails to load (unreadable,
    not JSON, a malformed entry) never replaces the bundle in force, never
    with an empty one: the last good bundle stays, :attr:`last_error` says
    why, and an ERROR is logged on ``trusthop.bundle``. A file that loads
    but holds no key and no authority is refused the same way.

    Raises:
        OSError: the file cannot be read at construction.
        BundleError: the file is invalid at construction.
    """

    kind = "trust bundle"
    log = logging.getLogger("trusthop.bundle")

    @property
    def bundle(self) -> TrustBundle:
        """The bundle in force."""
        return self.current

    def _parse(self, raw: bytes) -> TrustBundle:
        if len(raw) > MAX_BUNDLE_BYTES:
            raise BundleError(f"{self.path}: larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            document = json.loads(raw, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{self.path}: not JSON: {exc}") from None
        bundle = TrustBundle.from_document(document)
        if not bundle.keys and not bundle.authorities:
            raise BundleError(f"{self.path}: holds no key and no authority (refused)")
        return bundle

    def _problems(self, exc: Exception) -> list[str] | None:
        return [str(exc)] if isinstance(exc, BundleError) else None

    def _describe(self, value: TrustBundle) -> str:
        return (
            f"{len(value.keys)} keys, "
            f"{sum(len(c) for c in value.authorities.values())} X.509 authorities, "
            f"sequence {dict(value.sequence) or '-'}"
        )


def current_bundle(bundle: TrustBundle | BundleSource) -> TrustBundle:
    """The bundle to verify with now."""
    return bundle.current if isinstance(bundle, BundleSource) else bundle
