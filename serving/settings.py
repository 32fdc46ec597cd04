"""Typed settings of the serving process, read from the environment (``TFLOOP_SERVE_*``) or set by the CLI.

``python -m serving`` and ``tfloop serve`` build one :class:`ServingSettings` and pass it to
:func:`serving.app.create_app`; nothing in the serving code reads the environment on its own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VersionPolicy = Literal["latest"] | int
MIN_SECRET_CHARS = 16


class ServingSettings(BaseSettings):
    """Everything the serving process needs: which model, where feedback goes, limits and batching."""

    model_config = SettingsConfigDict(env_prefix="TFLOOP_SERVE_", extra="ignore", populate_by_name=True)

    model_base: str = Field(
        default=".tfloop/models",
        validation_alias=AliasChoices("TFLOOP_SERVE_MODEL_BASE", "TFLOOP_MODEL_BASE", "model_base"),
        description="Export base holding <name>/<version>/ folders (local path or gs://).",
    )
    model_name: str = Field(
        default="tfloop-classifier",
        validation_alias=AliasChoices("TFLOOP_SERVE_MODEL_NAME", "TFLOOP_MODEL_NAME", "model_name"),
        description="Name of the served model (the folder below the model base).",
    )
    version_policy: VersionPolicy = Field(
        default="latest",
        description="'latest' serves the highest complete version and follows new ones; an integer pins it.",
    )
    feedback_uri: str = Field(
        default=".tfloop/feedback",
        validation_alias=AliasChoices("TFLOOP_SERVE_FEEDBACK_URI", "TFLOOP_FEEDBACK_URI", "feedback_uri"),
        description="Feedback queue root (local path or gs://).",
    )
    cache_dir: Path = Field(
        default=Path(".tfloop/serving-cache"), description="Local copies of versions downloaded from GCS."
    )
    host: str = Field(default="0.0.0.0", description="Interface to listen on.")
    port: int = Field(default=8501, ge=1, le=65535, description="HTTP port (TF Serving's REST port).")
    grpc_port: int = Field(
        default=8500,
        ge=0,
        le=65535,
        description="gRPC port (TF Serving's gRPC API, in the same process as REST, sharing its batcher); "
        "0 turns gRPC off.",
    )
    grpc_reflection: bool = Field(
        default=True,
        description="Offer gRPC server reflection (grpcurl and other tools list the services without the "
        ".proto files); the services are TF Serving's public API.",
    )
    poll_interval_s: float = Field(default=10.0, gt=0, description="How often to look for a new version.")
    retry_failed_after_s: float = Field(
        default=300.0, ge=0, description="How long a version that failed to load is left alone."
    )
    max_batch_size: int = Field(default=32, ge=1, le=1024, description="Most images in one model call.")
    max_batch_wait_ms: float = Field(
        default=10.0,
        ge=0,
        description="Longest a request waits for others to join its batch (only while the batch is smaller "
        "than the last one, or requests are still arriving).",
    )
    batch_workers: int = Field(
        default=2,
        ge=1,
        le=16,
        description="Batches the model may run at once; under load each takes its share of the requests, so "
        "one batch's answers go out while another computes (see BENCHMARKS.md).",
    )
    tf_intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Threads one TensorFlow op may use (TF Serving's tensorflow_intra_op_parallelism); 0: "
        "the cores divided among the batch workers, so side-by-side batches do not fight over the cores.",
    )
    tf_inter_op_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="TensorFlow ops that may run at once (tensorflow_inter_op_parallelism); 0: one per core.",
    )
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="Request body limit (413).")
    max_discard_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Before answering 413, the server reads and drops the rest of a body up to this size, so "
        "that clients which write the whole body before reading see the 413 instead of a connection reset; "
        "larger bodies get the 413 at once and the connection closed. None: four times max_body_bytes.",
    )
    max_discard_s: float = Field(
        default=10.0, ge=0, description="Longest the server reads a refused body before answering 413."
    )
    max_image_pixels: int = Field(
        default=25_000_000, ge=1, description="Largest width*height accepted (decompression bombs)."
    )
    max_instances: int = Field(default=64, ge=1, description="Most instances in one :predict request.")
    recent_predictions: int = Field(
        default=1000,
        ge=0,
        description="Images of recent classifications kept by this replica, so that feedback posted here "
        "with only the prediction_id finds its image (an optimisation: any replica accepts the image sent "
        "with the prediction_id).",
    )
    recent_predictions_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="Memory bound of the kept classifications' images."
    )
    feedback_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TFLOOP_FEEDBACK_SECRET", "feedback_secret"),
        description="Key that signs prediction_ids (HMAC-SHA256); every replica needs the same one so that "
        "feedback is accepted by any of them. None: a random key per process (one replica only).",
    )
    prediction_ttl_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="How long a prediction_id is accepted by /feedback."
    )
    drain_s: float = Field(
        default=5.0,
        ge=0,
        description="After SIGTERM: seconds /readyz answers 503 while new requests are still served (the "
        "load balancer stops sending them), before the server stops accepting connections.",
    )
    shutdown_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="After the drain: longest wait for requests in progress before they are cancelled.",
    )
    allow_new_labels: bool = Field(default=False, description="Accept feedback labels the model lacks.")
    token: SecretStr | None = Field(
        default=None, description="Bearer token required by /feedback and admin routes; none: open."
    )
    production: bool | None = Field(
        default=None,
        description="Production mode: /feedback requires the token (and answers 503 until one is set), "
        "rate-limits each client and caps how many items one client may add to a label. None: on when the "
        "feedback queue is on gs://.",
    )
    feedback_rate_per_minute: float = Field(
        default=30.0, gt=0, description="Production mode: feedback posts one client may make per minute."
    )
    feedback_burst: int = Field(
        default=10,
        ge=1,
        description="Production mode: posts one client may make at once before the rate applies.",
    )
    feedback_label_cap: int = Field(
        default=50,
        ge=1,
        description="Production mode: most new items one client may add to one label per cap window.",
    )
    feedback_cap_window_s: float = Field(
        default=24 * 3600.0, gt=0, description="The window of feedback_label_cap."
    )
    trust_forwarded_for: bool = Field(
        default=False,
        description="Take the client of a request from the first X-Forwarded-For address (only behind a "
        "proxy that sets it); otherwise the connection's address.",
    )
    prediction_log: bool = Field(
        default=True,
        description="Record predictions to <feedback_uri>/predictions/<model>/ (content hash, version, "
        "top-k, margin, entropy, size and format; never the image or the client), in batches written off the "
        "request path.",
    )
    prediction_log_sample: float = Field(
        default=1.0, ge=0, le=1, description="Share of predictions written to the log (1: every one)."
    )
    prediction_log_flush_s: float = Field(
        default=10.0, gt=0, description="How often the logged predictions are written out as one batch."
    )
    prediction_log_max_pending: int = Field(
        default=50_000,
        ge=1,
        description="Most predictions held in memory for the next batch; beyond it they are dropped (and "
        'counted in tfloop_prediction_log{result="dropped"}).',
    )
    review_margin: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="A live prediction whose margin (top-1 minus top-2 score) is under this goes to the "
        "review queue (<feedback_uri>/review/, GET /review) with its image.",
    )
    review_max_items: int = Field(
        default=500,
        ge=0,
        description="Most items in the review queue: when full, a less confident prediction takes the place "
        "of the most confident one. 0: no review queue, and no image is ever kept.",
    )
    review_ttl_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="How long an item stays in the review queue (at most prediction_ttl_s, so that its "
        "prediction_id is still accepted).",
    )
    shadow_sample: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="While a candidate is loaded, the share of live predictions it also answers in the "
        "background (never sent to the client); its answer and agreement go to the prediction log.",
    )
    shadow_max_in_flight: int = Field(
        default=64, ge=1, description="Most shadow predictions waiting at once; more are skipped."
    )
    prefect_api_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TFLOOP_SERVE_PREFECT_API_URL", "PREFECT_API_URL", "prefect_api_url"),
        description="Prefect API (e.g. http://127.0.0.1:4200/api) that receives feedback events.",
    )
    prefect_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TFLOOP_SERVE_PREFECT_API_KEY", "PREFECT_API_KEY", "prefect_api_key"),
        description="Prefect API key (Prefect Cloud, or a server behind auth): sent as a bearer token.",
    )
    event_timeout_s: float = Field(default=5.0, gt=0, description="Timeout of one Prefect event POST.")
    log_level: str = Field(default="info", description="uvicorn log level.")

    @field_validator("version_policy", mode="before")
    @classmethod
    def _parse_policy(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower()
            if text.isdigit():
                return int(text)
            return text
        return value

    @field_validator("token", "feedback_secret", "prefect_api_key", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("feedback_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(
                f"TFLOOP_FEEDBACK_SECRET must have at least {MIN_SECRET_CHARS} characters; "
                "make one with `openssl rand -hex 32`"
            )
        return value

    @property
    def production_mode(self) -> bool:
        """Whether production mode is on: as set, else on for a feedback queue on ``gs://``."""
        if self.production is not None:
            return self.production
        return self.feedback_uri.startswith("gs://")

    def review_ttl(self) -> float:
        """How long review items live: ``review_ttl_s``, at most as long as their prediction ids."""
        return min(self.review_ttl_s, self.prediction_ttl_s)

    def discard_bytes(self) -> int:
        """Most bytes of a refused body read and dropped before the 413 (see ``max_discard_bytes``)."""
        return 4 * self.max_body_bytes if self.max_discard_bytes is None else self.max_discard_bytes

    @property
    def pinned_version(self) -> int | None:
        """The pinned version, or None when following the latest."""
        return self.version_policy if isinstance(self.version_policy, int) else None

    def tensorflow_threads(self) -> tuple[int, int]:
        """(intra-op, inter-op) TensorFlow threads: the settings, or what 0 stands for on this machine."""
        cores = available_cores()
        intra = self.tf_intra_op_threads or max(1, cores // self.batch_workers)
        return intra, self.tf_inter_op_threads or cores


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's CPU
    limit, which the affinity does not show)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return cores
