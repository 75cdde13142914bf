"""The policy file: pydantic models, validation and loading.

A policy is TOML (parsed with the standard library's :mod:`tomllib`; YAML is
not supported, as it would add a dependency for no expressive gain). The
format is described in ``docs/policy.md``. Everything here is immutable:
a :class:`Policy` never changes after it was built, so a consumer that
reloads its policy swaps one reference and every later evaluation sees the
new one.

:func:`parse_policy` validates a mapping, :func:`loads_policy` TOML text and
:func:`load_policy` a file; each raises one :class:`PolicyError` carrying
every problem found, each naming the offending entry
(``requirements[2].min_level: unknown level 'gold' ...``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from trusthop.policy.patterns import (
    ActorPattern,
    Glob,
    Namespace,
    SubjectPattern,
    split_actor,
    validate_trust_domain,
)

UNTRUSTED = "untrusted"


class PolicyError(ValueError):
    """A policy failed to load or validate.

    Attributes:
        errors: one sentence per problem, each starting with where it is
            (``members[3].prefix: ...``), in file order.
    """

    def __init__(self, errors: list[str], *, source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "invalid policy:\n  " + "\n  ".join(self.errors))


def _exact(value: object) -> ActorPattern:
    pattern = ActorPattern.parse(value)
    if pattern.prefix:
        raise ValueError(f"{value!r}: an id is one exact SPIFFE ID; use prefix = for '.../*'")
    return pattern


def _prefix(value: object) -> ActorPattern:
    pattern = ActorPattern.parse(value)
    if not pattern.prefix:
        raise ValueError(f"{value!r}: a prefix ends in '/*' (e.g. 'spiffe://td/ns/shop/*')")
    return pattern


def _namespace_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a namespace is a string")
    Namespace.parse(trust_domain="example.org", name=value)  # the name alone
    return value


def _level_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"{value!r} is not a level name (a non-empty string, no outer spaces)")
    return value


def _level_ref(value: object, info: ValidationInfo) -> str:
    """A level name that must be one of the policy's levels (known early from
    the validation context, so every bad reference is reported at once)."""
    name = _level_name(value)
    levels = (info.context or {}).get("levels")
    if levels is not None and name not in levels:
        raise ValueError(f"unknown level {name!r} (levels: {', '.join(levels)})")
    return name


ActorPatternField = Annotated[ActorPattern, PlainValidator(ActorPattern.parse)]
ExactField = Annotated[ActorPattern, PlainValidator(_exact)]
PrefixField = Annotated[ActorPattern, PlainValidator(_prefix)]
GlobField = Annotated[Glob, PlainValidator(Glob.parse)]
SubjectField = Annotated[SubjectPattern, PlainValidator(SubjectPattern.parse)]
TrustDomainField = Annotated[str, PlainValidator(validate_trust_domain)]
LevelField = Annotated[str, PlainValidator(_level_name)]
LevelRefField = Annotated[str, PlainValidator(_level_ref)]
NamespaceField = Annotated[str, PlainValidator(_namespace_name)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _needs_domain(namespace: str) -> str:
    return f"namespace {namespace!r} needs a trust_domain (on the entry or at the top level)"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Selector(_Model):
    """Which actors an entry is about: exactly one of ``id``, ``prefix``, ``namespace``.

    ``trust_domain`` only goes with ``namespace`` and defaults to the
    policy's top-level ``trust_domain``.
    """

    id: ExactField | None = None
    prefix: PrefixField | None = None
    namespace: NamespaceField | None = None
    trust_domain: TrustDomainField | None = None

    @model_validator(mode="after")
    def _one_selector(self, info: ValidationInfo) -> Self:
        given = [k for k in ("id", "prefix", "namespace") if getattr(self, k) is not None]
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of id, prefix or namespace (found: {found})")
        if self.trust_domain is not None and self.namespace is None:
            raise ValueError("trust_domain only goes with namespace (ids and prefixes name theirs)")
        context = info.context or {}
        if (
            self.namespace is not None
            and self.trust_domain is None
            and "levels" in context  # validated by parse_policy, which knows the top level
            and context.get("trust_domain") is None
        ):
            raise ValueError(_needs_domain(self.namespace))
        return self

    def matcher(self, default_trust_domain: str | None) -> ActorPattern | Namespace:
        """The compiled selector (the policy validated that a namespace has a trust domain)."""
        if self.id is not None:
            return self.id
        if self.prefix is not None:
            return self.prefix
        assert self.namespace is not None
        domain = self.trust_domain or default_trust_domain
        assert domain is not None
        return Namespace.parse(trust_domain=domain, name=self.namespace)

    def describe(self) -> str:
        if self.namespace is not None:
            return f"namespace {self.namespace}"
        return str(self.id or self.prefix)


class Member(Selector):
    """A membership rule: actors the selector matches hold ``level``."""

    level: LevelRefField


class Segment(Selector):
    """A quarantine: while it is in the policy, any actor it selects, anywhere
    on a path, denies the destinations in ``deny`` (default: all) for the
    event types in ``event_types`` (default: all) with ``segment_quarantined``."""

    name: NonEmptyStr
    deny: tuple[GlobField, ...] = Field(default=(Glob.parse("*"),), min_length=1)
    event_types: tuple[GlobField, ...] = Field(default=(Glob.parse("*"),), min_length=1)


class PathStep(_Model):
    """One step of a path: exactly one hop whose actor matches one of ``actors``."""

    name: NonEmptyStr | None = None
    actors: tuple[ActorPatternField, ...] = Field(min_length=1)
    optional: StrictBool = False


class PathRule(_Model):
    """The path an event must have taken, in the spirit of in-toto layouts.

    Ring 0's actor must match ``origin``; the origin's own hop (ring 1 when
    signed by the same actor as ring 0) belongs to the origin step; every
    later hop must match the ``steps`` in order, one hop per step, skipping
    only optional steps, with no hop left over.
    """

    origin: tuple[ActorPatternField, ...] = Field(min_length=1)
    steps: tuple[PathStep, ...] = ()


class Requirement(_Model):
    """What a destination (and optionally an event type) demands.

    Every requirement whose ``destination`` and ``event_type`` match applies,
    and all of them must allow. Omitted constraints are not checked; a
    requirement with no constraint at all explicitly allows its destination.
    """

    name: NonEmptyStr | None = None
    destination: GlobField
    event_type: GlobField | None = None
    min_level: LevelRefField | None = None
    publishers: tuple[ActorPatternField, ...] | None = Field(default=None, min_length=1)
    scope: tuple[NonEmptyStr, ...] = ()
    subjects: tuple[SubjectField, ...] | None = Field(default=None, min_length=1)
    path: PathRule | None = None

    def applies(self, *, destination: str, event_type: str) -> bool:
        return self.destination.matches(destination) and (
            self.event_type is None or self.event_type.matches(event_type)
        )


@dataclass(frozen=True, slots=True)
class Membership:
    """An actor's level and the rule that gave it (``None``: no rule, untrusted)."""

    actor: str
    level: str
    rule: int | None


