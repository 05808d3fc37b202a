"""Prometheus metrics of the producer, in a registry of the app's own (exposed at /metrics)."""

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter  # HTTP requests by route, method and status class (2xx, 4xx, ...)
    request_seconds: Histogram  # HTTP request latency by route and method
    accepted: Counter  # orders stored and answered 202, by endpoint
    confirm_seconds: Histogram  # one relay round: publish until the last confirm
    outbox_backlog: Gauge  # orders committed but not yet confirmed by the broker
    queue_depth: Gauge  # messages ready in the work queue, as the relay last saw it
    # Each label set of the two request metrics, resolved once: a request costs a dict lookup.
    _per_request: dict[tuple[str, str, int], tuple[Any, Any]] = field(default_factory=dict)

    @classmethod
    def create(cls) -> "Metrics":
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "http_requests",
                "HTTP requests by route, method and status class",
                ["handler", "method", "status"],
                registry=registry,
            ),
            request_seconds=Histogram(
                "http_request_duration_seconds",
                "HTTP request latency by route and method",
                ["handler", "method"],
                registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            ),
            accepted=Counter(
                "orders_accepted", "Orders stored and answered 202", ["endpoint"], registry=registry
            ),
            outbox_backlog=Gauge(
                "outbox_backlog", "Orders awaiting publication", registry=registry
            ),
            queue_depth=Gauge(
                "work_queue_depth",
                "Messages ready in the order lane's work queues",
                registry=registry,
            ),
            confirm_seconds=Histogram(
                "outbox_publish_confirm_seconds",
                "Time from publishing an outbox round to its last confirm",
                registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            ),
        )

    def request(self, handler: str, method: str, status: int, seconds: float) -> None:
        """Count and time one HTTP request by its route's template."""
        key = (handler, method, status // 100)
        if (children := self._per_request.get(key)) is None:
            children = self._per_request[key] = (
                self.requests.labels(handler, method, f"{key[2]}xx"),
                self.request_seconds.labels(handler, method),
            )
        children[0].inc()
        children[1].observe(seconds)


class RequestMetrics:
    """ASGI middleware counting and timing every request by its route's template: "none" when
    no route ran (an unknown path, or a body refused before routing), so the labels stay bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics, excluded: tuple[str, ...] = ()) -> None:
        self.app, self.metrics, self.excluded = app, metrics, excluded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router on this scope when a route matched
            # The template without its convertors: /orders/{order_id}, not {order_id:uuid}.
            handler = getattr(route, "path_format", None) or "none"
            if handler not in self.excluded:
                self.metrics.request(
                    handler, scope["method"], status, time.perf_counter() - started
                )
