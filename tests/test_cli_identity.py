"""The identity commands end to end: keygen --alg, bundle, emit --svid, verify
with bundle maps, inspect of an SVID ring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from certkit import key_pem, make_ca, make_svid, pem

from trusthop.bundle import TrustBundle
from trusthop.cli import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from trusthop.keys import ES256

TD = "prod.example.com"
GW = f"spiffe://{TD}/ns/edge/sa/gateway"
INV = f"spiffe://{TD}/ns/shop/sa/inventory"
EVENT = {"specversion": "1.0", "id": "e-1", "source": "/shop", "type": "order.created",
         "datacontenttype": "application/json", "data": {"order": 1}}


@pytest.fixture
def event_file(tmp_path: Path) -> Path:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(EVENT))
    return path


def last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    out = capsys.readouterr().out.strip().splitlines()
    return dict(json.loads(out[-1]))


def test_keygen_es256_then_emit_and_verify(tmp_path: Path, event_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keygen", "--alg", "es256", "--actor", GW, "--out", str(keys)]) == EXIT_OK
    made = last_json(capsys)
    assert made["alg"] == ES256
    bundle = TrustBundle.load(keys / "bundle.jwks.json")
    entry = bundle.get(str(made["kid"]))
    assert entry is not None and entry.key.alg == ES256 and entry.actor == GW
    signed = tmp_path / "signed.json"
    assert main(["emit", "--key", str(made["key"]), "--actor", GW, "--dest", "kafka:orders",
                 "--subject", "user:alice", "--scope", "orders:write", str(event_file)]) == EXIT_OK
    signed.write_text(capsys.readouterr().out)
    assert main(["verify", "--bundle", str(keys / "bundle.jwks.json"), "--dest", "kafka:orders",
                 str(signed)]) == EXIT_OK
    with pytest.raises(SystemExit) as caught:
        main(["keygen", "--alg", "rs256", "--actor", GW, "--out", str(keys)])
    assert caught.value.code == EXIT_USAGE


def test_bundle_builds_and_merges_a_bundle_map(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keygen", "--actor", GW, "--out", str(keys)]) == EXIT_OK
    gw = last_json(capsys)
    ca, _ = make_ca(TD)
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    partner_ca, _ = make_ca("partner.example.org")
    (tmp_path / "partner.pem").write_bytes(pem(partner_ca))
    out = tmp_path / "map.json"
    assert main(["bundle", "--trust-domain", TD, "--key", f"{GW}={gw['key']}",
                 "--ca", str(tmp_path / "ca.pem"), "--revoke-segment", f"spiffe://{TD}/ns/lab",
                 "--sequence", "4", "--out", str(out)]) == EXIT_OK
    assert main(["bundle", "--trust-domain", "partner.example.org",
                 "--ca", str(tmp_path / "partner.pem"), "--merge", str(out)]) == EXIT_OK
    merged = json.loads(capsys.readouterr().out)
    assert set(merged) == {f"spiffe://{TD}", "spiffe://partner.example.org"}
    bundle = TrustBundle.from_document(merged)
    assert bundle.get(str(gw["kid"])) is not None
    assert bundle.x509_authorities(TD) == (ca,)
    assert bundle.x509_authorities("partner.example.org") == (partner_ca,)
    assert bundle.sequence == {TD: 4}
    assert bundle.is_revoked_actor(f"spiffe://{TD}/ns/lab/sa/x")


@pytest.mark.parametrize("argv", [
    ["bundle"],
    ["bundle", "--key", f"{GW}=x.pem"],  # no trust domain
    ["bundle", "--trust-domain", TD, "--key", "no-equals-sign"],
    ["bundle", "--trust-domain", TD, "--key", "spiffe://Prod.example.com/x=k.pem"],
    ["bundle", "--trust-domain", TD, "--key", "spiffe://partner.example.org/x=KEY"],
    ["bundle", "--trust-domain", TD, "--ca", "missing.pem"],
])
def test_bundle_refuses_bad_input(argv: list[str], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["keygen", "--actor", GW, "--out", str(keys)]) == EXIT_OK
    key = str(last_json(capsys)["key"])
    argv = [a.replace("KEY", key) for a in argv]
    assert main(argv) == EXIT_USAGE


def test_emit_with_an_svid_verifies_against_the_ca_only(
    tmp_path: Path, event_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_ca(TD)
    leaf, leaf_key = make_svid([GW], root, days=3650)
    (tmp_path / "svid.pem").write_bytes(pem(leaf))
    (tmp_path / "svid_key.pem").write_bytes(key_pem(leaf_key))
    (tmp_path / "ca.pem").write_bytes(pem(root[0]))
    assert main(["bundle", "--trust-domain", TD, "--ca", str(tmp_path / "ca.pem"),
                 "--out", str(tmp_path / "map.json")]) == EXIT_OK
    assert main(["emit", "--svid", str(tmp_path / "svid.pem"), "--key",
                 str(tmp_path / "svid_key.pem"), "--dest", "kafka:orders", "--subject",
                 "user:alice", str(event_file)]) == EXIT_OK
    signed = tmp_path / "signed.json"
    signed.write_text(capsys.readouterr().out)
    assert main(["verify", "--bundle", str(tmp_path / "map.json"), "--dest", "kafka:orders",
                 str(signed)]) == EXIT_OK
    assert main(["inspect", str(signed)]) == EXIT_OK
    shown = capsys.readouterr().out
    assert f"x5c {GW}" in shown
    # Another trust domain's CA does not vouch for it.
    other = make_ca(TD)
    (tmp_path / "other.pem").write_bytes(pem(other[0]))
    assert main(["bundle", "--trust-domain", TD, "--ca", str(tmp_path / "other.pem"),
                 "--out", str(tmp_path / "other.json")]) == EXIT_OK
    capsys.readouterr()
    assert main(["verify", "--bundle", str(tmp_path / "other.json"), "--dest", "kafka:orders",
                 str(signed)]) == EXIT_REJECTED
    assert "bad_certificate" in capsys.readouterr().out


def test_emit_refuses_an_actor_that_is_not_the_svids(
    tmp_path: Path, event_file: Path
) -> None:
    root = make_ca(TD)
    leaf, leaf_key = make_svid([GW], root, days=3650)
    (tmp_path / "svid.pem").write_bytes(pem(leaf))
    (tmp_path / "svid_key.pem").write_bytes(key_pem(leaf_key))
    assert main(["emit", "--svid", str(tmp_path / "svid.pem"), "--key",
                 str(tmp_path / "svid_key.pem"), "--actor", INV, "--dest", "kafka:orders",
                 "--subject", "user:alice", str(event_file)]) == EXIT_USAGE
    other_key = make_svid([GW], root)[1]
    (tmp_path / "wrong_key.pem").write_bytes(key_pem(other_key))
    assert main(["emit", "--svid", str(tmp_path / "svid.pem"), "--key",
                 str(tmp_path / "wrong_key.pem"), "--dest", "kafka:orders",
                 "--subject", "user:alice", str(event_file)]) == EXIT_USAGE
    assert main(["emit", "--key", str(tmp_path / "svid_key.pem"), "--dest", "kafka:orders",
                 "--subject", "user:alice", str(event_file)]) == EXIT_USAGE
