"""Plain functions of the retraining loop that belong to no single stage.

Gathering the dataset roots (base dataset, corrections already used, corrections pending), consuming the
pending feedback a run trained on (moved under ``consumed/<run>/``, never deleted), describing why a run
started, and the end-of-run summary. The Prefect flows (``pipeline/flows.py``) wrap these; tests call them
directly.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

import storage
from storage.layout import CONSUMED, PENDING
from training.gate import EvaluationMetrics, GatePolicy

FEEDBACK_EVENT = "tfloop.feedback.received"


@dataclass(frozen=True)
class DatasetRoots:
    """Where a training run reads from, and which pending feedback files it will consume afterwards."""

    base: str
    feedback_roots: tuple[str, ...]
    pending_root: str
    pending_files: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        """Every root to scan: the base dataset first, then the feedback roots."""
        return [self.base, *self.feedback_roots]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pending_files(feedback_root: str) -> list[str]:
    """Relative paths ``<label>/<file>`` of the images waiting in ``<feedback_root>/pending/``."""
    return [name for name in storage.list_files(storage.join(feedback_root, PENDING)) if "/" in name]


def gather_roots(*, data_uri: str, feedback_root: str, include_consumed: bool = True) -> DatasetRoots:
    """The roots of a training run: the base dataset, earlier consumed corrections and pending ones.

    Corrections consumed by earlier runs stay training data (``include_consumed``), so a correction keeps
    counting after the run that first used it. The pending files are listed now: feedback that arrives
    while the run trains stays pending for the next run.
    """
    if not storage.exists(data_uri):
        raise storage.TfloopError(
            f"the base dataset {data_uri} is empty or missing; set TFLOOP_DATA_URI (or pass data_uri) to a "
            "folder or gs:// prefix laid out <label>/<image>, or run `tfloop data make-demo` to make one"
        )
    roots: list[str] = []
    if include_consumed:
        consumed = storage.join(feedback_root, CONSUMED)
        roots += [storage.join(consumed, run) for run in storage.list_dirs(consumed)]
    pending_root = storage.join(feedback_root, PENDING)
    roots.append(pending_root)
    return DatasetRoots(
        base=data_uri,
        feedback_roots=tuple(roots),
        pending_root=pending_root,
        pending_files=tuple(pending_files(feedback_root)),
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def consumed_folder_name(run_id: str) -> str:
    """A folder name for ``consumed/<run>/`` made from a run id (no path separators, never empty)."""
    name = _UNSAFE.sub("-", run_id).strip("-.")
    if not name:
        raise storage.TfloopError(f"run id {run_id!r} cannot name a folder; pass the MLflow run id")
    return name


@dataclass(frozen=True)
class ConsumeResult:
    """What :func:`consume_feedback` moved, and where to."""

    destination: str
    moved: int
    already_moved: int
    missing: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def consume_feedback(*, feedback_root: str, run_id: str, files: Sequence[str]) -> ConsumeResult:
    """Move the pending ``files`` (``<label>/<name>``) to ``consumed/<run>/<label>/<name>``; never delete.

    Idempotent: a file already at its destination (a re-run after a crash) counts as ``already_moved``.
    """
    destination = storage.join(feedback_root, CONSUMED, consumed_folder_name(run_id))
    moved = already = missing = 0
    for name in files:
        if name.startswith("/") or ".." in name.split("/"):
            raise storage.TfloopError(f"feedback file name {name!r} is not a relative <label>/<file> path")
        source = storage.join(feedback_root, PENDING, name)
        target = storage.join(destination, name)
        if storage.exists(source):
            storage.move(source, target)
            moved += 1
        elif storage.exists(target):
            already += 1
        else:
            missing += 1
    return ConsumeResult(destination=destination, moved=moved, already_moved=already, missing=missing)


def feedback_threshold_reached(*, feedback_root: str, threshold: int) -> bool:
    """The demo's stand-in for the server-side trigger: at least ``threshold`` corrections pending."""
    return len(pending_files(feedback_root)) >= threshold


