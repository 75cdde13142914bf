"""Matchers used by policies: actor patterns, namespaces, globs, subjects (pure).

Every matcher is an immutable value built by a ``parse`` class method that
raises :class:`ValueError` with a sentence naming what is wrong; a matcher
that parsed never raises while matching.

* :class:`ActorPattern`: an exact SPIFFE ID (``spiffe://td/ns/shop/sa/orders``)
  or a **segment-aware** path prefix ending in ``/*``
  (``spiffe://td/ns/shop/*`` matches ``/ns/shop`` and every path below it,
  never ``/ns/shopping``). ``spiffe://td/*`` is the whole trust domain. The
  trust domain is always compared exactly, paths are case-sensitive, and a
  ``*`` anywhere else is refused.
* :class:`Namespace`: the Kubernetes convention ``/ns/<name>/...`` inside one
  trust domain.
* :class:`Glob`: destinations and event types; ``*`` matches any run of
  characters (``/``, ``.`` and ``:`` included), every other character is
  literal (no ``?`` or ``[...]``), case-sensitive.
* :class:`SubjectPattern`: an exact subject (``service:billing``) or a prefix
  ending in ``*`` (``user:*``) that needs at least one character after the
  prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from trusthop.spiffe import SpiffeId

_SCHEME = "spiffe://"


@lru_cache(maxsize=4096)
def split_actor(actor: str) -> tuple[str, tuple[str, ...]] | None:
    """``(trust_domain, path segments)`` of a SPIFFE ID, or ``None`` if it is not one."""
    try:
        parsed = SpiffeId.parse(actor)
    except ValueError:
        return None
    segments = tuple(parsed.path.split("/")[1:]) if parsed.path else ()
    return parsed.trust_domain, segments


@dataclass(frozen=True, slots=True)
class ActorPattern:
    """An exact SPIFFE ID, or a segment-aware prefix (``prefix=True``)."""

    trust_domain: str
    segments: tuple[str, ...]
    prefix: bool

    @classmethod
    def parse(cls, text: object) -> ActorPattern:
        """Parse ``spiffe://td/path`` (exact) or ``spiffe://td/path/*`` (prefix).

        Raises:
            ValueError: not a string, a ``*`` other than a last ``/*``, or a
                base that is not a valid SPIFFE ID (see :mod:`trusthop.spiffe`).
        """
        if not isinstance(text, str):
            raise ValueError("an actor pattern is a string")
        prefix = text.endswith("/*")
        base = text[:-2] if prefix else text
        if "*" in base:
            raise ValueError(
                f"{text!r}: '*' is only allowed as a whole last segment "
                "('spiffe://<trust domain>/<path>/*')"
            )
        try:
            parsed = SpiffeId.parse(base)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a SPIFFE ID or prefix: {exc}") from None
        segments = tuple(parsed.path.split("/")[1:]) if parsed.path else ()
        return cls(parsed.trust_domain, segments, prefix)

    @property
    def specificity(self) -> tuple[int, int]:
        """Exact IDs beat prefixes; a longer prefix beats a shorter one."""
        return (3 if not self.prefix else 2, len(self.segments))

    def matches(self, actor: str) -> bool:
        """Whether ``actor`` (any string; non-SPIFFE strings never match) fits."""
        split = split_actor(actor)
        if split is None or split[0] != self.trust_domain:
            return False
        segments = split[1]
        if self.prefix:
            return segments[: len(self.segments)] == self.segments
        return segments == self.segments

    def __str__(self) -> str:
        path = "".join(f"/{s}" for s in self.segments)
        return f"{_SCHEME}{self.trust_domain}{path}{'/*' if self.prefix else ''}"


@dataclass(frozen=True, slots=True)
class Namespace:
    """Every actor ``spiffe://<trust_domain>/ns/<name>[/...]``."""

    trust_domain: str
    name: str

    @classmethod
    def parse(cls, *, trust_domain: str, name: str) -> Namespace:
        """Raises ValueError when ``name`` is not one SPIFFE path segment or
        ``trust_domain`` is not a valid trust domain."""
        if "/" in name or "*" in name:
            raise ValueError(f"namespace {name!r} must be a single path segment, no '/' or '*'")
        try:
            SpiffeId.parse(f"{_SCHEME}{trust_domain}/ns/{name}")
        except ValueError as exc:
            raise ValueError(f"namespace {name!r} in {trust_domain!r}: {exc}") from None
        return cls(trust_domain, name)

    # Exactly the actors of the prefix spiffe://<td>/ns/<name>/*, so it ranks
    # like that prefix: a shorter prefix (spiffe://<td>/*) never overrides it.
    specificity = (2, 2)

    def matches(self, actor: str) -> bool:
        split = split_actor(actor)
        return (
            split is not None
            and split[0] == self.trust_domain
            and split[1][:2] == ("ns", self.name)
        )

    def __str__(self) -> str:
        return f"namespace {self.name} of {self.trust_domain}"


def validate_trust_domain(value: object) -> str:
    """Return ``value`` if it is a valid SPIFFE trust domain, else raise ValueError."""
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{value!r} is not a trust domain")
    try:
        SpiffeId.parse(f"{_SCHEME}{value}")
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a trust domain: {exc}") from None
    return value


@dataclass(frozen=True, slots=True)
class Glob:
    """A destination or event-type pattern where only ``*`` is special."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, text: object) -> Glob:
        """Raises ValueError for a non-string or empty pattern."""
        if not isinstance(text, str) or not text:
            raise ValueError("a pattern is a non-empty string")
        body = ".*".join(re.escape(part) for part in text.split("*"))
        return cls(text, re.compile(body, re.DOTALL))

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class SubjectPattern:
    """An exact subject, or ``<prefix>*`` (at least one character after the prefix)."""

    text: str

    @classmethod
    def parse(cls, text: object) -> SubjectPattern:
        """Raises ValueError for a non-string, empty pattern or an inner ``*``."""
        if not isinstance(text, str) or not text:
            raise ValueError("a subject pattern is a non-empty string")
        if "*" in text[:-1]:
            raise ValueError(f"{text!r}: '*' is only allowed at the end of a subject pattern")
        return cls(text)

    def matches(self, subject: str) -> bool:
        if self.text.endswith("*"):
            prefix = self.text[:-1]
            return subject.startswith(prefix) and len(subject) > len(prefix)
        return subject == self.text

    def __str__(self) -> str:
        return self.text
