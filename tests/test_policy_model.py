"""trusthop.policy: the file format, its validation and the matchers."""

from __future__ import annotations

from pathlib import Path

import pytest
from policykit import CART, EVIL_INV, INV, INV_DEBUG, INV_V2, UPPER, P, policy

from trusthop.policy import (
    ActorPattern,
    Glob,
    Namespace,
    PolicyError,
    SubjectPattern,
    load_policy,
    loads_policy,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.toml"


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        loads_policy(text)
    assert info.value.errors
    assert isinstance(info.value, ValueError)
    return info.value.errors


def test_the_example_policy_loads() -> None:
    loaded = load_policy(EXAMPLE)
    assert loaded.levels == ("untrusted", "internal", "payments")
    assert loaded.default == "deny"
    assert loaded.summary() == ("3 levels, 5 members, 1 segments, 4 requirements, default deny")


def test_minimal_policy_defaults_to_deny() -> None:
    loaded = policy('levels = ["untrusted"]')
    assert loaded.default == "deny"
    assert loaded.version == 1
    assert (loaded.members, loaded.segments, loaded.requirements) == ((), (), ())


def test_policy_is_immutable() -> None:
    loaded = load_policy(EXAMPLE)
    with pytest.raises(ValueError, match="frozen"):
        loaded.default = "allow"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loaded.levels.append("x")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('levels = ["internal"]', "levels: the first (lowest) level must be 'untrusted'"),
        ("levels = []", "levels: must not be empty"),
        ("", "levels: is required"),
        ('levels = ["untrusted", "a", "a"]', "levels[2]: 'a' is listed twice"),
        ('levels = ["untrusted", " a"]', "levels[1]: ' a' is not a level name"),
        ('levels = ["untrusted"]\nversion = 2', "version: "),
        ('levels = ["untrusted"]\ndefault = "maybe"', "default: "),
        ('levels = ["untrusted"]\ndefualt = "allow"', "defualt: unknown key"),
        ('levels = ["untrusted"]\ntrust_domain = "Prod.example.com"', "trust_domain: "),
        (
            'levels = ["untrusted"]\n[[members]]\nid = "spiffe://prod.example.com/a"\n'
            'level = "gold"',
            "members[0].level: unknown level 'gold' (levels: untrusted)",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nprefix = "spiffe://prod.example.com/ns/shop"\n'
            'level = "untrusted"',
            "members[0].prefix: 'spiffe://prod.example.com/ns/shop': a prefix ends in '/*'",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nid = "spiffe://prod.example.com/ns/*"\n'
            'level = "untrusted"',
            "members[0].id: 'spiffe://prod.example.com/ns/*': an id is one exact SPIFFE ID",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nid = "spiffe://PROD.example.com/a"\n'
            'level = "untrusted"',
            "members[0].id: 'spiffe://PROD.example.com/a' is not a SPIFFE ID or prefix: "
            "a trust domain uses only lowercase",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nid = "spiffe://prod.example.com/a"\n'
            'prefix = "spiffe://prod.example.com/*"\nlevel = "untrusted"',
            "members[0]: give exactly one of id, prefix or namespace (found: id, prefix)",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nlevel = "untrusted"',
            "members[0]: give exactly one of id, prefix or namespace (found: none)",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nnamespace = "shop"\nlevel = "untrusted"',
            "members[0]: namespace 'shop' needs a trust_domain",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nnamespace = "shop/sa"\n'
            'trust_domain = "prod.example.com"\nlevel = "untrusted"',
            "members[0].namespace: namespace 'shop/sa' must be a single path segment",
        ),
        (
            'levels = ["untrusted"]\n[[members]]\nid = "spiffe://prod.example.com/a"\n'
            'trust_domain = "prod.example.com"\nlevel = "untrusted"',
            "members[0]: trust_domain only goes with namespace",
        ),
        (
            'levels = ["untrusted", "a"]\ntrust_domain = "prod.example.com"\n'
            '[[members]]\nnamespace = "shop"\nlevel = "a"\n'
            '[[members]]\nnamespace = "shop"\ntrust_domain = "prod.example.com"\nlevel = "a"',
            "members[1]: selects the same actors as members[0] (ambiguous level)",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\nmin_level = "gold"',
            "requirements[0].min_level: unknown level 'gold' (levels: untrusted)",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\n'
            'min_levle = "untrusted"',
            "requirements[0].min_levle: unknown key",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = ""',
            "requirements[0].destination: a pattern is a non-empty string",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\nmin_level = "untrusted"',
            "requirements[0].destination: is required",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\npublishers = []',
            "requirements[0].publishers: must not be empty",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\n'
            'publishers = ["spiffe://prod.example.com/ns/*/sa/x"]',
            "requirements[0].publishers[0]: 'spiffe://prod.example.com/ns/*/sa/x': '*' is "
            "only allowed as a whole last segment",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\n'
            'subjects = ["us*er:"]',
            "requirements[0].subjects[0]: 'us*er:': '*' is only allowed at the end",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\n'
            "[requirements.path]\norigin = []",
            "requirements[0].path.origin: must not be empty",
        ),
        (
            'levels = ["untrusted"]\n[[requirements]]\ndestination = "kafka:x"\n'
            '[requirements.path]\norigin = ["spiffe://prod.example.com/a"]\n'
            '[[requirements.path.steps]]\nactors = ["spiffe://prod.example.com/b"]\n'
            'optional = "yes"',
            "requirements[0].path.steps[0].optional: ",
        ),
        (
            'levels = ["untrusted"]\n[[segments]]\nname = "lab"\nnamespace = "lab"\n'
            'trust_domain = "prod.example.com"\ndeny = []',
            "segments[0].deny: must not be empty",
        ),
        (
            'levels = ["untrusted"]\ntrust_domain = "prod.example.com"\n'
            '[[segments]]\nname = "lab"\nnamespace = "lab"\n'
            '[[segments]]\nname = "lab"\nnamespace = "lab2"',
            "segments[1].name: 'lab' is also segments[0]",
        ),
        ("levels = [", "not valid TOML: "),
    ],
)
def test_errors_name_the_entry_and_say_what_is_wrong(text: str, expected: str) -> None:
    found = errors_of(text)
    assert any(e.startswith(expected) for e in found), found


