"""The main job, ``trusthop demo``, on a real Kafka-protocol broker and a real RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from trusthop.demo import run_demo
from trusthop.demo.brokers import BrokerBus
from trusthop.demo.flow import EXPECTED, GATEWAY, INVENTORY, SHIPPING


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
