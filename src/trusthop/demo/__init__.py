"""The end-to-end demo: an order hopping gateway → Kafka → inventory →
RabbitMQ → shipping → Kafka → auditor, with attacks mixed in.

:func:`run_demo` runs it on the in-memory transport or on real brokers and
returns a :class:`DemoReport`.
"""

from trusthop.demo.flow import DemoReport, run_demo

__all__ = ["DemoReport", "run_demo"]