def test_every_error_is_reported_at_once() -> None:
    text = """
levels = ["untrusted", "internal"]
[[members]]
id = "spiffe://prod.example.com/a"
level = "gold"
[[requirements]]
destination = "kafka:a"
min_level = "silver"
[[requirements]]
destination = "kafka:b"
min_level = "bronze"
"""
    assert errors_of(text) == [
        "members[0].level: unknown level 'gold' (levels: untrusted, internal)",
        "requirements[0].min_level: unknown level 'silver' (levels: untrusted, internal)",
        "requirements[1].min_level: unknown level 'bronze' (levels: untrusted, internal)",
    ]


def test_load_policy_failures(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_policy(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(binary)
    bad = tmp_path / "bad.toml"
    bad.write_text('levels = ["gold"]\n')
    with pytest.raises(PolicyError) as info:
        load_policy(bad)
    assert str(bad) in str(info.value)
    assert info.value.source == str(bad)


# -- matchers ------------------------------------------------------------------


def test_prefix_is_segment_aware() -> None:
    shop = ActorPattern.parse(f"{P}/ns/shop/*")
    assert shop.matches(f"{P}/ns/shop")
    assert shop.matches(INV.actor)
    assert shop.matches(INV_V2.actor)
    assert not shop.matches(CART.actor)  # /ns/shopping
    assert not shop.matches(f"{P}/ns/shop-x/sa/a")
    assert not shop.matches(f"{P}/ns")
    assert not shop.matches(UPPER.actor)  # /ns/Shop: paths are case-sensitive
    assert not shop.matches(EVIL_INV.actor)  # prod.example.com.evil.org
    assert not shop.matches("spiffe://example.com/ns/shop/sa/a")
    assert not shop.matches("not a spiffe id")
    assert not shop.matches(f"{P}/ns/shop/")  # not a valid SPIFFE ID


def test_exact_pattern_matches_one_id_only() -> None:
    inventory = ActorPattern.parse(INV.actor)
    assert inventory.matches(INV.actor)
    for sibling in (INV_DEBUG.actor, INV_V2.actor, UPPER.actor, EVIL_INV.actor, f"{P}/ns/shop"):
        assert not inventory.matches(sibling)


def test_whole_trust_domain_prefix() -> None:
    everything = ActorPattern.parse(f"{P}/*")
    assert everything.matches(INV.actor)
    assert everything.matches(P)
    assert not everything.matches(EVIL_INV.actor)
    assert str(everything) == f"{P}/*"


@pytest.mark.parametrize(
    "bad",
    [
        "spiffe://prod.example.com/ns/*/sa/a",
        "spiffe://prod.example.com/ns/shop*",
        "spiffe://prod.example.com/*/*",
        "spiffe://*",
        "spiffe://Prod.example.com/a",
        "SPIFFE://prod.example.com/a",
        "spiffe://prod.example.com/a/",
        "spiffe://prod.example.com/a/../b",
        "https://prod.example.com/a",
        "",
        7,
    ],
)
def test_invalid_actor_patterns_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        ActorPattern.parse(bad)


def test_namespace_matches_the_kubernetes_convention_only() -> None:
    shop = Namespace.parse(trust_domain="prod.example.com", name="shop")
    assert shop.matches(INV.actor)
    assert shop.matches(f"{P}/ns/shop")
    for other in (
        CART.actor,  # /ns/shopping
        UPPER.actor,  # /ns/Shop
        EVIL_INV.actor,  # other trust domain whose name starts with ours
        f"{P}/shop/sa/a",
        f"{P}/nss/shop/sa/a",
        f"{P}/x/ns/shop/sa/a",
        f"{P}/ns",
    ):
        assert not shop.matches(other), other


def test_globs_only_know_star() -> None:
    orders = Glob.parse("kafka:orders*")
    assert orders.matches("kafka:orders")
    assert orders.matches("kafka:orders-eu.v2")
    assert not orders.matches("kafka:order")
    assert not orders.matches("kafka:ORDERS")
    assert not orders.matches("xkafka:orders")
    literal = Glob.parse("amqp:x/[a]?.+")
    assert literal.matches("amqp:x/[a]?.+")
    assert not literal.matches("amqp:x/a!.+")
    exact = Glob.parse("kafka:orders")
    assert not exact.matches("kafka:orders.dlq")
    assert not exact.matches("kafka:orders\n")
    assert Glob.parse("*").matches("amqp:shipping/order.reserved")


def test_subject_patterns() -> None:
    users = SubjectPattern.parse("user:*")
    assert users.matches("user:alice")
    for other in ("user:", "user", "users:alice", "useradmin:x", "User:alice", "xuser:alice"):
        assert not users.matches(other), other
    billing = SubjectPattern.parse("service:billing")
    assert billing.matches("service:billing")
    for other in (
        "service:billing-admin",
        "service:billing:x",
        "service:billin",
        "Service:billing",
    ):
        assert not billing.matches(other), other
    anyone = SubjectPattern.parse("*")
    assert anyone.matches("x")
    assert not anyone.matches("")
    with pytest.raises(ValueError):
        SubjectPattern.parse("*:alice")
    with pytest.raises(ValueError):
        SubjectPattern.parse("")


def test_field_errors_and_reference_errors_are_reported_together() -> None:
    found = errors_of(
        'levels = ["untrusted"]\n[[members]]\nid = "nope"\nlevel = "gold"\n'
        '[[members]]\nnamespace = "shop"\nlevel = "untrusted"'
    )
    assert found == [
        "members[0].id: 'nope' is not a SPIFFE ID or prefix: "
        "a SPIFFE ID must start with 'spiffe://' (lowercase)",
        "members[0].level: unknown level 'gold' (levels: untrusted)",
        "members[1]: namespace 'shop' needs a trust_domain (on the entry or at the top level)",
    ]


def test_model_validate_without_context_still_checks_references() -> None:
    from pydantic import ValidationError

    from trusthop.policy import Policy

    with pytest.raises(ValidationError, match="unknown level 'gold'"):
        Policy.model_validate(
            {"levels": ["untrusted"], "requirements": [{"destination": "d", "min_level": "gold"}]}
        )
    with pytest.raises(ValidationError, match="needs a trust_domain"):
        Policy.model_validate(
            {"levels": ["untrusted"], "members": [{"namespace": "a", "level": "untrusted"}]}
        )


def test_docs_show_the_example_policy_verbatim() -> None:
    docs = (EXAMPLE.parent.parent / "docs" / "policy.md").read_text(encoding="utf-8")
    assert "```toml\n" + EXAMPLE.read_text(encoding="utf-8") + "```" in docs


def test_hostile_policy_files_are_policy_errors(tmp_path: Path) -> None:
    # Red-team findings: deep nesting raised RecursionError out of reload();
    # an endless file was read without limit.
    from pathlib import Path

    import pytest

    from trusthop.policy import PolicyError, load_policy
    from trusthop.policy.model import MAX_POLICY_BYTES

    deep = Path(tmp_path) / "deep.toml"
    deep.write_text('levels=["untrusted"]\na=' + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError, match="nested too deeply"):
        load_policy(deep)
    huge = Path(tmp_path) / "huge.toml"
    huge.write_bytes(b"#" * (MAX_POLICY_BYTES + 10))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(huge)
