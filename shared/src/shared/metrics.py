"""Prometheus ``/metrics`` for a process without an HTTP server of its own (consumer, relay)."""

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, port: int) -> WSGIServer | None:
    """``registry`` on ``port`` in a thread; a taken port costs the metrics, not the work."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, registry=registry)
    except OSError as exc:
        log.error("metrics not served: port %d: %s", port, exc)
        return None
    log.info("metrics on :%d/metrics", port)
    return server
