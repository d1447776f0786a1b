"""Serving a Prometheus registry over HTTP on loopback; shared by the broker's and workers' metrics."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


class MetricsExporter:
    """Owns a registry; ``serve(port)`` exposes it on 127.0.0.1:port (0 = off), ``close()`` stops it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._server: Any = None

    def serve(self, port: int) -> None:
        """Serve the metrics on 127.0.0.1:port (0 = do nothing)."""
        if port > 0:
            self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
