"""Export entry points: an MLflow training run (or an in-memory Keras model) -> a verified, published version.

``export_run`` reads a training run's artifacts (``model/model.keras``, ``labels.json``,
``train_config.json``, and the drift reference when the run has one), metrics (test and validation accuracy
and macro F1) and tags, then for both entry points: build the SavedModel in a temporary folder, verify it
against the Keras model, publish it (with the reference as ``reference.json``) as the next version below
``<base>/<model_name>/`` and (for runs) register it in the MLflow Model Registry with the alias
``challenger``. A failed verification publishes and registers nothing.

A run is published once per base: exporting a run again (a retried flow task, a second ``tfloop export``)
returns the complete version whose ``tfloop.json`` names the run, and registers it when a crash came
between publishing and registering. Two exports of one run at the same moment are not excluded here; the
loop's one-run-per-model concurrency limit keeps its own exports apart.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import ExportError
from export.publish import DEFAULT_STALE_AFTER_S, PublishedVersion, find_published_run, publish_version
from export.registry import CHALLENGER, find_registered_version, register_version
from export.savedmodel import DEFAULT_TOP_K, export_saved_model
from export.verify import VerificationReport, verify_saved_model
from storage.versions import REFERENCE_FILE

if TYPE_CHECKING:
    import keras
    from mlflow import MlflowClient

MODEL_ARTIFACT = "model/model.keras"
LABELS_ARTIFACT = "labels.json"
CONFIG_ARTIFACT = "train_config.json"
# The test split scores the exported model (the validation split picked its epochs): those are its metrics.
METRIC_NAMES = {
    "test_accuracy": "accuracy",
    "test_macro_f1": "macro_f1",
    "val_accuracy": "validation_accuracy",
    "val_macro_f1": "validation_macro_f1",
}
MODEL_NAME_TAG = "tfloop.model_name"
FINGERPRINT_TAG = "tfloop.dataset_fingerprint"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """A published version: its number, URI, registry version (None when not registered) and tfloop.json."""

    version: int
    path: str
    registered_version: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    verification: VerificationReport | None = None
    reused: bool = False


def _quiet(_: str) -> None:
    return None


def export_model(
    model: keras.Model,
    *,
    base: str,
    model_name: str,
    labels: Sequence[str],
    backbone: str = "custom",
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset_fingerprint: str | None = None,
    sample_images: Sequence[bytes] | None = None,
    top_k: int = DEFAULT_TOP_K,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    extra_files: Mapping[str, bytes] | None = None,
    progress: Progress = _quiet,
) -> ExportResult:
    """Export, verify and publish an in-memory Keras model (no registry). Returns the published version.
    ``extra_files`` (name -> content) go into the version folder beside ``tfloop.json``."""
    with tempfile.TemporaryDirectory(prefix="tfloop-export-") as scratch:
        progress("building the SavedModel (decode + resize + model, two signatures)")
        exported = export_saved_model(
            model,
            Path(scratch) / "saved_model",
            labels=labels,
            model_name=model_name,
            backbone=backbone,
            run_id=run_id,
            metrics=metrics,
            dataset_fingerprint=dataset_fingerprint,
            warmup_images=sample_images,
            top_k=top_k,
            extra_files=extra_files,
        )
        progress("verifying the SavedModel against the Keras model")
        report = verify_saved_model(
            exported.path, model, labels=labels, sample_images=sample_images, top_k=top_k
        )
        worst = max(report.max_abs_diff_bytes, report.max_abs_diff_images)
        progress(f"verified on {report.images} images (max difference {worst:.1e})")
        progress(f"publishing below {base}/{model_name}/")
        published = publish_version(
            exported.path, base=base, model_name=model_name, stale_after_s=stale_after_s
        )
    progress(f"published version {published.version} at {published.uri}")
    return ExportResult(
        version=published.version,
        path=published.uri,
        registered_version=None,
        metadata={**exported.metadata, "model_name": model_name, "version": published.version},
        verification=report,
    )


def _mlflow_client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _download(run_id: str, artifact: str, target: Path, tracking_uri: str) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(target), tracking_uri=tracking_uri
            )
        )
    except (MlflowException, OSError) as error:
        raise ExportError(
            f"run {run_id} has no usable artifact {artifact!r} ({error}); export a run made by `tfloop train`"
        ) from error


def _download_optional(run_id: str, artifact: str, target: Path, tracking_uri: str) -> bytes | None:
    """An artifact's bytes, or None when the run has none (runs logged before it existed)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(target), tracking_uri=tracking_uri
        )
        return Path(path).read_bytes()
    except (MlflowException, OSError):
        return None


