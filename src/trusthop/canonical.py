"""Deterministic msgpack and unpadded base64url, the byte layer of the wire format.

Canonical msgpack here means: integers in their shortest form, text as ``str``
and binary as ``bin`` (never mixed), map keys unique and sorted ascending, no
floats, no extension types, nothing after the value. :func:`unpack_canonical`
accepts exactly the bytes :func:`pack` would produce for the decoded value, so
every value has one encoding and a verifier never hashes something else than
what the signer hashed.
"""

from __future__ import annotations

import binascii
from typing import Any

import msgpack

MSGPACK_ERRORS = (
    ValueError,
    TypeError,
    msgpack.ExtraData,
    msgpack.FormatError,
    msgpack.StackError,
    RecursionError,
)
"""What msgpack raises for bytes that are not msgpack (or too deep)."""


class EncodingError(ValueError):
    """Bytes that are not the canonical encoding of an allowed value."""


def _sort_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sort_maps(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sort_maps(v) for v in value]
    return value


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically (maps sorted by key, bin for bytes)."""
    return msgpack.packb(_sort_maps(value), use_bin_type=True)


def _reject_ext(code: int, data: bytes) -> Any:
    raise EncodingError("msgpack extension types are not allowed")


def _check_plain(value: Any, max_depth: int) -> None:
    """Reject floats (keys included) and nesting deeper than ``max_depth``.

    Iterative, so neither check can itself hit the recursion limit; afterwards
    the recursive :func:`pack` only ever sees shallow values.
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            raise EncodingError("floats are not allowed")
        if isinstance(item, dict | list):
            if depth >= max_depth:
                raise EncodingError(f"nesting deeper than {max_depth}")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def unpack_canonical(
    data: bytes,
    *,
    max_str_len: int = 4096,
    max_bin_len: int = 4096,
    max_array_len: int = 1024,
    max_map_len: int = 64,
    max_depth: int = 32,
) -> Any:
    """Decode ``data`` and require that it is the canonical encoding of its value.

    Raises:
        EncodingError: bad msgpack, trailing bytes, extension types, floats,
            duplicate or unsorted map keys, non-minimal integers, nesting deeper
            than ``max_depth``, or any length over the given limits (enforced
            while decoding, so a hostile length prefix cannot allocate memory).
    """
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            ext_hook=_reject_ext,
            max_str_len=max_str_len,
            max_bin_len=max_bin_len,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except EncodingError:
        raise
    except MSGPACK_ERRORS as exc:
        raise EncodingError(f"not valid msgpack ({type(exc).__name__})") from exc
    _check_plain(value, max_depth)
    # Re-encoding catches duplicate keys (collapsed on decode), unsorted keys,
    # non-minimal integers and str/bin confusion in one comparison.
    try:
        again = pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError("value cannot be re-encoded canonically") from exc
    if again != data:
        raise EncodingError("not the canonical msgpack encoding of its value")
    return value


_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")  # '+', '/' and '=' become invalid
_FROM_STANDARD = bytes.maketrans(b"+/", b"-_")
_B64URL_VALUES = {
    c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 section 5)."""
    encoded = binascii.b2a_base64(data, newline=False).rstrip(b"=")
    return encoded.translate(_FROM_STANDARD).decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url strictly: no padding, whitespace or other alphabet.

    Raises:
        EncodingError: on any character outside ``A-Za-z0-9-_``, a length that
            no encoding produces, or non-zero trailing bits.
    """
    try:
        ascii_text = text.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        ascii_text = None  # raised below: the error must not carry the text along
    if ascii_text is None:
        raise EncodingError("not unpadded base64url")
    rest = len(ascii_text) % 4
    if rest == 1:
        raise EncodingError("not unpadded base64url")
    try:
        decoded = binascii.a2b_base64(
            ascii_text.translate(_TO_STANDARD) + b"=" * (-rest % 4), strict_mode=True
        )
    except binascii.Error as exc:
        raise EncodingError("not unpadded base64url") from exc
    # The last character of a partial group carries 4 (rest 2) or 2 (rest 3)
    # bits that no encoder sets: another text for the same bytes.
    if rest and _B64URL_VALUES[ascii_text[-1]] & (0x0F if rest == 2 else 0x03):
        raise EncodingError("base64url with non-zero trailing bits")
    return decoded
