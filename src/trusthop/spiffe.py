"""SPIFFE ID parsing, to the letter of the SPIFFE-ID specification.

A SPIFFE ID is ``spiffe://<trust-domain><path>``. The trust domain uses only
lowercase ``a-z``, digits, ``.``, ``-`` and ``_``; every path segment uses only
``a-zA-Z0-9.-_``, and no segment is empty, ``.`` or ``..``. There is no
trailing slash, port, userinfo, query, fragment or percent-encoding. The whole
ID is at most 2048 bytes. Anything else raises :class:`ValueError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
_SCHEME = SCHEME
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")
_SEGMENT = re.compile(r"[a-zA-Z0-9._-]+\Z")
_MAX_ID_BYTES = 2048
_MAX_TRUST_DOMAIN = 255
# The same rules as SpiffeId.parse in one expression, for the hot path: a
# segment is never "." or "..", and nothing follows the last one.
_PATH = r"(?:/(?!\.\.?(?:/|\Z))[a-zA-Z0-9._-]+)"
_FAST_PATH = re.compile(_PATH + r"+\Z")
_FAST_ID = re.compile(r"spiffe://[a-z0-9._-]{1,255}" + _PATH + r"*\Z")
_FAST_ID_WITH_PATH = re.compile(r"spiffe://[a-z0-9._-]{1,255}" + _PATH + r"+\Z")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE ID. Build it with :meth:`parse`."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Validate ``value`` and split it into trust domain and path.

        Raises:
            ValueError: naming the rule ``value`` breaks.
        """
        if not isinstance(value, str):
            raise ValueError("a SPIFFE ID must be a string")
        if not value.isascii():
            raise ValueError("a SPIFFE ID must be ASCII")
        if len(value) > _MAX_ID_BYTES:
            raise ValueError("a SPIFFE ID must be at most 2048 bytes")
        if not value.startswith(_SCHEME):
            raise ValueError("a SPIFFE ID must start with 'spiffe://' (lowercase)")
        rest = value[len(_SCHEME) :]
        domain, slash, path = rest.partition("/")
        if not domain:
            raise ValueError("a SPIFFE ID needs a trust domain")
        if len(domain) > _MAX_TRUST_DOMAIN:
            raise ValueError("a trust domain must be at most 255 characters")
        if not _TRUST_DOMAIN.match(domain):
            raise ValueError(
                "a trust domain uses only lowercase a-z, 0-9, '.', '-' and '_' "
                "(no port, userinfo or upper case)"
            )
        if not slash:
            return cls(domain, "")
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                raise ValueError("a SPIFFE ID path has no empty, '.' or '..' segment")
            if not _SEGMENT.match(segment):
                raise ValueError(
                    "a SPIFFE ID path segment uses only a-z, A-Z, 0-9, '.', '-' and '_'"
                )
        return cls(domain, "/" + path)

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"


def is_spiffe_id(value: object, *, path: bool = False) -> bool:
    """Whether ``value`` is a valid SPIFFE ID (with a non-empty path when
    ``path``); the rules of :meth:`SpiffeId.parse`, without the explanation."""
    if type(value) is not str or len(value) > _MAX_ID_BYTES or not value.isascii():
        return False
    pattern = _FAST_ID_WITH_PATH if path else _FAST_ID
    return pattern.match(value) is not None


def is_spiffe_path(value: object) -> bool:
    """Whether ``value`` is a non-empty SPIFFE ID path (``/ns/shop/sa/orders``)."""
    return (
        type(value) is str
        and len(value) <= _MAX_ID_BYTES - len(SCHEME) - 1
        and value.isascii()
        and _FAST_PATH.match(value) is not None
    )


def validate_spiffe_id(value: str) -> str:
    """Return ``value`` unchanged if it is a valid SPIFFE ID, else raise ValueError."""
    SpiffeId.parse(value)
    return value


def validate_trust_domain(value: str) -> str:
    """Return ``value`` unchanged if it is a valid trust domain name (what
    follows ``spiffe://`` in a SPIFFE ID without a path), else raise ValueError."""
    if not isinstance(value, str) or "/" in value:
        raise ValueError("a trust domain name is the part of a SPIFFE ID before its path")
    SpiffeId.parse(_SCHEME + value)
    return value


def trust_domain_of(value: str) -> str:
    """The trust domain of an already valid SPIFFE ID (no validation)."""
    return value[len(_SCHEME) :].partition("/")[0]
