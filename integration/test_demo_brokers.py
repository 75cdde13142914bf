"""The main job, ``trusthop demo``, on a real Kafka-protocol broker and a real RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trusthop.demo import run_demo
from trusthop.demo.brokers import BrokerBus
from trusthop.demo.flow import EXPECTED, GATEWAY, INVENTORY, QUARANTINED, SHIPPING


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
    assert len(report.delivered) + len(report.rejected) == 3 + 4 + QUARANTINED + 7 + 1
    assert all(d.weakest_level in {"internal", "payments"} for d in report.delivered)


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
    assert len(document["delivered"]) == 6
    assert [c["change"] for c in document["policy_changes"]] == [
        "quarantine namespace shop",
        "lift the quarantine of shop",
        "demote shipping to untrusted",
        "restore shipping to internal",
    ]
