"""Prometheus ``/metrics`` for a process without an HTTP server of its own (consumer, relay)."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


@contextmanager
def serving_metrics(registry: CollectorRegistry, port: int) -> Iterator[None]:
    """``registry`` on ``port`` in a thread while the block runs; a taken port costs the metrics,
    not the work. ``port`` 0: none."""
    server: WSGIServer | None = None
    if port:
        try:
            server, _ = start_http_server(port, registry=registry)
            log.info("metrics on :%d/metrics", port)
        except OSError as exc:
            log.error("metrics not served: port %d: %s", port, exc)
    try:
        yield
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