def describe_trigger(reason: str | None, trigger: Mapping[str, Any] | None) -> str:
    """One line saying why a retraining run started (a manual call, a schedule, or an event)."""
    text = reason or "started manually"
    if trigger:
        details = ", ".join(
            f"{key}={value}" for key, value in sorted(trigger.items()) if value not in ("", None)
        )
        if details:
            text += f" ({details})"
    return text


@dataclass
class LoopResult:
    """The outcome of one train-and-deploy run, step by step (what the flow returns and the demo prints)."""

    run_id: str | None = None
    reason: str = ""
    model_name: str = ""
    gate_passed: bool | None = None
    gate_reason: str = ""
    candidate_metrics: dict[str, Any] = field(default_factory=dict)
    champion_metrics: dict[str, Any] | None = None
    exported_version: int | None = None
    export_path: str | None = None
    registered_version: str | None = None
    image: str | None = None
    rollout: str | None = None
    smoke_test: str | None = None
    feedback_consumed: int = 0
    champion_alias: str | None = None
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopResult:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known)


def format_summary(result: LoopResult) -> str:
    """A human summary of a run: what was trained, the gate's verdict, what happened after it."""
    lines = [f"run {result.run_id} ({result.reason})"]
    if result.gate_passed is not None:
        lines.append(f"gate: {'PASSED' if result.gate_passed else 'REFUSED'}: {result.gate_reason}")
    if result.exported_version is not None:
        lines.append(f"exported version {result.exported_version} -> {result.export_path}")
    if result.registered_version:
        lines.append(f"registered {result.model_name} version {result.registered_version}")
    if result.image:
        lines.append(f"image: {result.image}")
    if result.rollout:
        lines.append(f"rollout: {result.rollout}")
    if result.smoke_test:
        lines.append(f"smoke test: {result.smoke_test}")
    if result.feedback_consumed:
        lines.append(f"feedback consumed: {result.feedback_consumed} item(s)")
    if result.champion_alias:
        lines.append(f"champion: {result.champion_alias}")
    lines += [f"skipped: {reason}" for reason in result.skipped]
    return "\n".join(lines)


# --- parameters of the flows (typed, shown in the Prefect UI) ---


