"""Fixtures for the unit tests: fixed identities, a bundle, a fixed clock, a chain.

The building blocks live in :mod:`chainkit` (importable by every test module);
this file only exposes them as fixtures.
"""

from __future__ import annotations

import pytest
from chainkit import BUNDLE, FixedClock, Story, build_story

from trusthop.bundle import TrustBundle


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture
def bundle() -> TrustBundle:
    return BUNDLE


@pytest.fixture
def story() -> Story:
    return build_story()


@pytest.fixture
def other_story() -> Story:
    """A valid chain of another transaction (another subject), same actors."""
    return build_story("txn-2", subject="user:bob")
