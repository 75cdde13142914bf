"""The worked example in docs/wire-format.md is what the code computes.

Every value of the example sits in a fenced block preceded by a marker,
``<!-- example: NAME -->`` (the block is the value, wrapped at will) or
``<!-- example-bytes: NAME -->`` (an annotated dump: the hex before two
spaces on each line, concatenated, is the value). Each marked value must be
the one :func:`trusthop.example.build` (or the decoder reading its chain)
computes, every computed value must be shown, and no other long hex string
may appear in the example: a stale value anywhere fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trusthop.bindings.structured import decode_structured
from trusthop.bundle import BundleKey, TrustBundle
from trusthop.canonical import b64url_encode, pack
from trusthop.chain import decode_chain
from trusthop.example import GATEWAY, GATEWAY_SEED, IAT, build
from trusthop.keys import PublicKey, SigningKey
from trusthop.verify import verify_chain

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"
TEXT = DOC.read_text(encoding="utf-8")
EXAMPLE = TEXT[TEXT.index("## 11. Worked example"):]
MARKED = re.compile(r"<!-- example(-bytes)?: (\w+) -->\n```\n(.*?)\n```", re.S)
# Shown specially: the event as JSON, its attributes as JSON.
SPECIAL = {"event", "attributes"}


def computed() -> dict[str, str]:
    """Every value the example shows, from the code."""
    values = build()
    out = {name: value for name, value in values.items() if isinstance(value, str)}
    chain = decode_chain(values["trustchain"], max_bytes=16_384, max_rings=32)
    origin, hop = chain.rings
    origin_ring, hop_ring = chain.ring_bytes
    out |= {
        "origin_segment": b64url_encode(origin_ring),
        "hop_segment": b64url_encode(hop_ring),
        "iat": str(origin.iat),
        "origin_ttl": str(origin.exp - origin.iat),
        "origin_exp": str(origin.exp),
        "hop_ttl": str(hop.exp - hop.iat),
        "hop_exp": str(hop.exp),
        "link_tag": f"{chain.link_tags[1]:04x}",
    }
    return out


def blocks() -> dict[str, tuple[bool, str]]:
    """Marked blocks of the document: name -> (is an annotated dump, text)."""
    found: dict[str, tuple[bool, str]] = {}
    for dump, name, body in MARKED.findall(TEXT):
        assert name not in found, f"{name} is shown twice"
        found[name] = (bool(dump), body)
    return found


def dump_hex(body: str) -> str:
    return "".join(re.split(r"\s{2,}", line.strip())[0].replace(" ", "")
                   for line in body.splitlines())


def test_every_marked_value_is_what_the_code_computes() -> None:
    values = computed()
    for name, (dump, body) in blocks().items():
        if name in SPECIAL:
            continue
        assert name in values, f"docs/wire-format.md shows {name!r}, which the code does not"
        shown = dump_hex(body) if dump else re.sub(r"\s+", "", body)
        assert shown == values[name], f"{name} in docs/wire-format.md is stale"


def test_every_computed_value_is_shown() -> None:
    values = computed()
    shown = set(blocks())
    inline = {"iat", "origin_ttl", "origin_exp", "hop_ttl", "hop_exp", "link_tag"}
    assert set(values) - inline <= shown, set(values) - inline - shown
    for name in inline:
        assert f"`{values[name]}`" in EXAMPLE, f"{name} ({values[name]}) is not in the example"
    assert f"{len(values['trustchain'])} characters" in TEXT
    assert set(build()) - set(values) <= SPECIAL  # only the attribute map is not a string


def test_no_other_long_hex_string_in_the_example() -> None:
    values = list(computed().values())
    for run in re.findall(r"[0-9a-f]{8,}", EXAMPLE):
        assert any(run in value for value in values), f"unknown value {run} in the example"


def test_the_annotations_of_the_dumps_name_the_right_keys_and_strings() -> None:
    for name, (dump, body) in blocks().items():
        if not dump:
            continue
        entry_hex, notes = "", ""
        entries: list[tuple[str, str]] = []
        for line in body.splitlines():
            hex_part, _, note = line.strip().partition("  ")
            if not line.startswith(" "):  # a new entry
                if entry_hex:
                    entries.append((entry_hex, notes))
                entry_hex, notes = "", ""
            entry_hex += hex_part.replace(" ", "")
            notes += " " + note.strip()
        entries.append((entry_hex, notes))
        header, *fields = entries
        assert f"map of {len(fields)} entries" in header[1], name
        for hex_value, note in fields:
            key = int(hex_value[:2], 16)
            assert note.strip().startswith(f"key {key},"), (name, hex_value[:2], note)
            for quoted in re.findall(r'"([^"]*)"', note):  # each a whole msgpack str
                assert pack(quoted).hex() in hex_value, (name, quoted)
            for tag in re.findall(r"0x([0-9a-f]{4})", note):
                assert hex_value.endswith(tag), (name, tag)


def _documented(name: str) -> str:
    return blocks()[name][1]


def test_the_documented_event_and_attributes_are_the_examples() -> None:
    values = build()
    event = decode_structured(re.sub(r"\n\s*", "", _documented("event")).encode())
    assert event.digest().hex() == values["event_digest"]
    assert json.loads(_documented("attributes")) == values["attributes"]
    assert event.data.decode() == values["data"]  # type: ignore[union-attr]


def test_the_documented_chain_verifies_with_the_documented_key_and_event() -> None:
    raw = bytes.fromhex(re.sub(r"\s+", "", _documented("public_key")))
    key = PublicKey(raw)
    assert key == SigningKey.from_seed(GATEWAY_SEED).public_key
    assert f"{key.key_tag:04x}" == re.sub(r"\s+", "", _documented("key_tag"))
    bundle = TrustBundle.of([BundleKey("gw-1", GATEWAY, key)])
    event = decode_structured(re.sub(r"\n\s*", "", _documented("event")).encode())
    text = re.sub(r"\s+", "", _documented("trustchain"))
    segments = [re.sub(r"\s+", "", _documented(n)) for n in ("origin_segment", "hop_segment")]
    assert text == "2." + ".".join(segments)
    context = verify_chain(text, bundle=bundle, event_digest=event.digest(),
                           destination="kafka:orders", now=IAT + 10)
    assert context.subject == "user:alice"
    assert context.actors == (GATEWAY, GATEWAY)
    assert context.scope == {"orders:write", "shipping:create"}
    assert context.expires_at == int(computed()["hop_exp"])


def test_the_cli_verifies_the_documented_example_as_of_its_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trusthop.cli import EXIT_OK, EXIT_REJECTED, main

    key = SigningKey.from_seed(GATEWAY_SEED).public_key
    bundle = TrustBundle.of([BundleKey("gw-1", GATEWAY, key)])
    (tmp_path / "bundle.json").write_text(json.dumps(bundle.to_jwks()))
    event = (
        '{"specversion":"1.0","id":"order-1","source":"/gateway",'
        '"type":"com.example.order.created","time":"2026-01-01T00:00:00Z",'
        '"datacontenttype":"application/json","data":{"order":1},'
        f'"trustchain":"{build()["trustchain"]}"}}'
    )
    (tmp_path / "event.json").write_text(event)
    args = ["verify", "--bundle", str(tmp_path / "bundle.json"), "--dest", "kafka:orders"]
    assert main([*args, "--now", str(IAT + 60), str(tmp_path / "event.json")]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["subject"] == "user:alice"
    assert main([*args, str(tmp_path / "event.json")]) == EXIT_REJECTED  # it expired long ago
    assert json.loads(capsys.readouterr().out)["reason"] == "expired"
