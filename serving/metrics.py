"""Prometheus metrics of one serving app, in their own registry (several apps may live in one process)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BYTES_BUCKETS = tuple(float(2**power) for power in range(10, 25, 2))  # 1 KiB .. 16 MiB
PIXELS_BUCKETS = tuple(float(side * side) for side in (32, 64, 128, 224, 299, 512, 1024, 2048, 4096))


class ServingMetrics:
    """Requests by protocol, route and status, latency, batch sizes, loaded version, feedback and event
    outcomes, and the drift watch's view of predictions: confidence, predicted classes, input size and
    format, the prediction log, the review queue and the shadow candidate."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
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
        self.confidence = Histogram(
            "tfloop_prediction_confidence",
            "Top-1 score of each prediction, by model version.",
            ["version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.predicted_class = Counter(
            "tfloop_predicted_class",
            "Predictions by model version and top-1 label (their shares: the predicted-class mix).",
            ["version", "label"],
            registry=self.registry,
        )
        self.input_bytes = Histogram(
            "tfloop_input_bytes",
            "Encoded size of each classified image.",
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )
        self.input_pixels = Histogram(
            "tfloop_input_pixels",
            "Width times height of each classified image.",
            buckets=PIXELS_BUCKETS,
            registry=self.registry,
        )
        self.input_format = Counter(
            "tfloop_input_format", "Classified images by format.", ["format"], registry=self.registry
        )
        self.prediction_log = Counter(
            "tfloop_prediction_log",
            "Predictions by what the log did with them (written, sampled_out, dropped, failed).",
            ["result"],
            registry=self.registry,
        )
        self.review = Counter(
            "tfloop_review",
            "Review queue changes (added, evicted, expired, reviewed, failed).",
            ["result"],
            registry=self.registry,
        )
        self.shadow = Counter(
            "tfloop_shadow",
            "Shadow predictions of the candidate (agreed, disagreed, failed, skipped).",
            ["result"],
            registry=self.registry,
        )

    def record_request(self, protocol: str, method: str, route: str, status: str, seconds: float) -> None:
        """Count one answered request and observe its latency (the label sets' children are looked up once:
        this runs on every request of every protocol)."""
        key = (protocol, method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(protocol, method, route, status),
                self.latency.labels(protocol, method, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """Observe ``values`` on one histogram (a metric without labels, or one label set's child) as one
    ``observe`` per value would, taking one lock per bucket touched instead of two per value. Falls back to
    ``observe`` one by one where prometheus_client keeps its buckets differently."""
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    top = bounds[-1]
    counts = Tally(bisect_left(bounds, value) for value in values if value <= top)  # NaN: in no bucket
    for index, count in counts.items():
        buckets[index].inc(count)
    total.inc(sum(float(value) for value in values))
