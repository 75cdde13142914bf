"""Attacks on trusthop.spiffe: only IDs the SPIFFE-ID specification allows."""

from __future__ import annotations

from typing import Any

import pytest

from trusthop.spiffe import SpiffeId, trust_domain_of, validate_spiffe_id

VALID = [
    ("spiffe://prod.example.com", "prod.example.com", ""),
    ("spiffe://prod.example.com/ns/edge/sa/gateway", "prod.example.com", "/ns/edge/sa/gateway"),
    ("spiffe://a", "a", ""),
    ("spiffe://td-1_x.y/A-Za-z0-9._-", "td-1_x.y", "/A-Za-z0-9._-"),
    ("spiffe://example.org/...", "example.org", "/..."),  # three dots is a name, not '..'
    ("spiffe://example.org/.hidden/a..b", "example.org", "/.hidden/a..b"),
    ("spiffe://123/456", "123", "/456"),
    ("spiffe://" + "d" * 255 + "/x", "d" * 255, "/x"),
]


@pytest.mark.parametrize(("value", "domain", "path"), VALID)
def test_valid_ids(value: str, domain: str, path: str) -> None:
    parsed = SpiffeId.parse(value)
    assert (parsed.trust_domain, parsed.path) == (domain, path)
    assert str(parsed) == value
    assert validate_spiffe_id(value) == value
    assert trust_domain_of(value) == domain


def test_maximum_length() -> None:
    prefix = "spiffe://example.org/"
    exact = prefix + "a" * (2048 - len(prefix))
    assert validate_spiffe_id(exact) == exact
    with pytest.raises(ValueError, match="2048"):
        validate_spiffe_id(exact + "a")


INVALID = {
    "upper-case-domain": "spiffe://Prod.example.com/x",
    "upper-case-domain-all": "spiffe://EXAMPLE.ORG",
    "upper-case-scheme": "SPIFFE://example.org/x",
    "mixed-case-scheme": "Spiffe://example.org/x",
    "other-scheme": "https://example.org/x",
    "no-scheme": "example.org/x",
    "single-slash": "spiffe:/example.org/x",
    "empty": "",
    "scheme-only": "spiffe://",
    "empty-domain": "spiffe:///x",
    "percent-in-path": "spiffe://example.org/%61",
    "percent-in-domain": "spiffe://ex%61mple.org/x",
    "percent-slash": "spiffe://example.org/a%2Fb",
    "dot-segment": "spiffe://example.org/./x",
    "dotdot-segment": "spiffe://example.org/a/../b",
    "dot-last": "spiffe://example.org/a/.",
    "dotdot-last": "spiffe://example.org/a/..",
    "trailing-slash": "spiffe://example.org/x/",
    "domain-trailing-slash": "spiffe://example.org/",
    "double-slash": "spiffe://example.org//x",
    "empty-middle-segment": "spiffe://example.org/a//b",
    "userinfo": "spiffe://user@example.org/x",
    "userinfo-password": "spiffe://user:pw@example.org/x",
    "port": "spiffe://example.org:8443/x",
    "empty-port": "spiffe://example.org:/x",
    "query": "spiffe://example.org/x?y=1",
    "query-on-domain": "spiffe://example.org?x",
    "fragment": "spiffe://example.org/x#frag",
    "fragment-on-domain": "spiffe://example.org#x",
    "space": "spiffe://example.org/a b",
    "tab": "spiffe://example.org/a\tb",
    "newline-end": "spiffe://example.org/x\n",
    "nul": "spiffe://example.org/x\x00",
    "backslash": "spiffe://example.org/a\\b",
    "plus": "spiffe://example.org/a+b",
    "colon-in-path": "spiffe://example.org/a:b",
    "tilde": "spiffe://example.org/~x",
    "cyrillic-a-domain": "spiffe://ex\u0430mple.org/x",
    "cyrillic-a-path": "spiffe://example.org/\u0430dmin",
    "fullwidth-slash": "spiffe://example.org\uff0fx",
    "dotless-i": "spiffe://example.org/adm\u0131n",
    "kelvin-sign": "spiffe://example.org/\u212a",
    "zero-width-space": "spiffe://example.org/x\u200b",
    "ideographic-full-stop": "spiffe://example\u3002org/x",
    "ipv6-brackets": "spiffe://[::1]/x",
    "domain-too-long": "spiffe://" + "d" * 256 + "/x",
}


@pytest.mark.parametrize("value", list(INVALID.values()), ids=list(INVALID))
def test_invalid_ids(value: str) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(value)
    with pytest.raises(ValueError):
        validate_spiffe_id(value)


@pytest.mark.parametrize("value", [None, 5, b"spiffe://example.org/x", ["spiffe://a"]])
def test_non_strings(value: Any) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(value)


def test_error_names_the_rule() -> None:
    with pytest.raises(ValueError, match="lowercase"):
        SpiffeId.parse("spiffe://Example.org")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        SpiffeId.parse("spiffe://example.org/..")
    with pytest.raises(ValueError, match="ASCII"):
        SpiffeId.parse("spiffe://example.org/\u00e9")
