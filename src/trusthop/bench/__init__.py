"""``trusthop bench``: how close trusthop gets to the signature math and to
the raw Kafka and RabbitMQ clients, measured side by side in one run.

Modules: :mod:`~trusthop.bench.runner` (the command), :mod:`~trusthop.bench.micro`
(in-process figures), :mod:`~trusthop.bench.brokers` (Kafka and RabbitMQ),
:mod:`~trusthop.bench.rss` (memory, in a fresh process),
:mod:`~trusthop.bench.measure` (interleaved rounds), :mod:`~trusthop.bench.report`
(table and JSON), :mod:`~trusthop.bench.workload` (what is signed) and
:mod:`~trusthop.bench.tansu` (a Kafka-protocol broker for the run and for the
integration tests). See ``docs/performance.md``.
"""
