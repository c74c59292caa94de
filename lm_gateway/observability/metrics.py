"""Prometheus metrics for one gateway.

Every gateway has its own registry (two gateways in one process count separately). Metrics
move as requests start and finish; labels are bounded: model names come from clients, so past
:data:`MAX_MODEL_LABELS` distinct names the rest are counted under ``other``.

With ``--workers N`` the CLI turns on prometheus-client's multiprocess mode (it sets
``PROMETHEUS_MULTIPROC_DIR`` for the workers): each worker writes its values to files in that
directory and ``/metrics``, whichever worker answers it, adds them up. Without it, each worker
would answer with its own counts only.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..context import RequestContext

MAX_MODEL_LABELS = 500
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus-client's multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    """The gateway's counters, gauges and histograms; :meth:`render` answers ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lmgw_requests",
            "Requests, by endpoint, connection, model, group, status, outcome.",
            ["endpoint", "connection", "model", "group", "status", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "lmgw_request_duration_seconds",
            "Time from request to the end of the answer.",
            ["endpoint", "connection", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lmgw_time_to_first_token_seconds",
            "Time from request to the upstream's first chunk (streams) or answer.",
            ["connection", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "lmgw_gateway_overhead_seconds",
            "Time the gateway itself spent on a request, outside the upstream call.",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "lmgw_tokens",
            "Tokens by kind (prompt, completion, cached, reasoning).",
            ["connection", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "lmgw_cost_usd",
            "Cost of the requests, US dollars.",
            ["connection", "model", "group"],
            registry=r,
        )
        self.in_flight = Gauge(
            "lmgw_in_flight_requests",
            "Requests being served.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight_streams = Gauge(
            "lmgw_in_flight_streams",
            "Streams being relayed.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cancellations = Counter(
            "lmgw_cancellations",
            "Requests whose client left before the answer ended.",
            ["connection", "stream"],
            registry=r,
        )
        self.rate_limited = Counter(
            "lmgw_rate_limit_rejections",
            "Requests refused by a rate limiter.",
            ["group"],
            registry=r,
        )
        self.attempts = Counter(
            "lmgw_upstream_attempts",
            "Upstream attempts, by connection and outcome (ok, error, cancelled, skipped): "
            "retries, fallbacks and hedges show as more than one per request.",
            ["connection", "outcome"],
            registry=r,
        )
        self.log_dropped = Counter(
            "lmgw_log_entries_dropped",
            "Log entries dropped (a logger's queue full or its writer failing).",
            ["logger"],
            registry=r,
        )
        self.records_dropped = Counter(
            "lmgw_request_records_dropped",
            "Finished-request records dropped before delivery.",
            registry=r,
        )
        self._models: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _model(self, name: str | None) -> str:
        if not name:
            return ""
        if name in self._models:
            return name
        if len(self._models) >= MAX_MODEL_LABELS:
            return "other"
        self._models.add(name)
        return name

    def started(self) -> None:
        self.in_flight.inc()

    def stream_started(self) -> None:
        self.in_flight_streams.inc()

    def stream_ended(self) -> None:
        self.in_flight_streams.dec()

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: prometheus-client validates and locks on every
        ``labels()`` call, which is most of what counting a request would cost."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def finished(self, ctx: RequestContext) -> None:
        """Count a finished request (called once per request, on the event loop)."""
        self.in_flight.dec()
        child = self._child
        connection = ctx.connection or ""
        model = self._model(ctx.model if ctx.connection else None)
        group = ctx.group or ""
        child(
            self.requests, ctx.endpoint, connection, model, group, str(ctx.status or ""),
            ctx.outcome or "",
        ).inc()  # fmt: skip
        stream = "true" if ctx.stream else "false"
        if ctx.duration is not None:
            child(self.duration, ctx.endpoint, connection, stream).observe(ctx.duration)
        if ctx.time_to_first_chunk is not None:
            child(self.ttft, connection, stream).observe(ctx.time_to_first_chunk)
        overhead = ctx.internal.get("overhead_seconds")
        if isinstance(overhead, float):
            child(self.overhead, ctx.endpoint).observe(overhead)
        usage = ctx.usage
        if isinstance(usage, dict):
            tokens = self.tokens
            child(tokens, connection, model, "prompt").inc(_n(usage.get("prompt_tokens")))
            child(tokens, connection, model, "completion").inc(_n(usage.get("completion_tokens")))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens"):
                child(tokens, connection, model, "cached").inc(_n(details.get("cached_tokens")))
            details = usage.get("completion_tokens_details")
            if isinstance(details, dict) and details.get("reasoning_tokens"):
                child(tokens, connection, model, "reasoning").inc(
                    _n(details.get("reasoning_tokens"))
                )
        if ctx.cost:
            child(self.cost, connection, model, group).inc(ctx.cost)
        if ctx.outcome == "cancelled":
            child(self.cancellations, connection, stream).inc()
        if ctx.error_code == "rate_limit_exceeded" and ctx.outcome == "rejected":
            child(self.rate_limited, group).inc()
        for attempt in ctx.attempt_log:
            child(self.attempts, attempt["connection"], attempt["outcome"]).inc()

    def close(self) -> None:
        """In multiprocess mode, drop this process's live gauges (in-flight counts) from the
        totals; counters and histograms stay counted."""
        if multiprocess_dir():
            from prometheus_client import multiprocess

            mark_dead: Any = multiprocess.mark_process_dead  # untyped in prometheus-client
            mark_dead(os.getpid())

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition (all workers' values in multiprocess mode)."""
        directory = multiprocess_dir()
        if directory:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            collector: Any = multiprocess.MultiProcessCollector  # untyped in prometheus-client
            collector(registry, path=directory)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _n(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
