"""The main job, ``trusthop demo``, on a real Kafka-protocol broker and a real RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trusthop.demo import run_demo
from trusthop.demo.brokers import BrokerBus
from trusthop.demo.flow import (
    BROADCAST_GROUPS,
    CRASHED_ORDER,
    DELIVERY_SCENARIOS,
    EXPECTED,
    GATEWAY,
    INVENTORY,
    ORDERS,
    QUARANTINED,
    REPUBLISHED_ORDER,
    SHIPPING,
    expected_counts,
)

# Handled deliveries: each legitimate event once per consumer (inventory,
# shipping, auditor and both broadcast groups), whatever crashed or failed.
HANDLED = (ORDERS - 1) * (3 + len(BROADCAST_GROUPS))
# Messages consumed: inventory 3 orders and the re-published copy; shipping
# 2 reservations, 2 attacks and the quarantined ones; the auditor 2 reports,
# 5 attacks and refusals and the demoted report; each broadcast group 2 events.
CONSUMED = ORDERS + 1 + 4 + QUARANTINED + 7 + 1 + (ORDERS - 1) * len(BROADCAST_GROUPS)


async def test_demo_flow_across_kafka_and_rabbitmq(
    kafka_bootstrap: str, amqp_url: str, kafka_consumer_options: dict[str, int]
) -> None:
    bus = BrokerBus(kafka=kafka_bootstrap, amqp=amqp_url, consumer_options=kafka_consumer_options)
    try:
        report = await run_demo(bus)
    finally:
        await bus.close()
    assert report.ok, report.problems
    # Every rejection was read back from a real dead-letter topic or queue.
    assert {(r.scenario, r.reason) for r in report.rejected} == set(EXPECTED.items())
    assert {r.consumer for r in report.rejected} == {"inventory", "shipping", "auditor"}
    audited = [d for d in report.delivered if d.consumer == "auditor"]
    assert [d.actors for d in audited] == [[GATEWAY, GATEWAY, INVENTORY, SHIPPING]] * 2
    assert all(f"kafka:trusthop-demo-audit-{bus.run}" in d.path for d in audited)
    assert all(f"amqp:trusthop-demo-shipping-{bus.run}/order.reserved" in d.path for d in audited)
    # The policy scenarios: messages waited in the real queue / topic while the
    # operator swapped the policy, and were dead-lettered under the new one.
    assert sorted(r.event_id or "" for r in report.rejected if r.scenario == "quarantine") == [
        f"quarantine-{n + 1}" for n in range(QUARANTINED)
    ]
    assert [(c.destination, c.waiting) for c in report.policy_changes] == [
        (f"amqp:trusthop-demo-shipping-{bus.run}/order.reserved", QUARANTINED),
        (f"amqp:trusthop-demo-shipping-{bus.run}/order.reserved", 0),
        (f"kafka:trusthop-demo-audit-{bus.run}", 1),
        (f"kafka:trusthop-demo-audit-{bus.run}", 0),
    ]
    # Every message consumed came out handled or dead-lettered.
    assert len(report.delivered) == HANDLED
    assert len(report.delivered) + len(report.rejected) == CONSUMED
    assert all(d.weakest_level in {"internal", "payments"} for d in report.delivered)
    # The delivery scenarios on real brokers: a Kafka consumer died before
    # committing (the group's next consumer got the record again: a
    # redelivery), a copy re-published into the Kafka topic (replayed), a
    # handler retried through RabbitMQ's retry queue, two Kafka groups.
    assert [(s.scenario, s.ok) for s in report.scenarios] == [
        (name, True) for name in DELIVERY_SCENARIOS
    ], report.scenarios
    kinds = {(d.consumer, d.event_id): (d.kind, d.attempt) for d in report.delivered}
    assert kinds[("inventory", f"order-{CRASHED_ORDER}")] == ("redelivery", 1)
    copies = [d for d in report.delivered if d.event_id == f"order-{REPUBLISHED_ORDER}"]
    assert len(copies) == 1  # the original, once; its copy was dead-lettered ``replayed``
    assert sorted(v for (c, _), v in kinds.items() if c == "shipping") == [
        ("first", 1),
        ("retry", 2),
    ]
    for group in BROADCAST_GROUPS:
        assert [d.kind for d in report.delivered if d.consumer == group] == ["first"] * (ORDERS - 1)
    for name, want in expected_counts().items():
        assert report.counts[name] == want, name
    assert report.counts["cache_hits"] > 0


def test_demo_command_on_real_brokers(kafka_bootstrap: str, amqp_url: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trusthop.cli",
            "demo",
            "--json",
            "--kafka",
            kafka_bootstrap,
            "--amqp",
            amqp_url,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ | {"PYTHONWARNINGS": ""},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Unclosed" not in result.stderr and "destroyed" not in result.stderr, result.stderr
    document = json.loads(result.stdout)
    assert document["transport"] == "kafka+rabbitmq" and document["ok"]
    assert {(r["scenario"], r["reason"]) for r in document["rejected"]} == set(EXPECTED.items())
    assert len(document["delivered"]) == HANDLED
    assert [s["scenario"] for s in document["scenarios"] if s["ok"]] == list(DELIVERY_SCENARIOS)
    assert {k: document["counts"][k] for k in expected_counts()} == expected_counts()
    assert document["counts"]["cache_hits"] > 0
    assert [c["change"] for c in document["policy_changes"]] == [
        "quarantine namespace shop",
        "lift the quarantine of shop",
        "demote shipping to untrusted",
        "restore shipping to internal",
    ]
