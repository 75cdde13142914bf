"""trusthop.policy.evaluate: every rule kind, allow and deny, and the ways
around each rule that must not work. Every context is a really signed and
verified chain (policykit.path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policykit import (
    BILLING,
    CART,
    EVIL_GW,
    EVIL_INV,
    FRAUD,
    GW,
    INV,
    INV_DEBUG,
    INV_V2,
    PROBE,
    SHIP,
    UPPER,
    P,
    path,
    policy,
)

from trusthop.errors import Reason, TrustError
from trusthop.policy import Decision, Policy, PolicyError, evaluate, load_policy
from trusthop.verify import VerifiedContext

R = Reason
EXAMPLE = load_policy(Path(__file__).resolve().parent.parent / "examples" / "policy.toml")
ORDER = "com.example.order.created"


def judge(pol: Policy, ctx: VerifiedContext, type_: str = ORDER) -> Decision:
    return evaluate(pol, ctx, destination=ctx.destination, event_type=type_)


def denied(pol: Policy, ctx: VerifiedContext, reason: Reason, type_: str = ORDER) -> Decision:
    decision = judge(pol, ctx, type_)
    assert not decision.allowed, decision.message
    assert decision.reason is reason, decision.message
    assert decision.message
    return decision


def allowed(pol: Policy, ctx: VerifiedContext, type_: str = ORDER) -> Decision:
    decision = judge(pol, ctx, type_)
    assert decision.allowed, decision.message
    assert decision.reason is None
    return decision


# -- membership ------------------------------------------------------------------

MEMBERS = policy(
    f"""
levels = ["untrusted", "internal", "payments"]
trust_domain = "prod.example.com"
[[members]]
namespace = "shop"
level = "internal"
[[members]]
prefix = "{P}/ns/shop/sa/*"
level = "payments"
[[members]]
id = "{P}/ns/shop/sa/inventory-debug"
level = "untrusted"
[[members]]
namespace = "pay"
level = "payments"
"""
)


def test_most_specific_member_rule_wins() -> None:
    # exact id beats every prefix and the namespace
    assert MEMBERS.membership(INV_DEBUG.actor).level == "untrusted"
    assert MEMBERS.membership(INV_DEBUG.actor).rule == 2
    # a longer prefix beats the namespace (which ranks as .../ns/shop/*)
    assert MEMBERS.membership(INV.actor).level == "payments"
    assert MEMBERS.membership(INV.actor).rule == 1
    # a namespace rule applies when nothing more specific does
    assert MEMBERS.membership(f"{P}/ns/shop/other/x").level == "internal"
    assert MEMBERS.membership(f"{P}/ns/shop/other/x").rule == 0
    assert MEMBERS.membership(FRAUD.actor).level == "payments"
    assert MEMBERS.membership(FRAUD.actor).rule == 3


def test_a_short_prefix_never_overrides_a_namespace() -> None:
    # Red-team finding: `prefix = td/*` used to beat every namespace entry, so
    # a namespace demotion next to it silently never applied.
    demoting = policy(
        f"""
levels = ["untrusted", "internal", "payments"]
trust_domain = "prod.example.com"
[[members]]
prefix = "{P}/*"
level = "internal"
[[members]]
namespace = "lab"
level = "untrusted"
"""
    )
    assert demoting.membership(f"{P}/ns/lab/sa/probe").level == "untrusted"
    assert demoting.membership(f"{P}/ns/shop/sa/x").level == "internal"


def test_a_namespace_and_its_prefix_are_the_same_selection() -> None:
    with pytest.raises(PolicyError, match="selects the same actors"):
        policy(
            f"""
levels = ["untrusted", "internal", "payments"]
trust_domain = "prod.example.com"
[[members]]
prefix = "{P}/ns/lab/*"
level = "payments"
[[members]]
namespace = "lab"
level = "untrusted"
"""
        )


def test_member_rule_order_in_the_file_does_not_matter() -> None:
    reordered = policy(
        f"""
