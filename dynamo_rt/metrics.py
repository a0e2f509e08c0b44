"""A Prometheus endpoint for processes that have no HTTP server of their own (workers, planner)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> int | None:
    """Serve ``registry`` on ``port`` (0: a free port; negative: off). Returns the bound port or None."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
