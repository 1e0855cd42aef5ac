"""Prometheus metrics of one service instance (a registry per app, so tests stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The counters and gauges served at GET /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mirror_webhook_requests", "Webhook requests by outcome",
                                ["outcome"], registry=r)
        self.verification_failures = Counter(
            "mirror_verification_failures", "Refused deliveries by reason", ["reason"], registry=r)
        self.duplicates = Counter("mirror_duplicate_deliveries",
                                  "Authentic deliveries of an event already stored", registry=r)
        self.append_seconds = Histogram(
            "mirror_append_seconds", "Time from request to durable commit", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.log_head = Gauge("mirror_log_head_position", "Highest log position", registry=r)
        self.lag_events = Gauge("mirror_projection_lag_events",
                                "Events not yet projected, by partition", ["partition"],
                                registry=r)
        self.lag_seconds = Gauge("mirror_projection_lag_seconds",
                                 "Age of the oldest unprojected event", registry=r)
        self.horizon_seconds = Gauge(
            "mirror_visibility_horizon_seconds",
            "Age of the oldest open transaction, which holds back projection", registry=r)
        self.anomalies = Gauge("mirror_open_anomalies", "Unresolved anomalies", registry=r)
        self.unprojectable = Gauge("mirror_unprojectable_events",
                                   "Stored events that cannot be projected", registry=r)
        self.poisoned = Gauge("mirror_poisoned_objects", "Objects whose fold failed", registry=r)
        self.projected = Counter("mirror_projected_events", "Events folded", registry=r)
