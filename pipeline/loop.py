"""The training, evaluation and export steps of the retraining loop: a candidate trained on every root,
the candidate and the champion scored on the same frozen test items, and the candidate exported as the
next version. The Prefect flows (``pipeline/flows.py``) wrap these plain functions; tests call them directly.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import storage
from pipeline.feedback_queue import DatasetRoots
from pipeline.options import TrainingOptions
from training.gate import GateItem, ModelAnswers, ReferenceScores


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
    quarantined: dict[str, list[str]] = field(default_factory=dict)


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
        label_overrides=request.roots.resolutions,
        verbose=2,
    )
    return TrainOutcome(
        run_id=result.run_id,
        model_name=result.model_name,
        labels=tuple(result.labels),
        metrics={"accuracy": float(result.accuracy), "macro_f1": float(result.macro_f1)},
        dataset_fingerprint=result.dataset_fingerprint,
        quarantined={c.sha256: list(c.labels) for c in result.data_report.quarantined},
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
            label_overrides=request.roots.resolutions,
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
