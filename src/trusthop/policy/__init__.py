"""Trust levels, trust elevation and micro-segmentation policy (issue 3, core).

A :class:`Policy` (TOML, see ``docs/policy.md``; YAML is not supported) ranks
trust levels, assigns them to SPIFFE IDs, quarantines segments and states
per-destination requirements. :func:`evaluate` turns a verified context into
a :class:`Decision`; :func:`check_publish` gives a producer the same answer
before it signs. Both are pure: the policy object passed in is the one
judged, so swapping it (a reload) applies to every later evaluation,
including messages that were already queued.
"""

from trusthop.policy.evaluate import (
    ActorLevel,
    Decision,
    PathFacts,
    RuleResult,
    check_path,
    check_publish,
    decide,
    evaluate,
)
from trusthop.policy.model import (
    UNTRUSTED,
    Member,
    Membership,
    PathRule,
    PathStep,
    Policy,
    PolicyError,
    Requirement,
    Segment,
    load_policy,
    loads_policy,
    parse_policy,
)
from trusthop.policy.patterns import ActorPattern, Glob, Namespace, SubjectPattern

__all__ = [
    "UNTRUSTED",
    "ActorLevel",
    "ActorPattern",
    "Decision",
    "Glob",
    "Member",
    "Membership",
    "Namespace",
    "PathFacts",
    "PathRule",
    "PathStep",
    "Policy",
    "PolicyError",
    "Requirement",
    "RuleResult",
    "Segment",
    "SubjectPattern",
    "check_path",
    "check_publish",
    "decide",
    "evaluate",
    "load_policy",
    "loads_policy",
    "parse_policy",
]
