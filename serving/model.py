"""The served model: one exported SavedModel version (:class:`ServedModel`) and the manager that picks,
loads, warms up and hot-swaps versions (:class:`ModelManager`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class ModelState:
    """Names of the load states, as TF Serving reports them in ``model_version_status``."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    END = "END"


class ModelManager:
    """Picks the version to serve (latest complete or pinned), loads and warms it, and hot-swaps.

    ``current`` is replaced by one assignment after the new version is loaded and warmed up; requests
    already holding the old model finish on it.
    """

    def __init__(
        self,
        settings: ServingSettings,
        *,
        on_loaded: Callable[[ServedModel], None] | None = None,
        on_load_failed: Callable[[int, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.current: ServedModel | None = None
        self.state = ModelState.START
        self.last_error: str | None = None
        self.failed: dict[int, float] = {}
        self._on_loaded = on_loaded
        self._on_load_failed = on_load_failed
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.current is not None and self.current.ready

    def require(self) -> ServedModel:
        """The model now serving, or ModelNotReady (503)."""
        model = self.current
        if model is None:
            detail = f": {self.last_error}" if self.last_error else ""
            raise ModelNotReady(
                f"model {self.settings.model_name!r} has no version loaded yet{detail}. "
                f"Check that {self.settings.model_base} holds a complete version, or wait for /readyz"
            )
        return model

    def require_version(self, name: str, version: int | None) -> ServedModel:
        """The model for a TF Serving request naming ``name`` and optionally ``version``; 404 otherwise."""
        if name != self.settings.model_name:
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise NotFound(f"Servable not found for request: {what}")
        model = self.require()
        if version is not None and version != model.version:
            raise NotFound(
                f"Servable not found for request: Specific({name}, {version}); "
                f"version {model.version} is being served"
            )
        return model

    def target_version(self) -> int | None:
        """The version that should be served now: the pinned one if complete, else the latest complete."""
        base, name = self.settings.model_base, self.settings.model_name
        pinned = self.settings.pinned_version
        if pinned is not None:
            return pinned if versions.is_complete(base, name, pinned) else None
        return versions.latest_version(base, name)

    def _local_copy(self, version: int) -> Path:
        source = versions.version_uri(self.settings.model_base, self.settings.model_name, version)
        if not storage.is_gcs(source):
            return storage.local_path(source)
        target = self.settings.cache_dir.expanduser() / self.settings.model_name / str(version)
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
        """Load and swap in the target version if it differs from the current one. True if swapped.

        Blocking (call it in a thread). Failures are recorded and logged, never raised: the old version
        keeps serving.
        """
        with self._lock:
            try:
                target = self.target_version()
            except storage.StorageError as error:
                self._record_failure(None, f"cannot list versions: {error}")
                return False
            current = self.current
            if target is None:
                if current is None:
                    self.last_error = self._missing_message()
                return False
            if current is not None and current.version == target:
                return False
            failed_at = self.failed.get(target)
            if failed_at is not None and time.monotonic() - failed_at < self.settings.retry_failed_after_s:
                return False
            if current is None:
                self.state = ModelState.LOADING
            started = time.perf_counter()
            try:
                model = self.load_version(target)
            except Exception as error:  # noqa: BLE001 -- a broken version must not stop serving
                self._record_failure(
                    target, f"version {target} failed to load: {type(error).__name__}: {error}"
                )
                return False
            self.current = model
            self.state = ModelState.AVAILABLE
            self.last_error = None
            self.failed.pop(target, None)
            logger.info(
                "serving %s version %d (loaded in %.1fs)", model.name, target, time.perf_counter() - started
            )
            if self._on_loaded is not None:
                self._on_loaded(model)
            return True

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
            self.failed[version] = time.monotonic()
            if self._on_load_failed is not None:
                self._on_load_failed(version, message)
        if self.current is None:
            self.state = ModelState.END if version is not None else self.state