class TrainingOptions(BaseModel):
    """How to train a candidate; defaults are small enough for a CPU."""

    backbone: str = Field(
        default="efficientnet_b0", description="vgg16, inception_v3 (GPU); efficientnet_b0, mobilenet_v2"
    )
    weights: str = Field(default="none", description="imagenet, none, or a path/gs:// URI of a weights file")
    image_size: int = Field(default=64, ge=32, le=512)
    epochs: int = Field(default=5, ge=1)
    fine_tune_epochs: int = Field(default=0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    validation_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    min_images_per_label: int = Field(default=5, ge=1)
    seed: int = 0
    extra: dict[str, Any] = Field(default_factory=dict, description="More keyword arguments for training.")


class GateOptions(BaseModel):
    """The gate's margins and floors (fractions)."""

    max_accuracy_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    max_macro_f1_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    max_corrected_accuracy_drop: float = Field(default=0.0, ge=0.0, le=1.0)
    min_accuracy: float = Field(default=0.5, ge=0.0, le=1.0)
    min_macro_f1: float = Field(default=0.0, ge=0.0, le=1.0)
    min_corrected_items: int = Field(default=3, ge=1)

    def policy(self) -> GatePolicy:
        return GatePolicy(**self.model_dump())


class DeliveryOptions(BaseModel):
    """Image build, rollout and smoke test. ``None`` means: do it when the tools/cluster are there."""

    build_image: bool | None = Field(
        default=None, description="None: build when a builder and a cluster exist"
    )
    registry: str | None = Field(default=None, description="HOST[:PORT] to push the image to")
    push: bool | None = None
    base_image: str | None = None
    rollout: bool | None = Field(default=None, description="None: roll out when a cluster is configured")
    kubeconfig: str | None = None
    kube_context: str | None = None
    namespace: str | None = None
    rollout_timeout_s: float = Field(default=600.0, gt=0)
    serving_url: str | None = Field(default=None, description="A local serving process to smoke-test")
    smoke_timeout_s: float = Field(default=120.0, gt=0)


# --- steps: typed requests and outcomes, and the plain functions the tasks wrap ---


@dataclass(frozen=True)
class TrainRequest:
    """Everything a training run needs, so that a retry sees the same inputs (and the same checkpoint)."""

    roots: DatasetRoots
    model_name: str
    tracking_uri: str
    experiment: str
    artifact_root: str
    checkpoint_dir: str
    cache_dir: str
    options: TrainingOptions


@dataclass(frozen=True)
class TrainOutcome:
    """What a training run produced (the MLflow run holds the model and the reports)."""

    run_id: str
    model_name: str
    labels: tuple[str, ...]
    metrics: dict[str, float]
    dataset_fingerprint: str = ""


def train_candidate(request: TrainRequest) -> TrainOutcome:
    """Train on all roots with training/'s trainer; resumes from ``checkpoint_dir`` after a crash."""
    from training.train import TrainConfig, train

    options = request.options
    config = TrainConfig(
        data=tuple(request.roots.all),
        backbone=options.backbone,
        weights=options.weights,
        image_size=options.image_size,
        epochs=options.epochs,
        fine_tune_epochs=options.fine_tune_epochs,
        batch_size=options.batch_size,
        validation_fraction=options.validation_fraction,
        min_images_per_label=options.min_images_per_label,
        seed=options.seed,
        model_name=request.model_name,
        **options.extra,
    )
    result = train(
        config,
        checkpoint_dir=Path(request.checkpoint_dir),
        tracking_uri=request.tracking_uri,
        experiment=request.experiment,
        artifact_root=request.artifact_root,
        data_cache_dir=request.cache_dir,
        required_roots=[request.roots.base],
        verbose=2,
    )
    return TrainOutcome(
        run_id=result.run_id,
        model_name=result.model_name,
        labels=tuple(result.labels),
        metrics={"accuracy": float(result.accuracy), "macro_f1": float(result.macro_f1)},
        dataset_fingerprint=result.dataset_fingerprint,
    )


@dataclass(frozen=True)
class EvaluationRequest:
    """Which candidate run to score against the current champion, on which data."""

    run_id: str
    model_name: str
    tracking_uri: str
    roots: DatasetRoots
    validation_fraction: float
    min_images_per_label: int
    cache_dir: str


@dataclass(frozen=True)
class Evaluation:
    """Both models' metrics on the same held-out data, and which champion was compared."""

    run_id: str
    candidate: EvaluationMetrics
    champion: EvaluationMetrics | None
    champion_serving_version: int | None = None
    champion_registered_version: int | None = None


def evaluate_candidate_and_champion(request: EvaluationRequest) -> Evaluation:
    """Score the candidate (the run's Keras model) and the champion (its exported SavedModel) on the same
    held-out records: the validation side of every root, corrected-label items marked as such."""
    from export.registry import champion_version
    from training import gate
    from training.data import scan_dataset
    from training.evaluate import keras_predict_fn
    from training.models import load_model

    scanned = scan_dataset(
        request.roots.all,
        validation_fraction=request.validation_fraction,
        min_images_per_label=request.min_images_per_label,
        cache_dir=Path(request.cache_dir),
        required_roots=[request.roots.base],
    )
    held_out = scanned.side("validation")
    feedback_roots = set(request.roots.feedback_roots)
    with tempfile.TemporaryDirectory(prefix="tfloop-gate-") as scratch:
        model_path, labels, image_size = _download_candidate(
            request.run_id, request.tracking_uri, Path(scratch)
        )
        candidate_predict = keras_predict_fn(load_model(model_path), labels, image_size=image_size)
        candidate = gate.score_on_records(candidate_predict, held_out, corrected_roots=feedback_roots)
        champion_entry = champion_version(request.model_name, tracking_uri=request.tracking_uri)
        champion = None
        if champion_entry is not None and champion_entry.export_uri:
            local_dir = _local_copy(champion_entry.export_uri, Path(scratch) / "champion")
            champion_predict = gate.savedmodel_predict_fn(str(local_dir))
            champion = gate.score_on_records(champion_predict, held_out, corrected_roots=feedback_roots)
    return Evaluation(
        run_id=request.run_id,
        candidate=candidate,
        champion=champion,
        champion_serving_version=champion_entry.serving_version if champion_entry else None,
        champion_registered_version=champion_entry.registered_version if champion_entry else None,
    )


def _local_copy(uri: str, target: Path) -> Path:
    return storage.download_tree(uri, target) if storage.is_gcs(uri) else storage.local_path(uri)


def _download_candidate(run_id: str, tracking_uri: str, workdir: Path) -> tuple[Path, list[str], int]:
    """The run's Keras model file, label list and input size (the artifacts docs/contracts.md names)."""
    import json

    import mlflow.artifacts

    def fetch(artifact: str) -> Path:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(workdir), tracking_uri=tracking_uri
            )
        )

    labels = json.loads(fetch("labels.json").read_text())
    config = json.loads(fetch("train_config.json").read_text())
    return fetch("model/model.keras"), [str(label) for label in labels], int(config["image_size"])