levels = ["untrusted", "internal", "payments"]
[[members]]
id = "{P}/ns/shop/sa/inventory-debug"
level = "untrusted"
[[members]]
prefix = "{P}/ns/shop/sa/*"
level = "payments"
[[members]]
prefix = "{P}/ns/shop/*"
level = "internal"
"""
    )
    assert reordered.membership(INV_DEBUG.actor).level == "untrusted"
    assert reordered.membership(INV.actor).level == "payments"


@pytest.mark.parametrize(
    "actor",
    [
        CART.actor,  # /ns/shopping is not /ns/shop
        UPPER.actor,  # /ns/Shop: case matters
        EVIL_INV.actor,  # prod.example.com.evil.org is another trust domain
        "spiffe://example.com/ns/shop/sa/inventory",
        f"{P}/shop/sa/inventory",
        "not-a-spiffe-id",
        "",
    ],
)
def test_look_alike_actors_are_untrusted(actor: str) -> None:
    membership = MEMBERS.membership(actor)
    assert (membership.level, membership.rule) == ("untrusted", None)


def test_trust_domain_confusion_across_a_whole_chain() -> None:
    strict = policy(
        """
levels = ["untrusted", "internal"]
trust_domain = "prod.example.com"
default = "allow"
[[members]]
namespace = "shop"
level = "internal"
[[members]]
namespace = "edge"
level = "internal"
[[requirements]]
destination = "*"
min_level = "internal"
"""
    )
    allowed(strict, path(GW, GW, INV))
    decision = denied(strict, path(EVIL_GW, EVIL_GW, EVIL_INV), R.INSUFFICIENT_TRUST_LEVEL)
    assert decision.weakest_level == "untrusted"
    assert {a.level for a in decision.actor_levels} == {"untrusted"}


# -- requirements: default, matching ---------------------------------------------


def test_no_matching_requirement_is_denied_by_default() -> None:
    nothing = policy('levels = ["untrusted"]')
    decision = denied(nothing, path(GW, GW), R.UNAUTHORIZED_ACTOR)
    assert "default is deny" in decision.message
    open_ = policy('levels = ["untrusted"]\ndefault = "allow"')
    assert allowed(open_, path(GW, GW)).matched_rules[0].rule == "default"


def test_a_requirement_for_another_event_type_does_not_cover_this_one() -> None:
    typed = policy(
        """
levels = ["untrusted"]
[[requirements]]
destination = "kafka:orders"
event_type = "com.example.order.*"
"""
    )
    allowed(typed, path(GW, GW))
    denied(typed, path(GW, GW), R.UNAUTHORIZED_ACTOR, type_="com.example.refund.created")
    denied(typed, path(GW, GW), R.UNAUTHORIZED_ACTOR, type_="com.example.order")
    # a requirement for a look-alike destination does not cover this one
    denied(typed, path(GW, GW, dest="kafka:orders.dlq"), R.UNAUTHORIZED_ACTOR)
    denied(typed, path(GW, GW, dest="kafka:Orders"), R.UNAUTHORIZED_ACTOR)


def test_every_matching_requirement_applies() -> None:
    both = policy(
        """
levels = ["untrusted"]
[[requirements]]
destination = "kafka:orders*"
scope = ["orders:write"]
[[requirements]]
name = "strict"
destination = "kafka:orders"
scope = ["payments:charge"]
"""
    )
    allowed(both, path(GW, GW))
    denied(both, path(GW, GW, scope=["orders:write"]), R.INSUFFICIENT_SCOPE)
    narrow = path(GW, GW, dest="kafka:orders-eu", scope=["orders:write"])
    assert [r.rule for r in allowed(both, narrow).matched_rules] == ["requirements[0].scope"]


# -- min_level ---------------------------------------------------------------------

LEVELS = policy(
    f"""
