"""The worked example in docs/wire-format.md is what the code computes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trusthop.bindings.structured import decode_structured
from trusthop.bundle import BundleKey, TrustBundle
from trusthop.example import GATEWAY, GATEWAY_SEED, IAT, build
from trusthop.keys import SigningKey
from trusthop.verify import verify_chain

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"


def test_every_value_of_the_example_is_in_the_document() -> None:
    text = re.sub(r"\s+", "", DOC.read_text(encoding="utf-8"))
    for name, value in build().items():
        if isinstance(value, str):
            assert value in text, f"{name} in docs/wire-format.md is stale"


def test_the_example_chain_verifies_and_binds_the_documented_event() -> None:
    values = build()
    key = SigningKey.from_seed(GATEWAY_SEED).public_key
    bundle = TrustBundle.of([BundleKey("gw-1", GATEWAY, key)])
    event = decode_structured(
        b'{"specversion":"1.0","id":"order-1","source":"/gateway",'
        b'"type":"com.example.order.created","time":"2026-01-01T00:00:00Z",'
        b'"datacontenttype":"application/json","data":{"order":1}}'
    )
    context = verify_chain(
        values["trustchain"],
        bundle=bundle,
        event_digest=event.digest(),
        destination="kafka:orders",
        now=IAT + 10,
    )
    assert context.subject == "user:alice"
    assert context.actors == (GATEWAY, GATEWAY)
    assert event.digest().hex() == values["event_digest"]


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