def export_candidate(*, run_id: str, model_base: str, model_name: str, tracking_uri: str) -> dict[str, Any]:
    """Export the run's model as the next version under ``model_base`` and register it as challenger."""
    from export.api import export_run

    result = export_run(
        run_id, base=model_base, tracking_uri=tracking_uri, model_name=model_name, register=True
    )
    return {"version": result.version, "path": result.path, "registered_version": result.registered_version}


@dataclass(frozen=True)
class DeliveryRequest:
    """Which exported version to build, roll out and smoke-test, and how."""

    model_name: str
    model_base: str
    version: int
    run_id: str
    tracking_uri: str
    options: DeliveryOptions


@dataclass(frozen=True)
class StepOutcome:
    """A delivery step that ran (``value`` is its product, e.g. the image reference) or was skipped."""

    ran: bool
    detail: str
    value: str | None = None


class DeliveryError(storage.TfloopError):
    """A rollout or smoke test failed (the previous version keeps serving)."""


def cluster_configured(options: DeliveryOptions) -> str | None:
    """Why no cluster is configured (None when a kubeconfig or in-cluster config exists)."""
    import os

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    if options.kubeconfig:
        path = Path(options.kubeconfig).expanduser()
    else:
        entries = [entry for entry in os.environ.get("KUBECONFIG", "").split(os.pathsep) if entry]
        path = Path(entries[0]).expanduser() if entries else Path("~/.kube/config").expanduser()
    if path.is_file():
        return None
    return f"no cluster configured (no kubeconfig at {path}, not in a pod)"


def image_builder_missing() -> str | None:
    """Why no image can be built here (None when Docker or buildah is available)."""
    from export.image import buildah_available, docker_available

    if docker_available() or buildah_available():
        return None
    return "no image builder (no Docker Engine answers, buildah is not installed)"