levels = ["untrusted", "internal", "payments"]
trust_domain = "prod.example.com"
[[members]]
id = "{GW.actor}"
level = "payments"
[[members]]
namespace = "pay"
level = "payments"
[[members]]
namespace = "shop"
level = "internal"
[[members]]
id = "{INV_DEBUG.actor}"
level = "untrusted"
[[requirements]]
destination = "kafka:payments"
min_level = "payments"
"""
)


def test_min_level_holds_for_every_actor_on_the_path() -> None:
    decision = allowed(LEVELS, path(GW, GW, FRAUD, BILLING, dest="kafka:payments"))
    assert decision.weakest_level == "payments"
    decision = denied(
        LEVELS, path(GW, GW, INV, BILLING, dest="kafka:payments"), R.INSUFFICIENT_TRUST_LEVEL
    )
    assert f"ring 2 {INV.actor} is internal" in decision.message
    assert decision.weakest_level == "internal"
    assert [a.level for a in decision.actor_levels] == [
        "payments",
        "payments",
        "internal",
        "payments",
    ]
    assert [a.rule for a in decision.actor_levels] == [
        "members[0]",
        "members[0]",
        "members[2]",
        "members[1]",
    ]


def test_min_level_counts_the_origin_too() -> None:
    # a shop workload that mints its own origin cannot lift itself to payments
    denied(LEVELS, path(INV, FRAUD, dest="kafka:payments"), R.INSUFFICIENT_TRUST_LEVEL)


def test_a_demoted_actor_breaks_the_chain() -> None:
    decision = denied(
        LEVELS, path(GW, GW, INV_DEBUG, BILLING, dest="kafka:payments"), R.INSUFFICIENT_TRUST_LEVEL
    )
    assert decision.weakest_level == "untrusted"


# -- publishers ----------------------------------------------------------------------

PUBLISHERS = policy(
    f"""
levels = ["untrusted"]
[[requirements]]
destination = "amqp:shipping/*"
publishers = ["{INV.actor}"]
[[requirements]]
destination = "kafka:audit"
publishers = ["{P}/ns/shop/sa/inventory/*"]
"""
)


def test_only_listed_publishers_may_publish() -> None:
    allowed(PUBLISHERS, path(GW, GW, INV, dest="amqp:shipping/order.reserved"))
    for sibling in (INV_DEBUG, INV_V2, UPPER, CART):
        decision = denied(
            PUBLISHERS, path(GW, GW, sibling, dest="amqp:shipping/x"), R.UNAUTHORIZED_ACTOR
        )
        assert f"{sibling.actor} may not publish here" in decision.message


def test_publisher_is_the_newest_ring_not_an_earlier_one() -> None:
    # the allowed publisher upstream does not let another actor publish
    denied(PUBLISHERS, path(GW, GW, INV, SHIP, dest="amqp:shipping/x"), R.UNAUTHORIZED_ACTOR)


def test_a_prefix_publisher_does_not_match_a_sibling_name() -> None:
    allowed(PUBLISHERS, path(GW, GW, INV, dest="kafka:audit"))
    allowed(PUBLISHERS, path(GW, GW, INV_V2, dest="kafka:audit"))
    denied(PUBLISHERS, path(GW, GW, INV_DEBUG, dest="kafka:audit"), R.UNAUTHORIZED_ACTOR)


# -- scope --------------------------------------------------------------------------


def test_scope_must_hold_every_required_entry() -> None:
    scoped = policy(
        """
levels = ["untrusted"]
[[requirements]]
destination = "kafka:orders"
scope = ["orders:write", "audit:write"]
"""
    )
    allowed(scoped, path(GW, GW))
    decision = denied(scoped, path(GW, GW, scope=["orders:write"]), R.INSUFFICIENT_SCOPE)
    assert "lacks audit:write" in decision.message
    # a scope that only looks like the required one does not count
    denied(scoped, path(GW, GW, scope=["orders:write*", "audit:*"]), R.INSUFFICIENT_SCOPE)
    denied(scoped, path(GW, GW, scope=["Orders:Write", "audit:write"]), R.INSUFFICIENT_SCOPE)


# -- subjects -------------------------------------------------------------------------

SUBJECTS = policy(
    """
