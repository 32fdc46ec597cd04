"""Prometheus metrics of one serving app, in their own registry (several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    """Requests by protocol, route and status, latency, batch sizes, loaded version, feedback and event
    outcomes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tfloop_requests",
            "Requests by protocol (rest, grpc), route (gRPC: the full method name) and status (gRPC: the "
            "status code's name).",
            ["protocol", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tfloop_request_latency_seconds",
            "Request latency by protocol and route.",
            ["protocol", "method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tfloop_batch_size", "Images per model call.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.model_version = Gauge(
            "tfloop_model_version_loaded",
            "Version being served (0: none).",
            ["model"],
            registry=self.registry,
        )
        self.model_loads = Counter(
            "tfloop_model_loads", "Version loads by outcome.", ["model", "result"], registry=self.registry
        )
        self.feedback = Counter(
            "tfloop_feedback",
            "Feedback by outcome (accepted, duplicate, refused).",
            ["result"],
            registry=self.registry,
        )
        self.events = Counter(
            "tfloop_prefect_events",
            "Prefect events by outcome (sent, failed).",
            ["result"],
            registry=self.registry,
        )
        self.predict_errors = Counter(
            "tfloop_predict_errors", "Images the model failed on after validation.", registry=self.registry
        )
