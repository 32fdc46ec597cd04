"""Plain functions of the retraining loop that belong to no single stage.

Gathering the dataset roots (base dataset, corrections already used, corrections pending), consuming the
pending feedback a run trained on (moved under ``consumed/<run>/``, never deleted), describing why a run
started, and the end-of-run summary. The Prefect flows (``pipeline/flows.py``) wrap these; tests call them
directly.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

import storage
from storage.layout import CONSUMED, PENDING
from training.fit import TrainConfig, TrainingParameters
from training.gate import GateItem, GatePolicy, ModelAnswers, ReferenceScores

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
    live_version: int | None = None
    live_previous: int | None = None
    promoted: bool = False
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
    if result.live_version is not None:
        change = (
            f"promoted (was {result.live_previous})"
            if result.promoted and result.live_previous is not None
            else "promoted"
            if result.promoted
            else "unchanged"
        )
        lines.append(f"live: version {result.live_version} ({change})")
    else:
        lines.append("live: no version yet")
    lines += [f"skipped: {reason}" for reason in result.skipped]
    return "\n".join(lines)


# --- parameters of the flows (typed, shown in the Prefect UI) ---


class TrainingOptions(TrainingParameters):
    """How to train a candidate (the fields of :class:`training.fit.TrainingParameters`, among them the split
    fractions ``validation_fraction`` and ``test_fraction``); defaults are small enough for a CPU."""

    image_size: int = Field(default=64, ge=32, le=512)
    epochs: int = Field(default=5, ge=1)
    extra: dict[str, Any] = Field(
        default_factory=dict, description="More training fields (override the ones above)."
    )

    def train_config(self, *, data: Sequence[str], model_name: str) -> TrainConfig:
        """The run's :class:`training.fit.TrainConfig`: these fields, ``extra`` on top."""
        fields = {**self.model_dump(exclude={"extra"}), **self.extra}
        return TrainConfig(data=tuple(data), model_name=model_name, **fields)


class GateOptions(GatePolicy):
    """The gate's margins, minimum counts and floors: the fields of :class:`training.gate.GatePolicy`."""

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
    serving_url: str | None = Field(
        default=None,
        description="A serving process to smoke-test the candidate on (pinned version route)",
    )
    smoke_timeout_s: float = Field(default=120.0, gt=0)
    promote: bool = Field(
        default=True,
        description="Make the smoke-tested version live; false leaves it a candidate for `tfloop promote`",
    )


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
    from training.fit import train

    config = request.options.train_config(data=request.roots.all, model_name=request.model_name)
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
    """Which candidate run to score against the current champion, on which data (the split comes from
    the run itself: its ``train_config.json`` and ``split.json``)."""

    run_id: str
    model_name: str
    tracking_uri: str
    roots: DatasetRoots
    cache_dir: str


@dataclass(frozen=True)
class Evaluation:
    """Both models' answers on the same items (the run's test split, plus its corrected items of the
    other splits for the flags), the reference scores to hold the candidate to, and the champion compared.

    ``missing_test_items`` counts test images of the run that are no longer in the data (or now conflict).
    """

    run_id: str
    items: tuple[GateItem, ...]
    candidate: ModelAnswers
    champion: ModelAnswers | None
    reference: ReferenceScores | None = None
    champion_serving_version: int | None = None
    champion_registered_version: int | None = None
    missing_test_items: int = 0