levels = ["untrusted"]
[[requirements]]
destination = "kafka:orders"
subjects = ["user:*", "service:billing"]
"""
)


@pytest.mark.parametrize("subject", ["user:alice", "user:x:y", "service:billing"])
def test_accepted_subjects(subject: str) -> None:
    allowed(SUBJECTS, path(GW, GW, subject=subject))


@pytest.mark.parametrize(
    "subject",
    [
        "user:",
        "user",
        "users:alice",
        "useradmin:alice",
        "User:alice",
        " user:alice",
        "service:billing-admin",
        "service:billing:refunds",
        "service:billin",
        "service:*",
        "admin",
    ],
)
def test_subject_prefix_tricks_are_denied(subject: str) -> None:
    denied(SUBJECTS, path(GW, GW, subject=subject), R.SUBJECT_DENIED)


# -- segments ------------------------------------------------------------------------

QUARANTINE = f"""
levels = ["untrusted", "internal"]
trust_domain = "prod.example.com"
default = "allow"
[[members]]
prefix = "{P}/*"
level = "internal"
[[segments]]
name = "lab"
namespace = "lab"
[[segments]]
name = "logistics-to-payments"
prefix = "{P}/ns/logistics/*"
deny = ["kafka:payments*"]
[[segments]]
name = "no-fraud-refunds"
id = "{FRAUD.actor}"
deny = ["*"]
event_types = ["com.example.refund.*"]
"""


def test_an_actor_of_a_quarantined_segment_anywhere_on_the_path_denies() -> None:
    pol = policy(QUARANTINE)
    allowed(pol, path(GW, GW, INV, SHIP))
    decision = denied(pol, path(GW, GW, PROBE, INV, SHIP), R.SEGMENT_QUARANTINED)
    assert f"ring 2 {PROBE.actor}" in decision.message
    denied(pol, path(PROBE, PROBE, INV), R.SEGMENT_QUARANTINED)  # at the origin
    denied(pol, path(GW, GW, PROBE), R.SEGMENT_QUARANTINED)  # as the publisher


def test_a_segment_is_checked_before_any_requirement_and_even_under_default_allow() -> None:
    pol = policy(QUARANTINE)
    # the lab actor is also "internal" by membership: quarantine does not care
    assert pol.membership(PROBE.actor).level == "internal"
    decision = denied(pol, path(GW, GW, PROBE, dest="kafka:nowhere"), R.SEGMENT_QUARANTINED)
    assert decision.matched_rules[0].rule == "segments[0] (lab)"


def test_a_segment_denies_only_its_destinations_and_event_types() -> None:
    pol = policy(QUARANTINE)
    allowed(pol, path(GW, GW, SHIP, dest="kafka:audit"))
    denied(pol, path(GW, GW, SHIP, INV, dest="kafka:payments-eu"), R.SEGMENT_QUARANTINED)
    allowed(pol, path(GW, GW, FRAUD, dest="kafka:payments"))
    denied(
        pol,
        path(GW, GW, FRAUD, INV, dest="kafka:payments"),
        R.SEGMENT_QUARANTINED,
        type_="com.example.refund.created",
    )


def test_a_segment_does_not_catch_look_alike_namespaces() -> None:
    pol = policy(
        """
levels = ["untrusted"]
trust_domain = "prod.example.com"
default = "allow"
[[segments]]
name = "shop"
namespace = "shop"
"""
    )
    allowed(pol, path(GW, GW, CART, UPPER))
    allowed(pol, path(EVIL_GW, EVIL_GW, EVIL_INV))
    denied(pol, path(GW, GW, CART, INV_V2), R.SEGMENT_QUARANTINED)


def test_swapping_the_policy_judges_the_same_context_by_the_new_rule() -> None:
    before = policy(QUARANTINE.replace('namespace = "lab"', 'namespace = "lab2"'))
    after = policy(QUARANTINE.replace('namespace = "lab"', 'namespace = "shop"'))
    waiting = path(GW, GW, INV, SHIP)  # verified once, judged twice
    allowed(before, waiting)
    denied(after, waiting, R.SEGMENT_QUARANTINED)
    allowed(before, waiting)


# -- path -----------------------------------------------------------------------------

PATHS = policy(
    f"""
