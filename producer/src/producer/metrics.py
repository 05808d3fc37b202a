"""Prometheus metrics of the producer, in a registry of the app's own (exposed at /metrics)."""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    accepted: Counter  # orders stored and answered 202, by endpoint
    confirm_seconds: Histogram  # one relay round: publish until the last confirm
    outbox_backlog: Gauge  # orders committed but not yet confirmed by the broker
    queue_depth: Gauge  # messages ready in the work queue, as the relay last saw it

    @classmethod
    def create(cls) -> "Metrics":
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            accepted=Counter(
                "orders_accepted", "Orders stored and answered 202", ["endpoint"], registry=registry
            ),
            outbox_backlog=Gauge(
                "outbox_backlog", "Orders awaiting publication", registry=registry
            ),
            queue_depth=Gauge(
                "work_queue_depth", "Messages ready in orders.work", registry=registry
            ),
            confirm_seconds=Histogram(
                "outbox_publish_confirm_seconds",
                "Time from publishing an outbox round to its last confirm",
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            ),
        )
