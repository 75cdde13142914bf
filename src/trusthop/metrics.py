"""Counters every consumer wrapper keeps, behind a small interface.

Names (stable):

* ``verified``: deliveries accepted and handed to a handler (any kind);
* ``rejected``: deliveries rejected, with label ``reason`` (a reason code);
* ``redelivered``: accepted redeliveries (broker redelivery of the same message);
* ``retried``: handler retries scheduled (Kafka retry topic, RabbitMQ retry queue);
* ``replayed``: re-published copies caught (rejected or skipped);
* ``duplicates``: copies skipped without the handler (``on_replay="skip"``);
* ``cache_hits`` / ``cache_misses``: verified-prefix cache lookups (one per message).

:class:`Counters` keeps them in memory (``as_dict()`` for a summary);
:class:`PrometheusMetrics` exports them when ``prometheus_client`` is
installed (``pip install 'trusthop[prometheus]'``). Both satisfy
:class:`Metrics`; anything else with an ``inc`` does too.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar, Protocol

COUNTERS = (
    "verified",
    "rejected",
    "redelivered",
    "retried",
    "replayed",
    "duplicates",
    "cache_hits",
    "cache_misses",
)


class Metrics(Protocol):
    """Where a wrapper reports its counters."""

    def inc(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        """Add ``amount`` to counter ``name`` (``reason`` only for ``rejected``)."""
        ...


class Counters:
    """In-memory counters: ``counters["verified"]``, ``counters.rejected["expired"]``."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        self.totals[name] += amount
        if reason is not None:
            self.rejected[reason] += amount

    def __getitem__(self, name: str) -> int:
        return self.totals[name]

    def as_dict(self) -> dict[str, Any]:
        """Every counter of :data:`COUNTERS` (zero when never incremented),
        ``rejected`` as a map of reason to count."""
        out: dict[str, Any] = {name: self.totals[name] for name in COUNTERS}
        out["rejected"] = dict(sorted(self.rejected.items()))
        return out


class Fanout:
    """Reports to several :class:`Metrics` at once (e.g. counters and Prometheus)."""

    def __init__(self, *sinks: Metrics) -> None:
        self.sinks = sinks

    def inc(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        for sink in self.sinks:
            sink.inc(name, amount, reason=reason)


class PrometheusMetrics:
    """Exports the counters as ``trusthop_<name>_total`` with labels ``consumer``
    and, for ``rejected``, ``reason``.

    Args:
        consumer: label value naming this consumer (group or queue).
        registry: a ``prometheus_client.CollectorRegistry`` (default: the
            global one). Counters are created once per registry.

    Raises:
        ImportError: ``prometheus_client`` is not installed.
    """

    _families: ClassVar[dict[tuple[int, str], Any]] = {}

    def __init__(self, consumer: str, *, registry: Any = None) -> None:
        import prometheus_client

        self.consumer = consumer
        self._registry = registry if registry is not None else prometheus_client.REGISTRY
        self._counter = prometheus_client.Counter

    def _family(self, name: str) -> Any:
        key = (id(self._registry), name)
        family = self._families.get(key)
        if family is None:
            labels = ["consumer", "reason"] if name == "rejected" else ["consumer"]
            family = self._counter(
                f"trusthop_{name}",
                f"trusthop consumer counter: {name}",
                labels,
                registry=self._registry,
            )
            self._families[key] = family
        return family

    def inc(self, name: str, amount: int = 1, *, reason: str | None = None) -> None:
        family = self._family(name)
        if name == "rejected":
            family.labels(consumer=self.consumer, reason=reason or "unknown").inc(amount)
        else:
            family.labels(consumer=self.consumer).inc(amount)