levels = ["untrusted"]
[[requirements]]
destination = "kafka:audit"
[requirements.path]
origin = ["{GW.actor}"]
[[requirements.path.steps]]
name = "inventory"
actors = ["{INV.actor}"]
[[requirements.path.steps]]
name = "fraud"
actors = ["{FRAUD.actor}"]
optional = true
[[requirements.path.steps]]
name = "shipping"
actors = ["{P}/ns/logistics/*"]
[[requirements]]
destination = "kafka:orders"
[requirements.path]
origin = ["{GW.actor}"]
"""
)


def path_denied(ctx: VerifiedContext) -> str:
    return denied(PATHS, ctx, R.PATH_VIOLATION).message


def test_path_in_order_with_and_without_the_optional_step() -> None:
    allowed(PATHS, path(GW, GW, INV, SHIP, dest="kafka:audit"))
    allowed(PATHS, path(GW, GW, INV, FRAUD, SHIP, dest="kafka:audit"))
    allowed(PATHS, path(GW, GW, dest="kafka:orders"))


def test_path_missing_required_step() -> None:
    message = path_denied(path(GW, GW, INV, FRAUD, dest="kafka:audit"))
    assert "required step 'shipping'" in message and "missing" in message
    message = path_denied(path(GW, GW, FRAUD, SHIP, dest="kafka:audit"))
    assert f"ring 2: {FRAUD.actor} does not match step 'inventory'" in message


def test_path_extra_unexpected_actor() -> None:
    message = path_denied(path(GW, GW, INV, SHIP, SHIP, dest="kafka:audit"))
    assert f"ring 4: {SHIP.actor} is an unexpected extra hop" in message
    message = path_denied(path(GW, GW, INV, CART, SHIP, dest="kafka:audit"))
    assert f"ring 3: {CART.actor} does not match step 'fraud'" in message
    assert "or 'shipping'" in message
    # an extra hop before the first step
    path_denied(path(GW, GW, CART, INV, SHIP, dest="kafka:audit"))
    # the origin's own hop counts once; a second gateway hop is an extra one
    path_denied(path(GW, GW, GW, INV, SHIP, dest="kafka:audit"))
    path_denied(path(GW, GW, INV, dest="kafka:orders"))


def test_path_reordered_steps() -> None:
    path_denied(path(GW, GW, SHIP, INV, dest="kafka:audit"))
    path_denied(path(GW, GW, INV, SHIP, FRAUD, dest="kafka:audit"))


def test_path_wrong_origin() -> None:
    message = path_denied(path(INV, INV, SHIP, dest="kafka:audit"))
    assert message.endswith(f"ring 0: origin {INV.actor} is not one of {GW.actor}")
    path_denied(path(CART, CART, dest="kafka:orders"))


def test_path_without_the_origins_own_hop_matches_ring_1_against_the_steps() -> None:
    # ring 1 is signed by inventory directly on the gateway's origin ring
    allowed(PATHS, path(GW, INV, SHIP, dest="kafka:audit"))


def test_path_backtracks_over_an_optional_step() -> None:
    pol = policy(
        f"""
levels = ["untrusted"]
[[requirements]]
destination = "kafka:x"
[requirements.path]
origin = ["{GW.actor}"]
[[requirements.path.steps]]
name = "maybe"
actors = ["{P}/ns/shop/*"]
optional = true
[[requirements.path.steps]]
name = "must"
actors = ["{INV.actor}"]
"""
    )
    allowed(pol, path(GW, GW, INV, dest="kafka:x"))  # greedy matching would fail here
    allowed(pol, path(GW, GW, INV_V2, INV, dest="kafka:x"))
    denied(pol, path(GW, GW, INV_V2, dest="kafka:x"), R.PATH_VIOLATION)


def test_listing_the_edge_as_a_step_as_well_needs_a_second_edge_hop() -> None:
    pol = policy(
        f"""
levels = ["untrusted"]
[[requirements]]
destination = "kafka:x"
[requirements.path]
origin = ["{GW.actor}"]
[[requirements.path.steps]]
actors = ["{GW.actor}"]
"""
    )
    message = denied(pol, path(GW, GW, dest="kafka:x"), R.PATH_VIOLATION).message
    assert "required step steps[0]" in message


# -- decisions ------------------------------------------------------------------------


def test_reason_order_and_every_rule_recorded() -> None:
    pol = policy(
        f"""
