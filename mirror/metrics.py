"""Prometheus metrics of one service instance (a registry per app, so tests stay isolated).

When `mirror serve` runs several processes (ingress processes, the projection process) it
sets PROMETHEUS_MULTIPROC_DIR (``Settings.metrics_dir``): every process then records into that
directory and /metrics, whichever process answers it, reports the sum over all of them.
"""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector


class Metrics:
    """The counters and gauges served at GET /metrics."""

    def __init__(self, *, multiprocess: bool = False) -> None:
        """``multiprocess``: record into PROMETHEUS_MULTIPROC_DIR (which prometheus_client
        reads from the environment) and report the sum over every process."""
        self.registry = CollectorRegistry()
        r: CollectorRegistry | None = self.registry
        make_gauge = Gauge
        if multiprocess:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
            r = None  # values live in the shared directory; the collector reads them all
            # Gauges are set from the database, the same in every process: report the latest.
            make_gauge = partial(Gauge, multiprocess_mode="mostrecent")  # type: ignore[assignment]
        self.requests = Counter("mirror_webhook_requests", "Webhook requests by outcome",
                                ["outcome"], registry=r)
        self.verification_failures = Counter(
            "mirror_verification_failures", "Refused deliveries by reason", ["reason"], registry=r)
        self.duplicates = Counter("mirror_duplicate_deliveries",
                                  "Authentic deliveries of an event already stored", registry=r)
        self.append_seconds = Histogram(
            "mirror_append_seconds", "Time from request to durable commit", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.log_head = make_gauge("mirror_log_head_position", "Highest log position", registry=r)
        self.lag_events = make_gauge("mirror_projection_lag_events",
                                "Events not yet projected, by partition", ["partition"],
                                registry=r)
        self.lag_seconds = make_gauge("mirror_projection_lag_seconds",
                                 "Age of the oldest unprojected event", registry=r)
        self.horizon_seconds = make_gauge(
            "mirror_visibility_horizon_seconds",
            "Age of the oldest open transaction, which holds back projection", registry=r)
        self.anomalies = make_gauge("mirror_open_anomalies", "Unresolved anomalies", registry=r)
        self.unprojectable = make_gauge("mirror_unprojectable_events",
                                   "Stored events that cannot be projected", registry=r)
        self.poisoned = make_gauge("mirror_poisoned_objects", "Objects whose fold failed",
                                   registry=r)
        self.projected = Counter("mirror_projected_events", "Events folded", registry=r)
        self.completions = make_gauge(
            "mirror_truncated_deliveries",
            "Truncated deliveries by completion state (pending, completed, failed)", ["state"],
            registry=r)
        self.completion_attempts = Counter(
            "mirror_completion_attempts",
            "Tries to complete a truncated delivery, by outcome", ["outcome"], registry=r)