def evaluate_candidate_and_champion(request: EvaluationRequest) -> Evaluation:
    """Answer the run's test items with the candidate (the run's Keras model) and the champion (its
    exported SavedModel); also the corrected items of the other splits (for the flags only).

    The dataset is scanned with the run's own split settings, and the test items are the run's
    ``split.json`` test hashes still present (the test split never moves an image, so every later run
    tests on a superset). The reference is the champion run's ``gate/reference.json`` when it has one.
    """
    from export.registry import champion_version
    from training import gate
    from training.data import scan_dataset
    from training.evaluate import keras_top1_fn
    from training.models import load_model

    feedback_roots = set(request.roots.feedback_roots)
    with tempfile.TemporaryDirectory(prefix="tfloop-gate-") as scratch:
        run = _download_candidate(request.run_id, request.tracking_uri, Path(scratch))
        scanned = scan_dataset(
            request.roots.all,
            validation_fraction=float(run.config["validation_fraction"]),
            test_fraction=float(run.config["test_fraction"]),
            min_images_per_label=int(run.config["min_images_per_label"]),
            cache_dir=Path(request.cache_dir),
            required_roots=[request.roots.base],
        )
        tested = set(run.split.get("test", []))
        seen = tested | set(run.split.get("train", [])) | set(run.split.get("validation", []))
        records = [
            r
            for r in scanned.records
            if (r.side == "test" and r.sha256 in tested)
            or (r.side != "test" and r.root in feedback_roots and r.sha256 in seen)
        ]
        items = gate.gate_items(records, corrected_roots=feedback_roots)
        model = load_model(run.model_path)
        candidate = gate.answer_records(keras_top1_fn(model, run.labels, image_size=run.image_size), records)
        champion_entry = champion_version(request.model_name, tracking_uri=request.tracking_uri)
        champion = reference = None
        if champion_entry is not None and champion_entry.export_uri:
            local_dir = _local_copy(champion_entry.export_uri, Path(scratch) / "champion")
            champion = gate.answer_records(gate.savedmodel_predict_fn(str(local_dir)), records)
            if champion_entry.run_id:
                reference = _reference_of(champion_entry.run_id, request.tracking_uri, Path(scratch) / "ref")
    return Evaluation(
        run_id=request.run_id,
        items=tuple(items),
        candidate=candidate,
        champion=champion,
        reference=reference,
        champion_serving_version=champion_entry.serving_version if champion_entry else None,
        champion_registered_version=champion_entry.registered_version if champion_entry else None,
        missing_test_items=len(tested - {item.sha256 for item in items if item.split == "test"}),
    )


def _local_copy(uri: str, target: Path) -> Path:
    return storage.download_tree(uri, target) if storage.is_gcs(uri) else storage.local_path(uri)


@dataclass(frozen=True)
class CandidateRun:
    """The artifacts of a training run the gate needs (the ones docs/contracts.md names)."""

    model_path: Path
    labels: list[str]
    image_size: int
    config: dict[str, Any]
    split: dict[str, list[str]]


def _fetch_artifact(run_id: str, artifact: str, tracking_uri: str, workdir: Path) -> Path:
    import mlflow.artifacts

    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(workdir), tracking_uri=tracking_uri
        )
    )


def _download_candidate(run_id: str, tracking_uri: str, workdir: Path) -> CandidateRun:
    """The run's Keras model file, label list, training config and split manifest."""
    import json

    from training.fit import SPLIT_ARTIFACT

    def fetch(artifact: str) -> Path:
        return _fetch_artifact(run_id, artifact, tracking_uri, workdir)

    from mlflow.exceptions import MlflowException

    labels = json.loads(fetch("labels.json").read_text())
    config = json.loads(fetch("train_config.json").read_text())
    try:
        split = json.loads(fetch(SPLIT_ARTIFACT).read_text())
    except (MlflowException, OSError) as error:
        raise storage.TfloopError(
            f"run {run_id} has no {SPLIT_ARTIFACT}: it was trained without the train/validation/test split "
            "the gate scores on; train the candidate again"
        ) from error
    return CandidateRun(
        model_path=fetch("model/model.keras"),
        labels=[str(label) for label in labels],
        image_size=int(config["image_size"]),
        config=config,
        split=split,
    )


def _reference_of(run_id: str, tracking_uri: str, workdir: Path) -> ReferenceScores | None:
    """The reference scores a blessed run carries (``gate/reference.json``), or None if it has none."""
    import json

    from mlflow.exceptions import MlflowException

    from training.gate import REFERENCE_ARTIFACT

    try:
        path = _fetch_artifact(run_id, REFERENCE_ARTIFACT, tracking_uri, workdir)
    except (MlflowException, OSError):
        return None
    return ReferenceScores.from_dict(json.loads(path.read_text()))


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
    feedback_uri: str | None = None