levels = ["untrusted", "internal"]
[[requirements]]
name = "all"
destination = "kafka:orders"
publishers = ["{INV.actor}"]
min_level = "internal"
scope = ["nope"]
subjects = ["service:*"]
[requirements.path]
origin = ["{INV.actor}"]
"""
    )
    decision = denied(pol, path(GW, GW), R.UNAUTHORIZED_ACTOR)
    assert [(r.rule, r.reason) for r in decision.matched_rules] == [
        ("requirements[0] (all).publishers", R.UNAUTHORIZED_ACTOR),
        ("requirements[0] (all).path", R.PATH_VIOLATION),
        ("requirements[0] (all).min_level", R.INSUFFICIENT_TRUST_LEVEL),
        ("requirements[0] (all).scope", R.INSUFFICIENT_SCOPE),
        ("requirements[0] (all).subjects", R.SUBJECT_DENIED),
    ]
    assert decision.message.startswith("requirements[0] (all).publishers: ")
    with pytest.raises(TrustError) as info:
        decision.raise_if_denied()
    assert info.value.reason is R.UNAUTHORIZED_ACTOR


def test_decision_serialises_to_json() -> None:
    ctx = path(GW, GW, dest="kafka:orders")
    decision = allowed(EXAMPLE, ctx)
    document = json.loads(json.dumps(decision.to_json()))
    assert document["allowed"] is True and document["reason"] is None
    assert document["weakest_level"] == "payments"
    assert document["actor_levels"][0] == {
        "ring": 0,
        "actor": GW.actor,
        "level": "payments",
        "rule": "members[0]",
    }
    assert {r["rule"] for r in document["matched_rules"]} >= {
        "requirements[0] (orders).publishers",
        "requirements[0] (orders).path",
    }
    decision.raise_if_denied()  # no-op


# -- the example policy, on the demo's path ------------------------------------------


def test_example_policy_allows_the_demo_flow() -> None:
    ship_scope = ["shipping:create", "audit:write"]
    allowed(EXAMPLE, path(GW, GW, dest="kafka:orders"))
    allowed(
        EXAMPLE,
        path(GW, GW, INV, dest="amqp:shipping/order.reserved", scope=ship_scope),
        type_="com.example.inventory.reserved",
    )
    allowed(EXAMPLE, path(GW, GW, INV, SHIP, dest="kafka:audit"), type_="x")
    allowed(EXAMPLE, path(GW, GW, INV, FRAUD, SHIP, dest="kafka:audit"), type_="x")


def test_example_policy_denies_each_kind_of_violation() -> None:
    denied(EXAMPLE, path(GW, GW, dest="kafka:unknown"), R.UNAUTHORIZED_ACTOR)
    denied(EXAMPLE, path(GW, GW, dest="kafka:orders"), R.UNAUTHORIZED_ACTOR, type_="other")
    denied(EXAMPLE, path(GW, GW, dest="kafka:orders", scope=["x"]), R.INSUFFICIENT_SCOPE)
    denied(EXAMPLE, path(GW, GW, dest="kafka:orders", subject="admin"), R.SUBJECT_DENIED)
    denied(EXAMPLE, path(GW, GW, INV_DEBUG, dest="amqp:shipping/x"), R.UNAUTHORIZED_ACTOR)
    denied(EXAMPLE, path(GW, GW, SHIP, dest="kafka:audit"), R.PATH_VIOLATION)
    denied(EXAMPLE, path(GW, GW, INV, PROBE, SHIP, dest="kafka:audit"), R.SEGMENT_QUARANTINED)
    denied(
        EXAMPLE,
        path(GW, GW, INV, BILLING, dest="kafka:payments", subject="service:billing"),
        R.INSUFFICIENT_TRUST_LEVEL,
    )
    allowed(EXAMPLE, path(GW, GW, BILLING, dest="kafka:payments", subject="service:billing"))