def _load_keras_model(path: Path) -> keras.Model:
    try:
        from training.models import load_model
    except ImportError:
        import keras

        return keras.models.load_model(path, compile=False)
    return load_model(path)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def sample_images_from_dataset(
    roots: Sequence[str], *, image_size: int, count: int = 8, progress: Progress = _quiet
) -> list[bytes]:
    """Up to ``count`` decodable images from the first dataset root that has any, spread over its labels.

    Used as verification samples and warmup records, so both see real data; an unreadable root yields an
    empty list (the caller falls back to synthetic images).
    """
    import tensorflow as tf

    import storage
    from export.savedmodel import decode_image_bytes

    for root in roots:
        try:
            labels = storage.list_dirs(root)
            per_label = max(1, -(-count // max(1, len(labels))))
            chosen: list[bytes] = []
            for label in labels:
                folder = storage.join(root, label)
                names = [n for n in storage.list_files(folder) if n.lower().endswith(IMAGE_SUFFIXES)]
                taken = 0
                for name in names[: per_label * 3]:
                    data = storage.read_bytes(storage.join(folder, name))
                    try:
                        decode_image_bytes(tf.constant(data), image_size)
                    except tf.errors.InvalidArgumentError:
                        continue  # a corrupt dataset file is training's problem, not a warmup sample
                    chosen.append(data)
                    taken += 1
                    if taken >= per_label:
                        break
                if len(chosen) >= count:
                    break
        except storage.StorageError as error:
            progress(f"cannot read sample images from {root} ({error}); using synthetic images")
            continue
        if chosen:
            return chosen[:count]
    return []


def _read_json(path: Path, what: str, run_id: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"{what} of run {run_id} is not valid JSON ({error}); re-run training") from error


def export_run(
    run_id: str,
    *,
    base: str,
    tracking_uri: str,
    model_name: str | None = None,
    register: bool = True,
    sample_images: Sequence[bytes] | None = None,
    alias: str = CHALLENGER,
    progress: Progress = _quiet,
) -> ExportResult:
    """Export the model of MLflow training run ``run_id`` as the next version below ``base``.

    ``model_name`` defaults to the run's ``tfloop.model_name`` tag (then ``train_config.json``).
    With ``register`` the version is registered under that name with alias ``alias``. A run already
    published below ``base`` is not published again: its version comes back with ``reused=True``
    (registered now if it was not yet). Raises :class:`ExportError` (or a subclass) with a message that
    says what to fix.
    """
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ExportError(
            f"no MLflow run {run_id!r} at {tracking_uri} ({error.message}); pass a run id printed by "
            "`tfloop train --json` and the same tracking URI (MLFLOW_TRACKING_URI / TFLOOP_HOME)"
        ) from error

    with tempfile.TemporaryDirectory(prefix="tfloop-run-") as scratch:
        workdir = Path(scratch)
        progress(f"downloading the artifacts of run {run_id}")
        labels = _read_json(_download(run_id, LABELS_ARTIFACT, workdir, tracking_uri), "labels.json", run_id)
        config = _read_json(
            _download(run_id, CONFIG_ARTIFACT, workdir, tracking_uri), "train_config.json", run_id
        )
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ExportError(f"labels.json of run {run_id} must be a list of label strings")
        if not isinstance(config, dict):
            raise ExportError(f"train_config.json of run {run_id} must be a JSON object")
        name = model_name or run.data.tags.get(MODEL_NAME_TAG) or config.get("model_name")
        if not name:
            raise ExportError(
                f"run {run_id} names no model (tag {MODEL_NAME_TAG} or train_config.json model_name); "
                "pass --model-name"
            )
        metrics = {
            short: float(run.data.metrics[long])
            for long, short in METRIC_NAMES.items()
            if long in run.data.metrics
        }
        fingerprint = run.data.tags.get(FINGERPRINT_TAG) or config.get("dataset_fingerprint")
        existing = find_published_run(base, str(name), run_id)
        if existing is not None:
            progress(f"run {run_id} is already published as version {existing.version} at {existing.uri}")
            return _reuse(
                existing,
                run_id=run_id,
                tracking_uri=tracking_uri,
                register=register,
                metrics=metrics,
                fingerprint=fingerprint,
                alias=alias,
                progress=progress,
            )
        model_file = _download(run_id, MODEL_ARTIFACT, workdir, tracking_uri)
        from training.drift import REFERENCE_ARTIFACT

        reference = _download_optional(run_id, REFERENCE_ARTIFACT, workdir, tracking_uri)
        if reference is None:
            progress(f"run {run_id} has no {REFERENCE_ARTIFACT}: `tfloop monitor` cannot watch this version")
        progress("loading the Keras model")
        model = _load_keras_model(model_file)
        if sample_images is None:
            from export.savedmodel import model_image_size
            from export.warmup import synthetic_sample_images

            image_size = model_image_size(model)
            roots = [str(root) for root in config.get("data") or []]
            real = sample_images_from_dataset(roots, image_size=image_size, progress=progress)
            progress(f"verification and warmup use {len(real)} dataset images and synthetic ones")
            sample_images = real + synthetic_sample_images(image_size)
        result = export_model(
            model,
            base=base,
            model_name=str(name),
            labels=labels,
            backbone=str(config.get("backbone") or run.data.params.get("backbone") or "custom"),
            run_id=run_id,
            metrics=metrics,
            dataset_fingerprint=fingerprint,
            sample_images=sample_images,
            extra_files={REFERENCE_FILE: reference} if reference is not None else None,
            progress=progress,
        )

    registered = None
    if register:
        progress(f"registering {name} version {result.version} in the MLflow Model Registry")
        registered = register_version(
            tracking_uri=tracking_uri,
            model_name=str(name),
            run_id=run_id,
            export_uri=result.path,
            serving_version=result.version,
            metrics=metrics,
            dataset_fingerprint=fingerprint,
            alias=alias,
        ).registered_version
        progress(f"registered as {name} version {registered} (alias {alias})")
    return ExportResult(
        version=result.version,
        path=result.path,
        registered_version=registered,
        metadata=result.metadata,
        verification=result.verification,
    )


def _reuse(
    existing: PublishedVersion,
    *,
    run_id: str,
    tracking_uri: str,
    register: bool,
    metrics: Mapping[str, float],
    fingerprint: str | None,
    alias: str,
    progress: Progress,
) -> ExportResult:
    """The already published version of a run, registered now when it is not yet (no second version)."""
    from export.savedmodel import read_metadata

    entry = find_registered_version(
        model_name=existing.model_name, export_uri=existing.uri, tracking_uri=tracking_uri, run_id=run_id
    )
    registered = entry.registered_version if entry is not None else None
    if register and entry is None:
        progress(f"version {existing.version} was published but not registered; registering it now")
        registered = register_version(
            tracking_uri=tracking_uri,
            model_name=existing.model_name,
            run_id=run_id,
            export_uri=existing.uri,
            serving_version=existing.version,
            metrics=metrics,
            dataset_fingerprint=fingerprint,
            alias=alias,
        ).registered_version
    if registered is not None:
        progress(f"registered as {existing.model_name} version {registered}")
    return ExportResult(
        version=existing.version,
        path=existing.uri,
        registered_version=registered,
        metadata=read_metadata(existing.uri),
        reused=True,
    )
