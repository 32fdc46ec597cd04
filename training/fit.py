"""Training: scan the data, build the model, run the training phases, evaluate, and log everything to MLflow.

:func:`train` is the library entry point the CLI and the Prefect flows call. Phases:

- pretrained weights: ``head`` (backbone frozen) then ``fine_tune`` (top ``unfreeze`` backbone layers
  trainable, BatchNorm frozen, lower learning rate). When augmentation is off the head phase trains on
  backbone features computed once (``cache_features``).
- ``weights="none"``: ``full`` (all layers trainable), then optionally ``fine_tune`` of all layers at the
  lower learning rate.

Each phase keeps the best weights by validation accuracy (ties: lower validation loss), stops early after
``patience`` epochs without improvement (the validation split only; the test split is scored once at the
end, for the record and the promotion gate, and never selects anything), and checkpoints weights,
optimizer state and history every epoch in ``checkpoint_dir``: a crashed run started again with the same
config and data resumes where it stopped (same MLflow run). ``split.json`` records which images (sha256)
were in which split.
Devices (:mod:`training.accel`): ``precision`` (a Keras mixed precision policy; on GPUs by default),
``jit_compile`` (XLA; on GPUs by default) and ``distribute`` (one device, ``MirroredStrategy`` over the
GPUs of one machine, or ``MultiWorkerMirroredStrategy`` over the workers in ``TF_CONFIG``). With several
workers only the chief logs to MLflow and writes checkpoints to ``checkpoint_dir`` (a folder the workers
share, so a restarted worker resumes from the chief's last epoch); the others write to a temporary folder.
Every phase logs its training throughput (``<phase>_images_per_sec``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage import TfloopError
from training.accel import DeviceSetup, Distribute, JitCompile, Precision, choose_devices, shard_by_data
from training.data import AugmentConfig, DataReport, FileRecord, ScannedDataset, report_json, scan_dataset
from training.distribute import WorkerTracker
from training.drift import REFERENCE_ARTIFACT, DriftReference, build_reference, read_input_stats
from training.evaluate import EvalReport
from training.tracking import FINGERPRINT_TAG, MODEL_NAME_TAG, RunTracker, TrackingSettings

if TYPE_CHECKING:
    import keras
    import numpy as np
    import tensorflow as tf

    from training.models import ResolvedWeights

STATE_FILE = "state.json"
DATA_CACHE = "data-cache"
SPLIT_ARTIFACT = "split.json"
WEIGHTS_SHA256 = "weights_sha256"
WEIGHTS_SHA256_TAG = "tfloop.weights_sha256"


class TrainingError(TfloopError):
    """Training cannot run as configured."""


class TrainingParameters(BaseModel):
    """How to train, everything but the data and the model name: the one home of these options.

    :class:`TrainConfig` adds the dataset roots and the model name; the flows' ``TrainingOptions`` derive
    from this class too. ``validation_fraction`` (early stopping, best epoch) and ``test_fraction`` (the
    promotion gate only) split the images by content hash (:func:`training.data.split_for_hash`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str = Field(
        default="efficientnet_b0", description="vgg16, inception_v3 (GPU); efficientnet_b0, mobilenet_v2"
    )
    weights: str = Field(default="none", description="imagenet, none, or a path/gs:// URI of a weights file")
    image_size: int = Field(default=64, ge=32)
    epochs: int = Field(default=15, ge=1)
    fine_tune_epochs: int = Field(default=0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    fine_tune_learning_rate: float = Field(default=1e-4, gt=0)
    unfreeze: int = Field(default=20, ge=0, description="Top backbone layers trained in the fine-tune phase.")
    dropout: float = Field(default=0.2, ge=0, lt=1)
    augment: bool = False
    flip: bool = True
    rotation: float = Field(default=0.05, ge=0, le=0.5)
    zoom: float = Field(default=0.1, ge=0, lt=1)
    validation_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of images for early stopping and best-epoch selection."
    )
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of images held out for the promotion gate only."
    )
    min_images_per_label: int = Field(
        default=5, ge=1, description="Labels with fewer distinct images are left out of the run."
    )
    seed: int = 0
    patience: int = Field(default=8, ge=1)
    cache_features: bool = True
    precision: Precision = Field(
        default="auto", description="float32, mixed_float16, mixed_bfloat16; auto: mixed on capable GPUs."
    )
    jit_compile: JitCompile = Field(
        default="auto", description="XLA: on, off; auto: on for GPUs, off for CPUs."
    )
    distribute: Distribute = Field(
        default="auto",
        description="none, mirrored (GPUs of one machine), multi-worker (TF_CONFIG); auto picks by devices.",
    )

    @model_validator(mode="after")
    def _room_to_train(self) -> TrainingParameters:
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"validation_fraction {self.validation_fraction} + test_fraction {self.test_fraction} must "
                "stay below 1 (the rest trains)"
            )
        return self