def build_serving_image(request: DeliveryRequest) -> StepOutcome:
    """Build the serving image of the version when asked to, or when a builder and a cluster exist."""
    options = request.options
    local_note = (
        f"; a local serving process on {request.model_base} picks up version {request.version} itself"
    )
    if options.build_image is False:
        return StepOutcome(ran=False, detail="image build disabled (delivery.build_image=false)" + local_note)
    missing = image_builder_missing()
    if missing:
        return StepOutcome(ran=False, detail=f"image build skipped: {missing}" + local_note)
    if options.build_image is None and options.registry is None:
        no_cluster = cluster_configured(options)
        if no_cluster:
            return StepOutcome(
                ran=False,
                detail=f"image build skipped: {no_cluster} and no registry given; set "
                "delivery.build_image=true to build anyway" + local_note,
            )
    from export.image import ImageSpec, build_image

    spec_fields: dict[str, Any] = {
        "model_base": request.model_base,
        "model_name": request.model_name,
        "version": request.version,
        "registry": options.registry,
        "push": options.push,
        "mlflow_tracking_uri": request.tracking_uri,
    }
    if options.base_image:
        spec_fields["base_image"] = options.base_image
    built = build_image(ImageSpec(**spec_fields))
    return StepOutcome(
        ran=True, detail=f"built {built.image} ({built.digest}) with {built.builder}", value=built.image
    )


def roll_out_image(request: DeliveryRequest, *, image: str | None) -> StepOutcome:
    """Roll ``image`` out (with its smoke test and automatic rollback); skip without an image or cluster."""
    options = request.options
    if options.rollout is False:
        return StepOutcome(ran=False, detail="rollout disabled (delivery.rollout=false)")
    if image is None:
        return StepOutcome(ran=False, detail="rollout skipped: no image was built")
    no_cluster = cluster_configured(options)
    if no_cluster:
        return StepOutcome(ran=False, detail=f"rollout skipped: {no_cluster}")
    from k8s.rollout import deploy
    from k8s.settings import ClusterSettings, DeployTarget
    from k8s.smoke import SmokeSettings

    settings = ClusterSettings(
        kubeconfig=Path(options.kubeconfig) if options.kubeconfig else None,
        context=options.kube_context,
        namespace=options.namespace,
    )
    target = DeployTarget(
        image=image, model_name=request.model_name, version=request.version, run_id=request.run_id
    )
    result = deploy(target, settings=settings, timeout_s=options.rollout_timeout_s, smoke=SmokeSettings())
    if not result.ok:
        rolled_back = " (rolled back; the previous version keeps serving)" if result.rolled_back else ""
        raise DeliveryError(f"rollout of {image} failed: {result.reason}{rolled_back}")
    smoke = f"; smoke test: {result.smoke.message}" if result.smoke else ""
    return StepOutcome(
        ran=True,
        detail=f"rolled out {image} to {result.namespace}/{result.deployment}{smoke}",
        value="smoke-tested" if result.smoke else None,
    )


def smoke_test_serving(request: DeliveryRequest, *, rollout: StepOutcome) -> StepOutcome:
    """After a rollout its own smoke test counts; else wait for a local serving URL to serve the version."""
    if rollout.ran:
        return StepOutcome(ran=True, detail=rollout.detail.split("; smoke test: ")[-1], value=rollout.value)
    url = request.options.serving_url
    if not url:
        return StepOutcome(
            ran=False, detail="smoke test skipped: no rollout and no serving URL (delivery.serving_url)"
        )
    from k8s.smoke import smoke_test

    deadline = time.monotonic() + request.options.smoke_timeout_s
    while True:
        result = smoke_test(
            base_url=url, model_name=request.model_name, expected_version=request.version, timeout_s=10.0
        )
        if result.ok:
            return StepOutcome(ran=True, detail=f"{url}: {result.message}", value=url)
        if time.monotonic() >= deadline:
            raise DeliveryError(
                f"smoke test of {url} failed: {result.message}; "
                f"is the serving process watching {request.model_base}?"
            )
        time.sleep(1.0)


def promote_champion(*, model_name: str, registered_version: int, tracking_uri: str) -> str:
    """Move the MLflow alias ``champion`` to ``registered_version``."""
    from export.registry import promote

    promote(model_name, registered_version, tracking_uri=tracking_uri)
    return f"{model_name} registered version {registered_version}"
