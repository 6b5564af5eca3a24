"""Request logs and Prometheus metrics of the HTTP API.

:class:`Observe` is an ASGI middleware that times every request and hands one record per
request to a :class:`RequestLog`: method, route template (``/v1/models/{name}/samples``, not
the raw path, so metrics keep a bounded label set), status, latency, and for sampling routes
the model, version and number of images, which the route handlers leave in
``request.state.observed``.

:class:`RequestLog` writes one logfmt line per request to the ``ray.serve`` logger (inside a
replica, Serve adds its deployment, replica and request id and keeps it in the replica's log
file) and, in a Serve replica, updates Ray Serve metrics, which every node's metrics agent
exposes in Prometheus format next to Serve's own (``ray_serve_*``):

- ``ray_genmodels_http_requests_total{route, method, status}`` (``method``: the standard ones, else
  ``other``; the log line keeps the method as sent)
- ``ray_genmodels_http_request_latency_ms_bucket{route, method, status, le}`` (+ ``_sum``, ``_count``)
- ``ray_genmodels_images_total{model, version}``: images returned by sampling routes
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("ray.serve")

#: Histogram buckets (ms): the API's latency goals sit at 50 ms (n=1) and a few hundred ms (n=64+).
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 200, 350, 500, 1000, 2000, 5000, 10000]


def logfmt(record: Mapping[str, Any]) -> str:
    """``key=value`` pairs; values with spaces, quotes or ``=`` are quoted (one line per request)."""
    parts = []
    for key, value in record.items():
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


#: The ``method`` label values: any other method (which only a client can invent: the API routes
#: none) is labelled ``other``. Without HTTP parsers that refuse unknown methods (h11, unlike
#: httptools, takes any token), every method a client makes up would be a new time series.
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: Any) -> str:
    """``method`` as a metrics label: one of :data:`METHOD_LABELS`, or ``other``."""
    return method if method in METHOD_LABELS else "other"


class RequestLog:
    """One log line per request, plus Serve metrics when ``metrics`` (needs a Serve replica)."""

    def __init__(self, metrics: bool = False) -> None:
        self._requests = self._latency = self._images = None
        if metrics:
            from ray.serve import metrics as serve_metrics

            http_tags = ("route", "method", "status")
            self._requests = serve_metrics.Counter(
                "genmodels_http_requests", description="HTTP requests answered by the genmodels API.",
                tag_keys=http_tags)
            self._latency = serve_metrics.Histogram(
                "genmodels_http_request_latency_ms", description="Time from request to the last byte of the "
                "answer, in the ingress replica (ms).", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=http_tags)
            self._images = serve_metrics.Counter(
                "genmodels_images", description="Images returned by the sampling routes.",
                tag_keys=("model", "version"))

    def __call__(self, record: Mapping[str, Any]) -> None:
        logger.info("request %s", logfmt(record))
        if self._requests is None:
            return
        tags = {"route": str(record["route"]), "method": method_label(record["method"]),
                "status": str(record["status"])}
        self._requests.inc(1, tags=tags)
        self._latency.observe(float(record["latency_ms"]), tags=tags)
        if record.get("n") and record.get("version") and int(record["status"]) < 400:
            self._images.inc(int(record["n"]), tags={"model": str(record["model"]),
                                                     "version": str(record["version"])})


class Observe:
    """ASGI middleware: time each HTTP request and pass its record to ``sink`` once answered."""

    def __init__(self, app, sink) -> None:
        self.app, self.sink = app, sink

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client gets if the app dies before answering

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            record: dict[str, Any] = {
                "method": scope.get("method", ""),
                # Unmatched paths share one label: raw paths would let any client grow the label set.
                "route": getattr(route, "path", None) or "<unmatched>",
                "status": status,
                "latency_ms": (time.perf_counter() - start) * 1e3,
            }
            record.update((scope.get("state") or {}).get("observed") or {})
            try:
                self.sink(record)
            except Exception:  # observability must never fail a request that was answered
                logger.warning("request log/metrics failed", exc_info=True)