@dataclass(frozen=True)
class StepOutcome:
    """A delivery step that ran (``value`` is its product, e.g. the image reference) or was skipped.

    ``digest`` is the pushed image's manifest digest (``sha256:...``), what the rollout pins.
    """

    ran: bool
    detail: str
    value: str | None = None
    digest: str | None = None


class DeliveryError(storage.TfloopError):
    """A rollout or smoke test failed (the previous version keeps serving)."""


class RolledBackError(DeliveryError):
    """A rollout failed and was rolled back: retrying it would repeat the same rollout, so it is final."""


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


REGISTRY_REQUIRED = (
    "a cluster pulls images from a registry: set delivery.registry=HOST[:PORT] or delivery.rollout=false"
)


class DeliveryConfigError(DeliveryError):
    """The delivery options cannot work (checked before training, so no training time is spent)."""


def check_delivery(options: DeliveryOptions) -> None:
    """Refuse delivery options that cannot succeed, before anything is trained.

    With a cluster configured (kubeconfig or in a pod), rollout not disabled and an image to be built, the
    image must be pushed to a registry the cluster can pull from.
    """
    if options.rollout is False or options.build_image is False:
        return
    if cluster_configured(options) is not None:
        return
    where = "" if options.kubeconfig is None else f" (kubeconfig {options.kubeconfig})"
    if not options.registry:
        raise DeliveryConfigError(f"{REGISTRY_REQUIRED}{where}")
    if options.push is False:
        raise DeliveryConfigError(
            f"delivery.push=false with a cluster configured: the image would stay on this machine; "
            f"{REGISTRY_REQUIRED} (and leave delivery.push unset)"
        )


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
        f"; a serving process on {request.model_base} loads version {request.version} as its candidate "
        "(pinned routes) and serves it once it is promoted"
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
    pinned = f"; pushed as {built.pinned}" if built.pinned else " (not pushed)"
    return StepOutcome(
        ran=True,
        detail=f"built {built.image} ({built.digest}) with {built.builder}{pinned}",
        value=built.image,
        digest=built.digest if built.pushed else None,
    )


def roll_out_image(request: DeliveryRequest, *, image: str | None, digest: str | None = None) -> StepOutcome:
    """Roll ``image`` out (with its smoke test and automatic rollback); skip without an image or cluster.

    ``digest`` pins the image: the Deployment runs ``repo@digest``. A failed rollout raises
    :class:`RolledBackError` when it was rolled back (final: not retried), :class:`DeliveryError` otherwise.
    """
    options = request.options
    if options.rollout is False:
        return StepOutcome(ran=False, detail="rollout disabled (delivery.rollout=false)")
    if image is None:
        return StepOutcome(ran=False, detail="rollout skipped: no image was built")
    no_cluster = cluster_configured(options)
    if no_cluster:
        return StepOutcome(ran=False, detail=f"rollout skipped: {no_cluster}")
    from k8s.rollout import deploy
    from k8s.settings import ClusterSettings, DeployTarget, ServingSettings
    from k8s.smoke import SmokeSettings

    settings = ClusterSettings(
        kubeconfig=Path(options.kubeconfig) if options.kubeconfig else None,
        context=options.kube_context,
        namespace=options.namespace,
    )
    target = DeployTarget(
        image=image,
        model_name=request.model_name,
        version=request.version,
        run_id=request.run_id,
        digest=digest,
    )
    # The pods take their corrections to the queue this loop trains from, when it is one they can reach.
    shared_queue = (
        request.feedback_uri if request.feedback_uri and storage.is_gcs(request.feedback_uri) else None
    )
    result = deploy(
        target,
        settings=settings,
        serving=ServingSettings(feedback_uri=shared_queue) if shared_queue else None,
        timeout_s=options.rollout_timeout_s,
        smoke=SmokeSettings(),
    )
    if not result.ok:
        if result.rolled_back:
            raise RolledBackError(
                f"rollout of {target.reference} failed: {result.reason} (rolled back; the previous version "
                "keeps serving). Not retried: fix the cause and start a new run."
            )
        raise DeliveryError(f"rollout of {target.reference} failed: {result.reason}")
    smoke = f"; smoke test: {result.smoke.message}" if result.smoke else ""
    return StepOutcome(
        ran=True,
        detail=f"rolled out {target.reference} to {result.namespace}/{result.deployment}{smoke}",
        value="smoke-tested" if result.smoke else None,
    )