class TrainConfig(TrainingParameters):
    """Everything that defines a training run (logged to MLflow as params and ``train_config.json``)."""

    data: tuple[str, ...] = Field(min_length=1, description="Dataset roots: folders or gs:// prefixes.")
    model_name: str = Field(default="tfloop-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from training.models import BACKBONES

        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of {sorted(BACKBONES)}")
        return value

    @property
    def augmentation(self) -> AugmentConfig | None:
        return AugmentConfig(flip=self.flip, rotation=self.rotation, zoom=self.zoom) if self.augment else None

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"


@dataclass(frozen=True)
class Phase:
    """One training phase: which layers train, for how many epochs, at which learning rate."""

    name: str
    trainable: Literal["head", "fine_tune", "full"]
    epochs: int
    learning_rate: float
    cached_features: bool = False


def plan_phases(config: TrainConfig) -> list[Phase]:
    """The phases ``config`` asks for (see the module docstring)."""
    if not config.pretrained:
        phases = [Phase("full", "full", config.epochs, config.learning_rate)]
        if config.fine_tune_epochs:
            phases.append(Phase("fine_tune", "full", config.fine_tune_epochs, config.fine_tune_learning_rate))
        return phases
    cached = config.cache_features and config.augmentation is None
    phases = [Phase("head", "head", config.epochs, config.learning_rate, cached_features=cached)]
    if config.fine_tune_epochs and config.unfreeze:
        phases.append(
            Phase("fine_tune", "fine_tune", config.fine_tune_epochs, config.fine_tune_learning_rate)
        )
    return phases


@dataclass
class TrainResult:
    """What a finished training run produced. ``accuracy``/``macro_f1`` and ``eval_report`` are on the test
    split (never used for selection); ``validation_report`` is the split that chose the epochs."""

    run_id: str
    model_name: str
    labels: list[str]
    accuracy: float
    macro_f1: float
    model: keras.Model
    data_report: DataReport
    eval_report: EvalReport
    validation_report: EvalReport
    dataset: ScannedDataset
    history: dict[str, list[float]]
    phases: list[str]
    resumed: bool
    seconds: float
    device: str = "cpu"
    precision: str = "float32"
    jit_compile: bool = False
    distribution: str = "none"
    workers: int = 1
    chief: bool = True

    @property
    def dataset_fingerprint(self) -> str:
        return self.data_report.fingerprint

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly part (what ``tfloop train --json`` prints)."""
        return {
            "run_id": self.run_id,
            "model_name": self.model_name,
            "labels": self.labels,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "validation_accuracy": self.validation_report.accuracy,
            "validation_macro_f1": self.validation_report.macro_f1,
            "images": self.data_report.images,
            "split": self.data_report.split_counts,
            "quarantined": self.data_report.quarantined_count,
            "duplicates": self.data_report.duplicates,
            "excluded_labels": self.data_report.excluded_labels,
            "train_images": sum(self.data_report.train_counts.values()),
            "validation_images": sum(self.data_report.validation_counts.values()),
            "skipped": self.data_report.skipped_total,
            "dataset_fingerprint": self.data_report.fingerprint,
            "phases": self.phases,
            "epochs_run": len(self.history.get("loss", [])),
            "resumed": self.resumed,
            "seconds": round(self.seconds, 1),
            "device": self.device,
            "precision": self.precision,
            "jit_compile": self.jit_compile,
            "distribution": self.distribution,
            "workers": self.workers,
            "chief": self.chief,
        }


# ---------------------------------------------------------------------------------------------------------
# checkpoint state


@dataclass
class CheckpointState:
    """Progress of a run in ``checkpoint_dir``: which phases are done and each phase's epochs so far."""

    path: Path
    run_key: str
    run_id: str | None = None
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load_or_new(cls, checkpoint_dir: Path, run_key: str) -> CheckpointState:
        path = checkpoint_dir / STATE_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("run_key") == run_key:
                return cls(
                    path=path, run_key=run_key, run_id=data.get("run_id"), phases=data.get("phases", {})
                )
        clear_checkpoints(checkpoint_dir)
        return cls(path=path, run_key=run_key)

    def phase(self, name: str) -> dict[str, Any]:
        return self.phases.setdefault(
            name, {"done": False, "epoch": 0, "best": None, "best_epoch": -1, "history": {}}
        )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({"run_key": self.run_key, "run_id": self.run_id, "phases": self.phases}))
        os.replace(temp, self.path)


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Remove a run's checkpoints (state and phase folders), keeping the downloaded-data cache."""
    if not checkpoint_dir.is_dir():
        return
    for entry in checkpoint_dir.iterdir():
        if entry.name == DATA_CACHE:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _save_weights_atomic(model: keras.Model, path: Path) -> None:
    temp = path.with_name(path.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(temp, overwrite=True)
    os.replace(temp, path)


def _save_optimizer(optimizer: keras.optimizers.Optimizer, path: Path) -> None:
    import numpy as np

    temp = path.with_name(f"{path.stem}.tmp.npz")
    np.savez(temp, *[np.asarray(variable) for variable in optimizer.variables])
    os.replace(temp, path)


def _restore_optimizer(model: keras.Model, path: Path) -> bool:
    import numpy as np

    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        return False
    if any(
        tuple(v.shape) != tuple(value.shape) for v, value in zip(optimizer.variables, values, strict=True)
    ):
        return False
    for variable, value in zip(optimizer.variables, values, strict=True):
        variable.assign(value)
    return True


def _score(logs: dict[str, float]) -> tuple[float, float] | None:
    """Higher is better: validation accuracy, ties broken by lower validation loss."""
    if "val_accuracy" not in logs:
        return None
    return float(logs["val_accuracy"]), -float(logs.get("val_loss", 0.0))


def _phase_callback(
    state: CheckpointState, phase: Phase, phase_dir: Path, patience: int
) -> keras.callbacks.Callback:
    """Per epoch: record history, keep the best weights, checkpoint last weights + optimizer, stop early."""
    import keras

    class PhaseCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = dict(logs or {})
            progress = state.phase(phase.name)
            for key, value in logs.items():
                progress["history"].setdefault(key, []).append(float(value))
            current = _score(logs)
            if current is not None and (progress["best"] is None or current > tuple(progress["best"])):
                progress["best"], progress["best_epoch"] = list(current), epoch
                _save_weights_atomic(self.model, phase_dir / "best.weights.h5")
            _save_weights_atomic(self.model, phase_dir / "last.weights.h5")
            _save_optimizer(self.model.optimizer, phase_dir / "optimizer.npz")
            progress["epoch"] = epoch + 1
            state.save()
            if epoch - progress["best_epoch"] >= patience:
                self.model.stop_training = True

    return PhaseCheckpoint()


# ---------------------------------------------------------------------------------------------------------
# devices


@contextlib.contextmanager
def _dtype_policy(name: str) -> Iterator[None]:
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# ---------------------------------------------------------------------------------------------------------
# features


def compute_features(
    extractor: keras.Model,
    records: Sequence[FileRecord],
    labels: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    local: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of ``records`` (one forward pass of ``extractor``, from
    :func:`training.models.feature_extractor`; reuse it to trace once) and their label indices.

    ``local``: every worker computes all features itself, in order (under a multi-worker strategy
    ``predict`` would gather the workers' shards)."""
    import numpy as np

    from training.data import make_image_dataset

    dataset = make_image_dataset(
        records, labels, image_size=image_size, batch_size=batch_size, training=False, cache=False
    )

    def images_only(images: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
        return images

    if local:
        import tensorflow as tf

        forward = tf.function(lambda images: extractor(images, training=False))
        parts = [np.asarray(forward(images)) for images in dataset.map(images_only)]
        width = int(extractor.output.shape[-1])
        features = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, width), np.float32)
    else:
        features = np.asarray(extractor.predict(dataset.map(images_only), verbose=0), dtype=np.float32)
    index = {label: i for i, label in enumerate(labels)}
    targets = np.asarray([index[r.label] for r in records], dtype=np.int32)
    return features, targets


def feature_dataset(
    features: np.ndarray, targets: np.ndarray, *, batch_size: int, training: bool, seed: int
) -> tf.data.Dataset:
    """Batches of cached features for training the head."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((features, targets))
    if training:
        dataset = dataset.shuffle(len(targets), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------------------
# the run


def run_key(config: TrainConfig, fingerprint: str) -> str:
    """Identity of a run for resuming: the config and the data fingerprint."""
    text = json.dumps({"config": config.model_dump(mode="json"), "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _params(
    config: TrainConfig, phases: Sequence[Phase], devices: DeviceSetup, weights: ResolvedWeights
) -> dict[str, Any]:
    params = config.model_dump(mode="json")
    params["data"] = ",".join(config.data)
    params["phases"] = ",".join(p.name for p in phases)
    params["cached_features"] = any(p.cached_features for p in phases)
    params.update(devices.params())
    if weights.sha256:
        params[WEIGHTS_SHA256] = weights.sha256
    return params


def compile_model(model: keras.Model, learning_rate: float, *, jit_compile: bool) -> None:
    """Adam on sparse cross-entropy. Under ``mixed_float16`` Keras wraps the optimizer in a
    ``LossScaleOptimizer`` itself (dynamic loss scaling); bfloat16 needs none."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def _throughput_callback(
    tracker: RunTracker | WorkerTracker, *, prefix: str, images: int, step_offset: int
) -> keras.callbacks.Callback:
    """Logs ``<prefix>_images_per_sec`` each epoch: training images over the training part of the epoch
    (validation excluded). The first epoch includes tracing and compilation."""
    import keras

    class Throughput(keras.callbacks.Callback):
        started = 0.0
        trained = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.started, self.trained = time.perf_counter(), 0.0

        def on_test_begin(self, logs: dict[str, float] | None = None) -> None:
            if not self.trained:
                self.trained = time.perf_counter() - self.started

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            seconds = self.trained or time.perf_counter() - self.started
            if seconds > 0:
                tracker.log_metrics({f"{prefix}_images_per_sec": images / seconds}, step=step_offset + epoch)

    return Throughput()


def _run_phase(
    phase: Phase,
    *,
    model: keras.Model,
    dataset: ScannedDataset,
    config: TrainConfig,
    state: CheckpointState,
    checkpoint_dir: Path,
    tracker: RunTracker | WorkerTracker,
    step_offset: int,
    images: tuple[tf.data.Dataset, tf.data.Dataset],
    callbacks: Sequence[keras.callbacks.Callback],
    verbose: int | str,
    devices: DeviceSetup,
) -> None:
    from training.models import feature_extractor, head_model, set_trainable

    phase_dir = checkpoint_dir / phase.name
    phase_dir.mkdir(parents=True, exist_ok=True)
    progress = state.phase(phase.name)
    set_trainable(model, phase=phase.trainable, unfreeze=config.unfreeze)
    if phase.cached_features:
        fit_model = head_model(model)
        extractor = feature_extractor(model)
        train_features, train_targets = compute_features(
            extractor,
            dataset.side("train"),
            dataset.labels,
            image_size=config.image_size,
            batch_size=config.batch_size,
            local=devices.distribution == "multi-worker",
        )
        val_features, val_targets = compute_features(
            extractor,
            dataset.side("validation"),
            dataset.labels,
            image_size=config.image_size,
            batch_size=config.batch_size,
            local=devices.distribution == "multi-worker",
        )
        train_data = feature_dataset(
            train_features, train_targets, batch_size=config.batch_size, training=True, seed=config.seed
        )
        val_data = feature_dataset(
            val_features, val_targets, batch_size=config.batch_size, training=False, seed=0
        )
        train_data, val_data = shard_by_data(train_data, devices), shard_by_data(val_data, devices)
    else:
        fit_model = model
        train_data, val_data = images
    compile_model(fit_model, phase.learning_rate, jit_compile=devices.jit_compile)
    initial_epoch = int(progress["epoch"])
    if initial_epoch and (phase_dir / "last.weights.h5").is_file():
        fit_model.optimizer.build(fit_model.trainable_variables)
        fit_model.load_weights(phase_dir / "last.weights.h5")
        if (phase_dir / "optimizer.npz").is_file():
            _restore_optimizer(fit_model, phase_dir / "optimizer.npz")
    else:
        initial_epoch = 0
    if initial_epoch < phase.epochs and not _early_stopped(progress, config.patience):
        fit_model.fit(
            train_data,
            validation_data=val_data,
            epochs=phase.epochs,
            initial_epoch=initial_epoch,
            shuffle=False,
            verbose=verbose,
            callbacks=[
                _phase_callback(state, phase, phase_dir, config.patience),
                tracker.epoch_callback(prefix=phase.name, step_offset=step_offset),
                _throughput_callback(
                    tracker, prefix=phase.name, images=len(dataset.side("train")), step_offset=step_offset
                ),
                *callbacks,
            ],
        )
    if (phase_dir / "best.weights.h5").is_file():
        fit_model.load_weights(phase_dir / "best.weights.h5")
    _save_weights_atomic(model, phase_dir / "final.weights.h5")
    progress["done"] = True
    state.save()


def _early_stopped(progress: dict[str, Any], patience: int) -> bool:
    return progress["best_epoch"] >= 0 and progress["epoch"] - 1 - progress["best_epoch"] >= patience


def _combined_history(
    state: CheckpointState, phases: Sequence[Phase]
) -> tuple[dict[str, list[float]], dict[str, int]]:
    history: dict[str, list[float]] = {}
    starts: dict[str, int] = {}
    for phase in phases:
        progress = state.phase(phase.name)
        starts[phase.name] = len(history.get("loss", []))
        for key, values in progress["history"].items():
            history.setdefault(key, []).extend(values)
    return history, starts


def _worker_checkpoint_dir(checkpoint_dir: Path, devices: DeviceSetup) -> Path:
    """The chief checkpoints in ``checkpoint_dir``. Another worker works in a temporary copy of the chief's
    progress there (so all workers resume from the same epoch) and never writes to it."""
    if devices.role.is_chief:
        return checkpoint_dir
    private = Path(tempfile.mkdtemp(prefix=f"tfloop-worker{devices.role.index}-"))
    if checkpoint_dir.is_dir():
        shutil.copytree(
            checkpoint_dir, private, dirs_exist_ok=True, ignore=shutil.ignore_patterns(DATA_CACHE, "*.tmp*")
        )
    return private


def _float32_copy(model: keras.Model, config: TrainConfig, num_classes: int) -> keras.Model:
    from training.models import build_model

    with _dtype_policy("float32"):
        clean = build_model(
            config.backbone, num_classes, image_size=config.image_size, weights="none", dropout=config.dropout
        )
    clean.set_weights(model.get_weights())
    return clean


def drift_reference(
    dataset: ScannedDataset, labels: Sequence[str], *, predicted: Sequence[int], scores: Sequence[float]
) -> DriftReference:
    """The run's reference for the drift watch: the training split's label shares and image headers (a
    sample of at most ``INPUT_SAMPLE``), and the model's answers on the test split (``predicted`` and
    ``scores`` in the test split's record order)."""
    train_records = dataset.side("train")
    return build_reference(
        labels=labels,
        train_labels=[record.label for record in train_records],
        test_predicted=[labels[int(index)] for index in predicted],
        test_confidences=scores,
        inputs=read_input_stats([record.local_path for record in train_records]),
    )


def train(
    config: TrainConfig,
    *,
    checkpoint_dir: Path | str,
    tracking: TrackingSettings | None = None,
    tracking_uri: str | None = None,
    experiment: str = "tfloop",
    artifact_root: str | None = None,
    data_cache_dir: Path | str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
    required_roots: Sequence[str] | None = None,
    label_overrides: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train, evaluate and log one model; resume from ``checkpoint_dir`` when it holds this run's progress.

    Tracking: pass ``tracking`` or ``tracking_uri`` (+ ``experiment``, ``artifact_root``). Images from GCS
    roots are downloaded below ``data_cache_dir`` (default ``checkpoint_dir/data-cache``).
    ``required_roots`` (default: the first data root) must hold files; other roots may be empty (an empty
    feedback queue). ``label_overrides`` (sha256 -> label) are a person's resolutions of quarantined
    images. Extra Keras ``callbacks`` run after tfloop's own at every epoch.
    """
    started = time.monotonic()
    if tracking is None:
        if tracking_uri is None:
            raise TrainingError(
                "train() needs tracking settings or a tracking_uri (MLflow) to log the run to"
            )
        tracking = TrackingSettings(
            tracking_uri=tracking_uri, experiment=experiment, artifact_root=artifact_root
        )
    devices = choose_devices(
        precision=config.precision,
        jit_compile=config.jit_compile,
        distribute=config.distribute,
        tf_config=os.environ.get("TF_CONFIG"),
    )
    checkpoint_dir = _worker_checkpoint_dir(Path(checkpoint_dir), devices)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dataset = scan_dataset(
        config.data,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
        min_images_per_label=config.min_images_per_label,
        cache_dir=Path(data_cache_dir) if data_cache_dir is not None else checkpoint_dir / DATA_CACHE,
        required_roots=required_roots,
        label_overrides=label_overrides,
    )
    for split, option in (("validation", "--validation-fraction"), ("test", "--test-fraction")):
        if not dataset.side(split):
            raise TrainingError(
                f"the {split} split is empty ({dataset.report.images} distinct images); add images or "
                f"raise {option}"
            )
    labels = list(dataset.labels)

    import keras

    from training.data import make_image_dataset
    from training.evaluate import evaluate_model, evaluate_model_answers
    from training.models import build_model, resolve_weights, save_model
    from training.plots import confusion_matrix_figure, training_curves_figure

    phases = plan_phases(config)
    weights_files = contextlib.ExitStack()
    weights = weights_files.enter_context(
        resolve_weights(config.backbone, config.weights, image_size=config.image_size)
    )
    state = CheckpointState.load_or_new(checkpoint_dir, run_key(config, dataset.fingerprint))
    resumed = state.run_id is not None
    tracker: RunTracker | WorkerTracker = (
        RunTracker(tracking, run_id=state.run_id, run_name=f"{config.model_name}-{config.backbone}")
        if devices.role.is_chief
        else WorkerTracker()
    )
    state.run_id = tracker.run_id
    state.save()
    try:
        if not resumed:
            tracker.log_params(_params(config, phases, devices, weights))
        tracker.set_tags(
            {
                MODEL_NAME_TAG: config.model_name,
                FINGERPRINT_TAG: dataset.fingerprint,
                "tfloop.backbone": config.backbone,
                **({WEIGHTS_SHA256_TAG: weights.sha256} if weights.sha256 else {}),
            }
        )
        tracker.log_dict(json.loads(report_json(dataset.report)), "data_report.json")
        tracker.log_dict(dataset.split_manifest(), SPLIT_ARTIFACT)
        tracker.log_dict(labels, "labels.json")
        tracker.log_dict(config.model_dump(mode="json"), "train_config.json")

        keras.utils.set_random_seed(config.seed)
        with (
            _dtype_policy(devices.precision),
            devices.strategy.scope(),
        ):
            model = build_model(
                config.backbone,
                len(labels),
                image_size=config.image_size,
                weights=weights,
                dropout=config.dropout,
            )
            weights_files.close()
            images = tuple(
                shard_by_data(split, devices)
                for split in (
                    make_image_dataset(
                        dataset.side("train"),
                        labels,
                        image_size=config.image_size,
                        batch_size=config.batch_size,
                        training=True,
                        augment=config.augmentation,
                        seed=config.seed,
                    ),
                    make_image_dataset(
                        dataset.side("validation"),
                        labels,
                        image_size=config.image_size,
                        batch_size=config.batch_size,
                        training=False,
                    ),
                )
            )
            step_offset = 0
            for phase in phases:
                final = checkpoint_dir / phase.name / "final.weights.h5"
                if state.phase(phase.name)["done"] and final.is_file():
                    model.load_weights(final)
                else:
                    _run_phase(
                        phase,
                        model=model,
                        dataset=dataset,
                        config=config,
                        state=state,
                        checkpoint_dir=checkpoint_dir,
                        tracker=tracker,
                        step_offset=step_offset,
                        images=images,
                        callbacks=callbacks,
                        verbose=verbose,
                        devices=devices,
                    )
                step_offset += phase.epochs
        if devices.mixed_precision or devices.distribution != "none":
            # Export and evaluation get a plain float32 model outside any strategy: the same contract as a
            # single-device run.
            model = _float32_copy(model, config, len(labels))

        validation_report = evaluate_model(
            model,
            dataset.side("validation"),
            labels,
            image_size=config.image_size,
            batch_size=config.batch_size,
        )
        report, test_predicted, test_scores = evaluate_model_answers(
            model, dataset.side("test"), labels, image_size=config.image_size, batch_size=config.batch_size
        )
        history, starts = _combined_history(state, phases)
        tracker.log_metrics(
            {
                "val_accuracy": validation_report.accuracy,
                "val_macro_f1": validation_report.macro_f1,
                **{f"val_f1_{label}": metrics.f1 for label, metrics in validation_report.per_class.items()},
                "test_accuracy": report.accuracy,
                "test_macro_f1": report.macro_f1,
                **{f"test_f1_{label}": metrics.f1 for label, metrics in report.per_class.items()},
            },
            step=step_offset,
        )
        tracker.log_dict(report.to_dict(), "eval_report.json")
        tracker.log_dict(validation_report.to_dict(), "validation_report.json")
        tracker.log_dict(
            drift_reference(dataset, labels, predicted=test_predicted, scores=test_scores).to_dict(),
            REFERENCE_ARTIFACT,
        )
        tracker.log_figure(
            confusion_matrix_figure(report, title="Test confusion matrix"), "confusion_matrix.png"
        )
        tracker.log_figure(training_curves_figure(history, phase_starts=starts), "training_curves.png")
        with tempfile.TemporaryDirectory(prefix="tfloop-model-") as workdir:
            tracker.log_file(save_model(model, Path(workdir) / "model.keras"), artifact_path="model")
        tracker.finish("FINISHED")
    except BaseException as error:
        weights_files.close()
        with contextlib.suppress(Exception):
            tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    clear_checkpoints(checkpoint_dir)
    if not devices.role.is_chief:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainResult(
        run_id=tracker.run_id,
        model_name=config.model_name,
        labels=labels,
        accuracy=report.accuracy,
        macro_f1=report.macro_f1,
        model=model,
        data_report=dataset.report,
        eval_report=report,
        validation_report=validation_report,
        dataset=dataset,
        history=history,
        phases=[p.name for p in phases],
        resumed=resumed,
        seconds=time.monotonic() - started,
        device=devices.description,
        precision=devices.precision,
        jit_compile=devices.jit_compile,
        distribution=devices.distribution,
        workers=devices.role.workers,
        chief=devices.role.is_chief,
    )