class Policy(_Model):
    """A validated, immutable policy. Build it with :func:`parse_policy` or
    :func:`load_policy` (``model_validate`` works too but raises pydantic's
    error type)."""

    version: Literal[1] = 1
    default: Literal["deny", "allow"] = "deny"
    trust_domain: TrustDomainField | None = None
    levels: tuple[LevelField, ...] = Field(min_length=1)
    members: tuple[Member, ...] = ()
    segments: tuple[Segment, ...] = ()
    requirements: tuple[Requirement, ...] = ()
    _digest: str | None = PrivateAttr(default=None)

    @property
    def digest(self) -> str:
        """The policy's identity for decision logs: ``sha256:<hex>``.

        Set by :func:`parse_policy` (and so :func:`load_policy`) from the
        canonical JSON of the parsed document (sorted keys), so comments and
        layout do not change it but any rule change does. A policy built
        with ``model_validate`` directly gets the hash of its ``repr``.
        """
        if self._digest is None:
            self._digest = "sha256:" + hashlib.sha256(repr(self).encode()).hexdigest()
        return self._digest

    @model_validator(mode="after")
    def _cross_references(self) -> Self:
        problems: list[str] = []
        if self.levels[0] != UNTRUSTED:
            problems.append(f"levels: the first (lowest) level must be {UNTRUSTED!r}")
        seen: set[str] = set()
        for index, level in enumerate(self.levels):
            if level in seen:
                problems.append(f"levels[{index}]: {level!r} is listed twice")
            seen.add(level)
        known = ", ".join(self.levels)
        selectors: dict[object, int] = {}
        for index, member in enumerate(self.members):
            if member.level not in seen:
                problems.append(
                    f"members[{index}].level: unknown level {member.level!r} (levels: {known})"
                )
            problems += self._namespace_problem(member, f"members[{index}]")
            key = self._selector_key(member)
            if key in selectors:
                problems.append(
                    f"members[{index}]: selects the same actors as members[{selectors[key]}] "
                    "(ambiguous level)"
                )
            selectors.setdefault(key, index)
        names: dict[str, int] = {}
        for index, segment in enumerate(self.segments):
            problems += self._namespace_problem(segment, f"segments[{index}]")
            if segment.name in names:
                first = names[segment.name]
                problems.append(
                    f"segments[{index}].name: {segment.name!r} is also segments[{first}]"
                )
            names.setdefault(segment.name, index)
        for index, requirement in enumerate(self.requirements):
            if requirement.min_level is not None and requirement.min_level not in seen:
                problems.append(
                    f"requirements[{index}].min_level: unknown level "
                    f"{requirement.min_level!r} (levels: {known})"
                )
        if problems:
            raise ValueError(_JOINED + "\n".join(problems))
        return self

    def _namespace_problem(self, selector: Selector, where: str) -> list[str]:
        if selector.namespace is None or selector.trust_domain or self.trust_domain:
            return []
        return [f"{where}: {_needs_domain(selector.namespace)}"]

    def _selector_key(self, member: Member) -> object:
        """What the entry selects: a namespace is the prefix ``.../ns/<name>/*``."""
        if member.namespace is not None:
            return (member.trust_domain or self.trust_domain, ("ns", member.namespace), True)
        pattern = member.id or member.prefix
        assert pattern is not None  # exactly one selector (Selector._one_selector)
        return (pattern.trust_domain, pattern.segments, pattern.prefix)

    # -- evaluation helpers (pure) ------------------------------------------

    def rank(self, level: str) -> int:
        """Position of ``level`` in ``levels`` (0 is untrusted). Raises ValueError if unknown."""
        return self.levels.index(level)

    def membership(self, actor: str) -> Membership:
        """The level ``actor`` holds now: the most specific matching member rule
        (exact id > longest prefix; a namespace ranks as the prefix
        ``.../ns/<name>/*``), ``untrusted`` if none matches or ``actor`` is
        not a SPIFFE ID."""
        best: tuple[tuple[int, int], int] | None = None
        if split_actor(actor) is not None:
            for index, matcher in enumerate(self.member_matchers):
                if matcher.matches(actor) and (best is None or matcher.specificity > best[0]):
                    best = (matcher.specificity, index)
        if best is None:
            return Membership(actor, UNTRUSTED, None)
        return Membership(actor, self.members[best[1]].level, best[1])

    @cached_property
    def member_matchers(self) -> tuple[ActorPattern | Namespace, ...]:
        """The compiled selector of every member rule, in file order."""
        return tuple(m.matcher(self.trust_domain) for m in self.members)

    @cached_property
    def segment_matchers(self) -> tuple[ActorPattern | Namespace, ...]:
        """The compiled selector of every segment, in file order."""
        return tuple(s.matcher(self.trust_domain) for s in self.segments)

    def summary(self) -> str:
        """One line: counts of each kind of entry and the default."""
        return (
            f"{len(self.levels)} levels, {len(self.members)} members, "
            f"{len(self.segments)} segments, {len(self.requirements)} requirements, "
            f"default {self.default}"
        )


