"""Prometheus metrics of one consumer, served on METRICS_PORT (not published by compose)."""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    """One lane's metrics: ``orders_processed_total``, ``crawl_tasks_processed_total``, ..."""

    processed: Counter  # by outcome: completed, rejected, duplicate (orders); fetched, ...
    processing_seconds: Histogram
    in_flight: Gauge
    redeliveries: Counter
    given_back: Counter  # deliveries requeued after waiting HOLD_LIMIT unstarted
    retries: Counter
    dead_lettered: Counter  # by reason: poison, exhausted, permanent

    @classmethod
    def create(cls, registry: CollectorRegistry, one: str, many: str) -> "Metrics":
        """``one``/``many``: how a metric name calls one item and several (order/orders)."""
        r = registry
        return cls(
            processed=Counter(f"{many}_processed", f"{many} settled", ["outcome"], registry=r),
            processing_seconds=Histogram(
                f"{one}_processing_seconds",
                "One attempt, delivery to settlement",
                registry=r,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ),
            in_flight=Gauge(f"{many}_in_flight", "Deliveries being handled now", registry=r),
            redeliveries=Counter(
                f"{one}_redeliveries", "Deliveries flagged redelivered", registry=r
            ),
            given_back=Counter(
                f"{one}_given_back", "Deliveries requeued after waiting HOLD_LIMIT", registry=r
            ),
            retries=Counter(f"{one}_retries", "Attempts sent to a retry queue", registry=r),
            dead_lettered=Counter(
                f"{many}_dead_lettered", "Messages sent to the DLQ", ["reason"], registry=r
            ),
        )
