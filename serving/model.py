"""The served model: one exported SavedModel version (:class:`ServedModel`) and the manager that keeps the
live and the candidate version loaded, warmed up, and follows promotions (:class:`ModelManager`).

Reads the export format of docs/contracts.md ("export -> serving"): ``<base>/<name>/<version>/`` with
``saved_model.pb`` (complete marker), ``tfloop.json`` and the signatures ``serving_default``
(``image_bytes`` -> ``classes``/``scores``/``probabilities``) and ``predict_images``. Versions on GCS are
downloaded into a local cache first. A version that fails to load is reported and the old one keeps serving.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import storage
from serving.errors import InvalidInput, ModelNotReady, NotFound
from serving.settings import ServingSettings
from serving.tfserving import InputSpec, spec_from_tensor_spec
from storage import versions

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    classes: list[str]
    scores: list[float]
    probabilities: list[float]
    model_version: int

    def outputs(self) -> dict[str, Any]:
        return {"classes": self.classes, "scores": self.scores, "probabilities": self.probabilities}


def configure_tensorflow_threads(*, intra_op: int, inter_op: int) -> bool:
    """Size TensorFlow's thread pools for this process; False (and a warning) when TensorFlow already runs
    here with other sizes, which it can no longer change."""
    import tensorflow as tf

    threading_config = tf.config.threading
    try:
        threading_config.set_intra_op_parallelism_threads(intra_op)
        threading_config.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        current = (
            threading_config.get_intra_op_parallelism_threads(),
            threading_config.get_inter_op_parallelism_threads(),
        )
        if current != (intra_op, inter_op):
            logger.warning(
                "TensorFlow already runs in this process: it keeps (intra-op, inter-op) threads %s, not %s",
                current,
                (intra_op, inter_op),
            )
        return False
    return True


class ServedModel:
    """One loaded SavedModel version with its labels and signatures (KServe-style ``load``/``ready``)."""

    def __init__(self, path: Path, *, name: str, version: int) -> None:
        self.path = path
        self.name = name
        self.version = version
        self.ready = False
        self.metadata: dict[str, Any] = {}
        self.labels: list[str] = []
        self._signatures: dict[str, Any] = {}
        self._loaded: Any = None
        self._signature_def: dict[str, Any] = {}
        self._request_specs: dict[str, dict[str, InputSpec]] = {}
        self._image_input = ""

    def load(self) -> None:
        """Load the SavedModel and its metadata; raises on anything missing or malformed."""
        import tensorflow as tf

        metadata_file = self.path / versions.METADATA_FILE
        if metadata_file.is_file():
            self.metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
        labels = self.metadata.get("labels")
        if not labels:
            labels_file = self.path / "assets" / "labels.txt"
            labels = [line for line in labels_file.read_text(encoding="utf-8").splitlines() if line]
        self.labels = [str(label) for label in labels]
        self._loaded = tf.saved_model.load(str(self.path))
        self._signatures = dict(self._loaded.signatures)
        if DEFAULT_SIGNATURE not in self._signatures:
            raise ValueError(f"{self.path} has no {DEFAULT_SIGNATURE!r} signature")
        self._signature_def = self._read_signature_def()
        self._image_input = self.image_input_name()
        self.ready = True

    @property
    def image_size(self) -> int | None:
        size = self.metadata.get("image_size")
        return int(size) if size else None

    @property
    def signature_names(self) -> list[str]:
        return sorted(self._signatures)

    def signature(self, name: str | None) -> Any:
        chosen = name or DEFAULT_SIGNATURE
        if chosen not in self._signatures:
            raise InvalidInput(
                f"serving signature name: {chosen!r} not found in signature def; "
                f"known signatures: {', '.join(self.signature_names)}"
            )
        return self._signatures[chosen]

    def input_specs(self, name: str | None) -> dict[str, Any]:
        _, kwargs = self.signature(name).structured_input_signature
        return dict(kwargs)

    def request_specs(self, name: str | None) -> dict[str, InputSpec]:
        """What a TF Serving request must give each input of signature ``name`` (computed once)."""
        chosen = name or DEFAULT_SIGNATURE
        specs = self._request_specs.get(chosen)
        if specs is None:
            specs = {key: spec_from_tensor_spec(spec) for key, spec in self.input_specs(chosen).items()}
            self._request_specs[chosen] = specs
        return specs

    def output_specs(self, name: str | None) -> dict[str, Any]:
        return dict(self.signature(name).structured_outputs)

    def signature_def(self) -> dict[str, Any]:
        """The ``signature_def`` map as TF Serving's metadata endpoint answers it."""
        return self._signature_def

    def _read_signature_def(self) -> dict[str, Any]:
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((self.path / versions.COMPLETE_MARKER).read_bytes())
        signature_map = saved_model.meta_graphs[0].signature_def
        return {
            name: json_format.MessageToDict(signature_map[name], preserving_proto_field_name=True)
            for name in sorted(signature_map)
            if not name.startswith("__")
        }

    def run(self, signature_name: str | None, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call one signature with numpy inputs; outputs as numpy (strings decoded to ``str``)."""
        import tensorflow as tf

        signature = self.signature(signature_name)
        tensors = {key: tf.constant(value) for key, value in inputs.items()}
        outputs = signature(**tensors)
        result: dict[str, np.ndarray] = {}
        for key, tensor in outputs.items():
            array = tensor.numpy()
            if array.dtype == object:
                array = np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array)
            result[key] = array
        return result

    def image_input_name(self) -> str:
        """The single string input of ``serving_default`` (``image_bytes`` in the contract)."""
        specs = self.input_specs(DEFAULT_SIGNATURE)
        if "image_bytes" in specs:
            return "image_bytes"
        return next(iter(specs))

    def predict_bytes(self, images: Sequence[bytes]) -> list[Prediction]:
        """Classify encoded images in one model call."""
        import tensorflow as tf

        outputs = self._signatures[DEFAULT_SIGNATURE](**{self._image_input: tf.constant(list(images))})
        classes = outputs["classes"].numpy().tolist()
        scores = outputs["scores"].numpy().tolist()
        probabilities = outputs["probabilities"].numpy().tolist()
        return [
            Prediction(
                classes=[label.decode("utf-8", "replace") for label in classes[i]],
                scores=scores[i],
                probabilities=probabilities[i],
                model_version=self.version,
            )
            for i in range(len(images))
        ]

    def warmup(self, *, batch_sizes: Sequence[int]) -> None:
        """Run the model once per batch size on a generated image so first requests are not slow."""
        from PIL import Image

        size = self.image_size or 32
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), (127, 127, 127)).save(buffer, format="PNG")
        for batch_size in batch_sizes:
            self.predict_bytes([buffer.getvalue()] * batch_size)


class ImageJob(NamedTuple):
    """One encoded image for the dynamic batcher, with the model version that must classify it."""

    model: ServedModel
    image: bytes


def image_job_group(job: ImageJob) -> ServedModel:
    """The batcher's group of a job: its model, so that one model call never mixes versions."""
    return job.model


def predict_jobs(jobs: Sequence[ImageJob]) -> list[Prediction]:
    """The batch function: one model call for jobs of one model (the batcher groups them so)."""
    model = jobs[0].model
    if any(job.model is not model for job in jobs):
        raise RuntimeError("a batch mixed model versions; the batcher must group jobs by model")
    return model.predict_bytes([job.image for job in jobs])


class ModelState:
    """Names of the load states, as TF Serving reports them in ``model_version_status``."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    END = "END"


@dataclass(frozen=True)
class LoadedVersions:
    """What the manager serves at one moment; replaced whole (one assignment), never changed in place."""

    models: Mapping[int, ServedModel] = field(default_factory=dict)
    live: ServedModel | None = None
    candidate: ServedModel | None = None

    def labels_of(self, version: int) -> list[str]:
        """TF Serving's version labels (``live``, ``candidate``) that point at ``version``."""
        return [
            label
            for label, model in ((versions.LIVE_LABEL, self.live), (versions.CANDIDATE_LABEL, self.candidate))
            if model is not None and model.version == version
        ]


@dataclass(frozen=True)
class VersionStatus:
    """One entry of TF Serving's ``model_version_status``."""

    version: int
    state: str
    error: str = ""
    labels: tuple[str, ...] = ()


class ModelManager:
    """Keeps the **live** version (unpinned requests) and the newest **candidate** above it (pinned and
    labelled requests only) loaded, and follows ``<base>/<name>/live.json`` (docs/contracts.md).

    ``refresh`` (the poller calls it every poll interval) loads what the pointer and the published versions
    ask for and then swaps :attr:`loaded` in one assignment: a promotion moves every replica within one
    poll, publishing only adds a candidate. Requests resolve a :class:`ServedModel` once
    (:meth:`resolve`) and run on it to the end, so an answer is always computed by the version it names.
    """

    def __init__(
        self,
        settings: ServingSettings,
        *,
        on_loaded: Callable[[ServedModel], None] | None = None,
        on_load_failed: Callable[[int, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.loaded = LoadedVersions()
        self.state = ModelState.START
        self.last_error: str | None = None
        self.failed: dict[int, tuple[float, str]] = {}  # version -> (monotonic time, message)
        self._loading: int | None = None
        self._on_loaded = on_loaded
        self._on_load_failed = on_load_failed
        self._lock = threading.Lock()

    @property
    def current(self) -> ServedModel | None:
        """The live model, or None before the first version is loaded."""
        return self.loaded.live

    @property
    def ready(self) -> bool:
        return self.loaded.live is not None

    def require(self) -> ServedModel:
        """The live model, or ModelNotReady (503)."""
        model = self.loaded.live
        if model is None:
            detail = f": {self.last_error}" if self.last_error else ""
            raise ModelNotReady(
                f"model {self.settings.model_name!r} has no version loaded yet{detail}. "
                f"Check that {self.settings.model_base} holds a complete version, or wait for /readyz"
            )
        return model

    def resolve(self, name: str, *, version: int | None = None, label: str | None = None) -> ServedModel:
        """The loaded model a request for ``name`` gets: the live version, or exactly the ``version`` or the
        ``label`` (``live``/``candidate``) it names. NotFound (404, TF Serving's messages) when that is not
        loaded, never another version; ModelNotReady (503) when nothing is loaded yet."""
        if name != self.settings.model_name:
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise NotFound(f"Servable not found for request: {what}")
        if version is not None and label is not None:
            raise InvalidInput("name either a version or a version label, not both")
        view = self.loaded
        if version is not None:
            model = view.models.get(version)
            if model is None:
                served = ", ".join(str(v) for v in sorted(view.models)) or "none"
                raise NotFound(
                    f"Servable not found for request: Specific({name}, {version}); loaded versions: {served}"
                )
            return model
        if label is None or label == versions.LIVE_LABEL:
            return self.require()
        if label == versions.CANDIDATE_LABEL and view.candidate is not None:
            return view.candidate
        known = ", ".join(sorted({versions.LIVE_LABEL, versions.CANDIDATE_LABEL}))
        if label == versions.CANDIDATE_LABEL:
            raise NotFound(
                f"Unrecognized servable version label: {label} (no version above the live one is loaded)"
            )
        raise NotFound(f"Unrecognized servable version label: {label} (labels: {known})")

    def statuses(self) -> list[VersionStatus]:
        """TF Serving's status of every version this server knows: loaded ones AVAILABLE (newest first), the
        one loading, and those that failed to load."""
        view = self.loaded
        entries = [
            VersionStatus(v, ModelState.AVAILABLE, labels=tuple(view.labels_of(v)))
            for v in sorted(view.models, reverse=True)
        ]
        loading = self._loading
        if loading is not None and loading not in view.models:
            entries.append(VersionStatus(loading, ModelState.LOADING))
        for version, (_, message) in sorted(list(self.failed.items()), reverse=True):  # the poller writes it
            if version not in view.models and version != loading:
                entries.append(VersionStatus(version, ModelState.END, error=message))
        return entries

    def targets(self) -> tuple[int | None, int | None]:
        """(live, candidate) versions to serve now: the pinned version alone, or the live pointer's
        (the newest complete without one) and the newest complete version above it."""
        base, name = self.settings.model_base, self.settings.model_name
        pinned = self.settings.pinned_version
        if pinned is not None:
            return (pinned if versions.is_complete(base, name, pinned) else None), None
        live = versions.live_version(base, name)
        return live, versions.candidate_version(base, name, live=live)

    def _cache_folder(self, version: int) -> Path:
        return self.settings.cache_dir.expanduser() / self.settings.model_name / str(version)

    def _drop_local_copy(self, version: int) -> None:
        """Delete the cached download of an unloaded version (a pod's cache would fill up with every
        promotion); the loaded graph no longer reads its files, and a rollback downloads it again."""
        if storage.is_gcs(self.settings.model_base):
            shutil.rmtree(self._cache_folder(version), ignore_errors=True)

    def _local_copy(self, version: int) -> Path:
        source = versions.version_uri(self.settings.model_base, self.settings.model_name, version)
        if not storage.is_gcs(source):
            return storage.local_path(source)
        target = self._cache_folder(version)
        if (target / versions.COMPLETE_MARKER).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
        try:
            storage.download_tree(source, staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def load_version(self, version: int) -> ServedModel:
        """Download (if needed), load and warm up ``version``; does not swap it in."""
        model = ServedModel(self._local_copy(version), name=self.settings.model_name, version=version)
        model.load()
        model.warmup(batch_sizes=sorted({1, self.settings.max_batch_size}))
        return model

    def refresh(self) -> bool:
        """Load what :meth:`targets` asks for and swap it in; True when what is served changed.

        Blocking (call it in a thread). Failures are recorded and logged, never raised: a live version that
        fails to load leaves the previous live one serving.
        """
        with self._lock:
            try:
                live_target, candidate_target = self.targets()
            except storage.StorageError as error:
                self._record_failure(None, f"cannot read the versions: {error}")
                return False
            view = self.loaded
            if live_target is None:
                if view.live is None:
                    self.last_error = self._missing_message()
                return False
            models = dict(view.models)
            for version in (live_target, candidate_target):
                if version is not None and version not in models and self._may_load(version):
                    loaded = self._load(version, first=view.live is None)
                    if loaded is not None:
                        models[version] = loaded
            for version in self.failed.keys() - {live_target, candidate_target}:
                del self.failed[version]  # no longer wanted: forget it, and retry at once if wanted again
            live = models.get(live_target) or view.live
            candidate = models.get(candidate_target) if candidate_target is not None else None
            if candidate is live:
                candidate = None
            keep = {model.version: model for model in (live, candidate) if model is not None}
            if live is view.live and candidate is view.candidate and keep.keys() == view.models.keys():
                return False
            self.loaded = LoadedVersions(models=keep, live=live, candidate=candidate)
            if live is None:
                return True
            self.state = ModelState.AVAILABLE
            self.last_error = None
            if live is not view.live:
                logger.info("%s: live version %d", live.name, live.version)
            if candidate is not None and candidate is not view.candidate:
                logger.info(
                    "%s: candidate version %d (pinned and labelled requests only)",
                    live.name,
                    candidate.version,
                )
            for dropped in view.models.keys() - keep.keys():
                logger.info("%s: version %d unloaded", live.name, dropped)
                self._drop_local_copy(dropped)
            return True

    def _may_load(self, version: int) -> bool:
        failed = self.failed.get(version)
        return failed is None or time.monotonic() - failed[0] >= self.settings.retry_failed_after_s

    def _load(self, version: int, *, first: bool) -> ServedModel | None:
        if first:
            self.state = ModelState.LOADING
        self._loading = version
        started = time.perf_counter()
        try:
            model = self.load_version(version)
        except Exception as error:  # noqa: BLE001 -- a broken version must not stop serving
            self._record_failure(
                version, f"version {version} failed to load: {type(error).__name__}: {error}"
            )
            return None
        finally:
            self._loading = None
        self.failed.pop(version, None)
        logger.info("%s: version %d loaded in %.1fs", model.name, version, time.perf_counter() - started)
        if self._on_loaded is not None:
            self._on_loaded(model)
        return model

    def _missing_message(self) -> str:
        pinned = self.settings.pinned_version
        where = versions.model_uri(self.settings.model_base, self.settings.model_name)
        if pinned is not None:
            return f"pinned version {pinned} is not complete under {where}"
        return f"no complete version under {where}"

    def _record_failure(self, version: int | None, message: str) -> None:
        logger.error("%s", message)
        self.last_error = message
        if version is not None:
            self.failed[version] = (time.monotonic(), message)
            if self._on_load_failed is not None:
                self._on_load_failed(version, message)
        if self.loaded.live is None and version is not None:
            self.state = ModelState.END