_JOINED = "policy cross-reference errors:\n"


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _messages(error: ValidationError) -> list[str]:
    out: list[str] = []
    items = error.errors(include_url=False)
    for item in items:
        loc = tuple(item["loc"])
        where = _location(loc)
        kind = item["type"]
        if kind == "too_short" and any(
            len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc
            for other in items
        ):
            continue  # the list is short only because its entries were refused
        message = str(item["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if message.startswith(_JOINED):
            out += message[len(_JOINED) :].splitlines()
            continue
        if kind == "extra_forbidden":
            message = "unknown key (not part of the policy format; a typo?)"
        elif kind == "missing":
            message = "is required"
        elif kind == "too_short":
            message = "must not be empty (remove the key instead, if that is what you mean)"
        out.append(f"{where}: {message}")
    return out


def parse_policy(data: Mapping[str, Any], *, source: str | None = None) -> Policy:
    """Validate an already parsed policy document.

    Raises:
        PolicyError: every problem found (pydantic's and cross-references).
    """
    raw_levels = data.get("levels")
    levels = (
        tuple(raw_levels)
        if isinstance(raw_levels, list) and all(isinstance(x, str) for x in raw_levels)
        else None
    )
    # The context only lets entries report bad references early, alongside
    # other errors; the Policy's own validator stays the authority.
    context = {"levels": levels, "trust_domain": data.get("trust_domain")}
    try:
        policy = Policy.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise PolicyError(_messages(exc), source=source) from None
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    policy._digest = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return policy


MAX_POLICY_BYTES = 4 * 1024 * 1024
"""A policy file larger than this is refused (a policy is a few kilobytes)."""


def loads_policy(text: str, *, source: str | None = None) -> Policy:
    """Parse and validate TOML text.

    Raises:
        PolicyError: the text is not TOML, or the policy is invalid.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"not valid TOML: {exc}"], source=source) from None
    except RecursionError:
        raise PolicyError(["not valid TOML: nested too deeply"], source=source) from None
    return parse_policy(data, source=source)


def load_policy(path: str | Path) -> Policy:
    """Read, parse and validate the TOML policy file at ``path``.

    Raises:
        OSError: the file cannot be read.
        PolicyError: not UTF-8, not TOML, or an invalid policy.
    """
    with Path(path).open("rb") as file:
        raw = file.read(MAX_POLICY_BYTES + 1)
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError([f"larger than {MAX_POLICY_BYTES} bytes"], source=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(["the file is not UTF-8 text"], source=str(path)) from None
    return loads_policy(text, source=str(path))
