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

_SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")
_SEGMENT = re.compile(r"[a-zA-Z0-9._-]+\Z")
_MAX_ID_BYTES = 2048
_MAX_TRUST_DOMAIN = 255


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
