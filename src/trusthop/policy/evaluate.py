"""Policy evaluation: a verified path in, a :class:`Decision` out (pure, no I/O).

:func:`evaluate` judges what a consumer received (a
:class:`~trusthop.verify.VerifiedContext`); :func:`check_publish` judges what
a producer is about to sign, as the consumer of that event would judge it,
so both give the same reason code. Membership is read from the policy passed
in, at call time: a message queued before an actor was demoted or
quarantined is judged by the rule in force when it is evaluated.

Rules are evaluated in a fixed order and all of them are recorded (so
``policy explain`` can show every rule); the decision's reason is the first
denying rule's:

1. every segment whose ``deny``/``event_types`` match the action:
   ``segment_quarantined`` when an actor it selects is anywhere on the path;
2. when no requirement applies: the policy ``default`` (``deny`` gives
   ``unauthorized_actor``: nobody may publish there);
3. each applying requirement, in file order: ``publishers``
   (``unauthorized_actor``, judged on the newest ring's actor), ``path``
   (``path_violation``), ``min_level`` (``insufficient_trust_level``, judged
   on every ring's actor, the origin's included), ``scope``
   (``insufficient_scope``, judged on the effective scope), ``subjects``
   (``subject_denied``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trusthop.chain import Chain
from trusthop.errors import Reason, TrustError
from trusthop.policy.model import Membership, PathRule, Policy, Requirement
from trusthop.verify import VerifiedContext


@dataclass(frozen=True, slots=True)
class ActorLevel:
    """The level of the actor of ring ``ring`` and the member rule that gave it."""

    ring: int
    actor: str
    level: str
    rule: str | None

    def to_json(self) -> dict[str, Any]:
        return {"ring": self.ring, "actor": self.actor, "level": self.level, "rule": self.rule}


@dataclass(frozen=True, slots=True)
class RuleResult:
    """One rule that applied to the action, and what it concluded."""

    rule: str
    allowed: bool
    reason: Reason | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "allowed": self.allowed,
            "reason": None if self.reason is None else self.reason.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a policy evaluation.

    ``reason`` and ``message`` are the first denying rule's (``None`` and a
    summary when allowed); ``weakest_level`` is the lowest level held by
    any actor on the path; ``actor_levels`` has one entry per ring, oldest
    first; ``matched_rules`` every rule that applied, in evaluation order.
    Holds no credential, so it can be logged as is (:meth:`to_json`).
    """

    allowed: bool
    reason: Reason | None
    message: str
    weakest_level: str
    actor_levels: tuple[ActorLevel, ...]
    matched_rules: tuple[RuleResult, ...]
    destination: str
    event_type: str

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly data (for CLI output and a decision log)."""
        return {
            "allowed": self.allowed,
            "reason": None if self.reason is None else self.reason.value,
            "message": self.message,
            "destination": self.destination,
            "event_type": self.event_type,
            "weakest_level": self.weakest_level,
            "actor_levels": [a.to_json() for a in self.actor_levels],
            "matched_rules": [r.to_json() for r in self.matched_rules],
        }

    def raise_if_denied(self) -> None:
        """Raises TrustError(reason, message) when the decision is a deny."""
        if not self.allowed:
            assert self.reason is not None
            raise TrustError(self.reason, self.message)


@dataclass(frozen=True, slots=True)
class PathFacts:
    """What policy judges: the subject, every ring's actor (origin first) and
    the effective scope. Built from a verified context or, on the producer
    side, from the parent chain plus the ring about to be signed."""

    subject: str
    actors: tuple[str, ...]
    scope: frozenset[str]

    def __post_init__(self) -> None:
        if not self.actors:
            raise ValueError("a path has at least the origin's actor")

    @classmethod
    def of_context(cls, context: VerifiedContext) -> PathFacts:
        return cls(context.subject, context.actors, context.scope)

    @classmethod
    def of_publish(
        cls,
        parent: VerifiedContext | Chain,
        *,
        actor: str,
        scope: Iterable[str] | None = None,
    ) -> PathFacts:
        """The path as it will be once ``actor`` signs a hop onto ``parent``;
        ``scope`` defaults to the parent's newest ring's scope."""
        chain = parent.chain if isinstance(parent, VerifiedContext) else parent
        if isinstance(scope, str):
            raise TypeError("scope is a collection of strings, not one string")
        effective = chain.newest.scope if scope is None else frozenset(scope)
        actors = (*(r.actor for r in chain.rings), actor)
        return cls(chain.origin.subject, actors, effective)


def _quote(patterns: Sequence[object]) -> str:
    return ", ".join(str(p) for p in patterns)


def _requirement_label(index: int, requirement: Requirement) -> str:
    name = f" ({requirement.name})" if requirement.name else ""
    return f"requirements[{index}]{name}"


def check_path(rule: PathRule, actors: Sequence[str]) -> str | None:
    """``None`` if ``actors`` (every ring's, origin first) follows ``rule``,
    else a sentence saying where it departs from it.

    Ring 0 must match ``rule.origin``; ring 1 belongs to the origin step when
    it is signed by ring 0's actor; every later ring matches exactly one
    step, in order; optional steps may be skipped, required ones may not;
    no ring may be left over.
    """
    origin = actors[0]
    if not any(p.matches(origin) for p in rule.origin):
        return f"ring 0: origin {origin} is not one of {_quote(rule.origin)}"
    start = 2 if len(actors) > 1 and actors[1] == origin else 1
    rest = actors[start:]
    steps = rule.steps
    n, m = len(rest), len(steps)
    reached = {(0, 0)}
    frontier = [(0, 0)]
    while frontier:
        i, j = frontier.pop()
        if j == m:
            continue
        successors = []
        if steps[j].optional:
            successors.append((i, j + 1))
        if i < n and any(p.matches(rest[i]) for p in steps[j].actors):
            successors.append((i + 1, j + 1))
        for state in successors:
            if state not in reached:
                reached.add(state)
                frontier.append(state)
    if (n, m) in reached:
        return None
    furthest = max(i for i, _ in reached)
    if furthest == n:
        j = max(j for i, j in reached if i == n)
        missing = next(k for k in range(j, m) if not steps[k].optional)
        last = len(actors) - 1
        return (
            f"required step {_step_name(rule, missing)} is missing (the path ends at ring {last})"
        )
    ring = start + furthest
    expected = sorted({j for i, j in reached if i == furthest and j < m})
    if not expected:
        return f"ring {ring}: {rest[furthest]} is an unexpected extra hop after the last step"
    names = " or ".join(_step_name(rule, j) for j in expected)
    return f"ring {ring}: {rest[furthest]} does not match step {names}"


def _step_name(rule: PathRule, index: int) -> str:
    step = rule.steps[index]
    label = repr(step.name) if step.name else f"steps[{index}]"
    return f"{label} ({_quote(step.actors)})"


def _check_requirement(
    policy: Policy,
    label: str,
    requirement: Requirement,
    facts: PathFacts,
    levels: Sequence[Membership],
) -> list[RuleResult]:
    results: list[RuleResult] = []
    if requirement.publishers is not None:
        publisher = facts.actors[-1]
        if any(p.matches(publisher) for p in requirement.publishers):
            results.append(
                RuleResult(f"{label}.publishers", True, None, f"{publisher} may publish here")
            )
        else:
            results.append(
                RuleResult(
                    f"{label}.publishers",
                    False,
                    Reason.UNAUTHORIZED_ACTOR,
                    f"{publisher} may not publish here (publishers: "
                    f"{_quote(requirement.publishers)})",
                )
            )
    if requirement.path is not None:
        problem = check_path(requirement.path, facts.actors)
        results.append(
            RuleResult(
                f"{label}.path",
                problem is None,
                None if problem is None else Reason.PATH_VIOLATION,
                problem or "the path follows the required origin and steps",
            )
        )
    if requirement.min_level is not None:
        needed = policy.rank(requirement.min_level)
        below = [
            f"ring {index} {m.actor} is {m.level}"
            for index, m in enumerate(levels)
            if policy.rank(m.level) < needed
        ]
        results.append(
            RuleResult(
                f"{label}.min_level",
                not below,
                Reason.INSUFFICIENT_TRUST_LEVEL if below else None,
                (f"needs {requirement.min_level}: " + "; ".join(below))
                if below
                else f"every actor holds at least {requirement.min_level}",
            )
        )
    if requirement.scope:
        missing = sorted(set(requirement.scope) - facts.scope)
        results.append(
            RuleResult(
                f"{label}.scope",
                not missing,
                Reason.INSUFFICIENT_SCOPE if missing else None,
                f"the effective scope lacks {', '.join(missing)}"
                if missing
                else f"the effective scope holds {', '.join(sorted(requirement.scope))}",
            )
        )
    if requirement.subjects is not None:
        ok = any(p.matches(facts.subject) for p in requirement.subjects)
        results.append(
            RuleResult(
                f"{label}.subjects",
                ok,
                None if ok else Reason.SUBJECT_DENIED,
                f"subject {facts.subject!r} "
                + ("is accepted" if ok else f"is not one of {_quote(requirement.subjects)}"),
            )
        )
    if not results:
        results.append(RuleResult(label, True, None, "allows this destination unconditionally"))
    return results


def decide(policy: Policy, facts: PathFacts, *, destination: str, event_type: str) -> Decision:
    """Judge ``facts`` for ``destination`` and ``event_type`` (see module docstring).

    Never raises: a deny is a decision (``facts`` cannot be empty, see
    :class:`PathFacts`).
    """
    levels = [policy.membership(actor) for actor in facts.actors]
    actor_levels = tuple(
        ActorLevel(index, m.actor, m.level, None if m.rule is None else f"members[{m.rule}]")
        for index, m in enumerate(levels)
    )
    weakest = min((m.level for m in levels), key=policy.rank)
    results: list[RuleResult] = []
    for index, segment in enumerate(policy.segments):
        if not (
            any(g.matches(destination) for g in segment.deny)
            and any(g.matches(event_type) for g in segment.event_types)
        ):
            continue
        matcher = policy.segment_matchers[index]
        inside = [f"ring {i} {a}" for i, a in enumerate(facts.actors) if matcher.matches(a)]
        label = f"segments[{index}] ({segment.name})"
        results.append(
            RuleResult(
                label,
                not inside,
                Reason.SEGMENT_QUARANTINED if inside else None,
                f"quarantined segment {segment.name!r} ({segment.describe()}) is on the path: "
                + ", ".join(inside)
                if inside
                else f"no actor on the path is in segment {segment.name!r}",
            )
        )
    applying = [
        (index, r)
        for index, r in enumerate(policy.requirements)
        if r.applies(destination=destination, event_type=event_type)
    ]
    if not applying:
        deny = policy.default == "deny"
        results.append(
            RuleResult(
                "default",
                not deny,
                Reason.UNAUTHORIZED_ACTOR if deny else None,
                f"no requirement covers {destination} / {event_type}; "
                f"the policy default is {policy.default}",
            )
        )
    for index, requirement in applying:
        label = _requirement_label(index, requirement)
        results += _check_requirement(policy, label, requirement, facts, levels)
    denied = next((r for r in results if not r.allowed), None)
    if denied is None:
        applied = ", ".join(_requirement_label(i, r) for i, r in applying) or "the default"
        message = f"allowed by {applied}; weakest level {weakest}"
    else:
        message = f"{denied.rule}: {denied.detail}"
    return Decision(
        allowed=denied is None,
        reason=None if denied is None else denied.reason,
        message=message,
        weakest_level=weakest,
        actor_levels=actor_levels,
        matched_rules=tuple(results),
        destination=destination,
        event_type=event_type,
    )


def evaluate(
    policy: Policy, context: VerifiedContext, *, destination: str, event_type: str
) -> Decision:
    """Judge a verified delivery consumed from ``destination``.

    ``context`` must come from the verifier: policy trusts its actors,
    subject and scope. Pure; never raises (a deny is a decision).
    """
    return decide(
        policy, PathFacts.of_context(context), destination=destination, event_type=event_type
    )


def check_publish(
    policy: Policy,
    parent: VerifiedContext | Chain,
    *,
    actor: str,
    destination: str,
    event_type: str,
    scope: Iterable[str] | None = None,
) -> Decision:
    """Judge, before signing, the event ``actor`` is about to publish.

    ``parent`` is the chain the new hop extends (``Chain(origin)`` for the
    first event at the edge); ``scope`` the hop's scope (default: the
    parent's newest). The decision is the one a consumer of that event,
    reading from ``destination``, would reach under the same policy.

    Raises:
        TypeError: ``scope`` is one string rather than a collection.
    """
    facts = PathFacts.of_publish(parent, actor=actor, scope=scope)
    return decide(policy, facts, destination=destination, event_type=event_type)
