"""Trust levels, trust elevation and micro-segmentation policy (issue 3, core).

A :class:`Policy` (TOML, see ``docs/policy.md``; YAML is not supported) ranks
trust levels, assigns them to SPIFFE IDs, quarantines segments and states
per-destination requirements. :func:`evaluate` turns a verified context into
a :class:`Decision`; :func:`check_publish` gives a producer the same answer
before it signs. Both are pure: the policy object passed in is the one
judged, so swapping it (a reload) applies to every later evaluation,
including messages that were already queued.

Runtime pieces: :class:`PolicySource` (reload on demand or on file change,
keeping the last good policy), :mod:`trusthop.policy.pdp` (an external
AuthZEN-shaped decision point, failing closed) and
:mod:`trusthop.policy.decisions` (one JSON line per decision on the
``trusthop.decisions`` logger).
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
from trusthop.policy.pdp import PdpResult, PolicyDecisionPoint, authzen_request
from trusthop.policy.source import PolicySource

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
    "PdpResult",
    "Policy",
    "PolicyDecisionPoint",
    "PolicyError",
    "PolicySource",
    "Requirement",
    "RuleResult",
    "Segment",
    "SubjectPattern",
    "authzen_request",
    "check_path",
    "check_publish",
    "decide",
    "evaluate",
    "load_policy",
    "loads_policy",
    "parse_policy",
]