def smoke_test_serving(request: DeliveryRequest, *, rollout: StepOutcome) -> StepOutcome:
    """After a rollout its own smoke test counts; else smoke-test the candidate on a serving URL.

    The candidate is asked on its pinned routes (``/v1/models/<name>/versions/<N>``): a serving process
    loads a published version as candidate and answers pinned requests for it, while unpinned requests
    keep getting the live version until promotion. Waits up to ``delivery.smoke_timeout_s`` for it to load.
    """
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
            base_url=url,
            model_name=request.model_name,
            expected_version=request.version,
            timeout_s=10.0,
            pinned=True,
        )
        if result.ok:
            return StepOutcome(ran=True, detail=f"{url} (candidate, pinned): {result.message}", value=url)
        if time.monotonic() >= deadline:
            raise DeliveryError(
                f"smoke test of candidate version {request.version} at {url} failed after "
                f"{request.options.smoke_timeout_s:.0f} s: {result.message}; is the serving process "
                f"watching {request.model_base}? Nothing was promoted."
            )
        time.sleep(1.0)


@dataclass(frozen=True)
class PromotionOutcome:
    """What promotion did: the live version (and the one before it) and the registered ``champion``."""

    version: int
    previous: int | None
    registered_version: int
    live_pointer: str
    champion_alias: str


def promote_live(
    *, model_name: str, model_base: str, version: int, tracking_uri: str, promoted_by: str
) -> PromotionOutcome:
    """Make ``version`` live: the live pointer beside the versions, then MLflow's ``champion`` alias."""
    from export.registry import promote_version

    promotion = promote_version(
        model_name=model_name,
        model_base=model_base,
        version=version,
        tracking_uri=tracking_uri,
        promoted_by=promoted_by,
    )
    return PromotionOutcome(
        version=promotion.version,
        previous=promotion.previous,
        registered_version=promotion.registered_version,
        live_pointer=promotion.live_pointer,
        champion_alias=f"{model_name} registered version {promotion.registered_version}",
    )


def current_live_version(*, model_base: str, model_name: str) -> int | None:
    """The version unpinned requests get now (``storage.versions.live_version``)."""
    from storage import versions

    return versions.live_version(model_base, model_name)


# --- one loop run per model at a time ---


LOOP_LIMIT_PREFIX = "tfloop-loop-"


def loop_limit_name(model_name: str) -> str:
    """The name of the concurrency limit (one slot) that one model's loop runs share."""
    return f"{LOOP_LIMIT_PREFIX}{model_name}"


class LoopBusyError(storage.TfloopError):
    """Another loop run of the same model holds the model's lock on this machine."""


@contextlib.contextmanager
def local_loop_lock(lock_dir: Path, model_name: str, *, wait_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive OS file lock ``<lock_dir>/<limit name>.lock`` while the block runs.

    For runs without a Prefect server (``tfloop flows run --local``, the demo): their temporary Prefect
    servers do not share concurrency leases. The operating system drops the lock when the process ends, so
    a crashed run never leaves it held. ``wait_s`` None waits as long as it takes; otherwise
    :class:`LoopBusyError` after ``wait_s`` seconds.
    """
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{loop_limit_name(consumed_folder_name(model_name))}.lock"
    with path.open("a+") as handle:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LoopBusyError(
                        f"another loop run of {model_name} on this machine holds {path}; it runs one at a "
                        "time: wait for it to finish"
                    ) from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
