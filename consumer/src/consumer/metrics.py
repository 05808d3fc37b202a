"""Prometheus metrics of one consumer, served on METRICS_PORT (not published by compose)."""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    processed: Counter  # by outcome: completed, rejected, duplicate
    processing_seconds: Histogram
    in_flight: Gauge
    redeliveries: Counter
    retries: Counter
    dead_lettered: Counter  # by reason: poison, exhausted, permanent

    @classmethod
    def create(cls) -> "Metrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            processed=Counter("orders_processed", "Orders settled", ["outcome"], registry=r),
            processing_seconds=Histogram(
                "order_processing_seconds",
                "One attempt, delivery to settlement",
                registry=r,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ),
            in_flight=Gauge("orders_in_flight", "Deliveries being handled now", registry=r),
            redeliveries=Counter(
                "order_redeliveries", "Deliveries flagged redelivered", registry=r
            ),
            retries=Counter("order_retries", "Attempts sent to a retry queue", registry=r),
            dead_lettered=Counter(
                "orders_dead_lettered", "Messages sent to the DLQ", ["reason"], registry=r
            ),
        )
