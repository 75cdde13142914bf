"""The trust bundle: which key id belongs to which actor.

A bundle is a JWK Set. Each key carries, beside its public JWK members, a
``kid`` and a ``spiffe_id`` naming the one actor allowed to sign with it, and
optionally ``"revoked": true``. A top-level ``revoked_actors`` list revokes
actors whatever key they use. See ``docs/wire-format.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trusthop.keys import PublicKey
from trusthop.spiffe import validate_spiffe_id


class BundleError(ValueError):
    """A bundle file or entry that cannot be used (message names the entry)."""


@dataclass(frozen=True, slots=True)
class BundleKey:
    """One bundled key: its id, the actor it is bound to, the key itself."""

    kid: str
    actor: str
    key: PublicKey
    revoked: bool = False


@dataclass(frozen=True)
class TrustBundle:
    """An immutable map from key id to :class:`BundleKey`, plus revoked actors."""

    keys: Mapping[str, BundleKey] = field(default_factory=dict)
    revoked_actors: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: Iterable[BundleKey], *, revoked_actors: Iterable[str] = ()) -> TrustBundle:
        """Build a bundle, refusing duplicate key ids."""
        keys: dict[str, BundleKey] = {}
        for entry in entries:
            if entry.kid in keys:
                raise BundleError(f"duplicate key id {entry.kid!r}")
            validate_spiffe_id(entry.actor)
            keys[entry.kid] = entry
        return cls(keys, frozenset(validate_spiffe_id(a) for a in revoked_actors))

    def get(self, kid: str) -> BundleKey | None:
        return self.keys.get(kid)

    def with_key(self, entry: BundleKey) -> TrustBundle:
        """A new bundle with ``entry`` added (replacing a key of the same id)."""
        keys = dict(self.keys)
        keys[entry.kid] = entry
        return TrustBundle(keys, self.revoked_actors)

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> TrustBundle:
        """Read a parsed JWK Set.

        Raises:
            BundleError: naming the entry (by index and kid) and what is wrong.
        """
        raw_keys = document.get("keys")
        if not isinstance(raw_keys, list):
            raise BundleError("a bundle is a JSON object with a 'keys' array")
        entries = []
        for index, jwk in enumerate(raw_keys):
            where = f"keys[{index}]"
            if not isinstance(jwk, dict):
                raise BundleError(f"{where}: not a JSON object")
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise BundleError(f"{where}: missing 'kid'")
            where = f"{where} (kid {kid!r})"
            actor = jwk.get("spiffe_id")
            if not isinstance(actor, str):
                raise BundleError(f"{where}: missing 'spiffe_id' binding the key to an actor")
            try:
                validate_spiffe_id(actor)
                key = PublicKey.from_jwk(jwk)
            except ValueError as exc:
                raise BundleError(f"{where}: {exc}") from exc
            if jwk.get("use", "sig") != "sig":
                raise BundleError(f"{where}: 'use' must be 'sig' for a ring-signing key")
            revoked = jwk.get("revoked", False)
            if not isinstance(revoked, bool):
                raise BundleError(f"{where}: 'revoked' must be true or false")
            entries.append(BundleKey(kid, actor, key, revoked))
        revoked_actors = document.get("revoked_actors", [])
        if not isinstance(revoked_actors, list) or not all(
            isinstance(a, str) for a in revoked_actors
        ):
            raise BundleError("'revoked_actors' must be a list of SPIFFE IDs")
        try:
            return cls.of(entries, revoked_actors=revoked_actors)
        except ValueError as exc:
            raise BundleError(str(exc)) from exc

    @classmethod
    def load(cls, path: str | Path) -> TrustBundle:
        """Read a bundle file. Raises BundleError (also for unreadable JSON)."""
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: {exc}") from exc
        if not isinstance(document, dict):
            raise BundleError(f"{path}: a bundle is a JSON object")
        return cls.from_jwks(document)

    def to_jwks(self) -> dict[str, Any]:
        """The bundle as a JWK Set document (what :meth:`from_jwks` reads)."""
        keys = []
        for entry in self.keys.values():
            jwk = entry.key.to_jwk() | {"kid": entry.kid, "use": "sig", "spiffe_id": entry.actor}
            if entry.revoked:
                jwk["revoked"] = True
            keys.append(jwk)
        document: dict[str, Any] = {"keys": keys}
        if self.revoked_actors:
            document["revoked_actors"] = sorted(self.revoked_actors)
        return document
