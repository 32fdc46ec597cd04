"""Build a TensorFlow SavedModel that takes raw image bytes from a Keras classifier (docs/contracts.md).

The SavedModel wraps the Keras model (float32 ``(None, S, S, 3)`` RGB in ``[0, 255]`` -> softmax) in two
signatures:

- ``serving_default``: ``image_bytes`` ``tf.string [None]`` (JPEG, PNG, GIF first frame, BMP; grayscale and
  RGBA become RGB) -> decode, resize to ``S x S`` (antialiased bilinear), float32 ``[0, 255]`` inside the
  graph, with the same function training uses (``training.data.decode_image``).
- ``predict_images``: ``images`` ``float32 [None, S, S, 3]`` for clients that decode themselves.

Both return ``classes`` (``tf.string [None, k]``, top-k labels), ``scores`` (``float32 [None, k]``) and
``probabilities`` (``float32 [None, n_labels]``, label order), k = min(top_k, n_labels). A malformed image
anywhere in a batch makes the call raise ``tf.errors.InvalidArgumentError`` for that call only (the
process and the loaded model stay usable); servers validate each image before batching.

The folder also holds ``assets/labels.txt``, ``tfloop.json``, the warmup records and any extra files the
caller passes (the training run's ``reference.json`` for the drift watch). It is written to a local folder;
:mod:`export.publish` turns it into a numbered version on a local or ``gs://`` base.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import ExportError
from export.warmup import synthetic_sample_images, write_warmup_file

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

SERVING_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
OUTPUT_KEYS = ("classes", "scores", "probabilities")
LABELS_ASSET = "labels.txt"
METADATA_FILE = "tfloop.json"
DEFAULT_TOP_K = 5
RESIZE_METHOD = "bilinear"


def tfloop_version() -> str:
    """The installed tfloop package version (``0+unknown`` when running from an uninstalled tree)."""
    try:
        return importlib_metadata.version("tfloop")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def decode_image_bytes(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """One encoded image (scalar ``tf.string``) -> float32 ``(S, S, 3)`` RGB in ``[0, 255]``.

    Exactly what training feeds the model: ``training.data.decode_image`` when the training package is
    installed (one definition, so training and serving cannot drift), else an identical local copy
    (decode with the first GIF frame, grayscale and RGBA to RGB; antialiased bilinear resize; no
    rescaling, the model holds its preprocessing). Raises ``tf.errors.InvalidArgumentError`` for bytes
    that are not a decodable image.
    """
    try:
        from training.data import decode_image
    except ImportError:
        return _decode_image_copy(image_bytes, image_size)
    return decode_image(image_bytes, image_size=image_size)


def _decode_image_copy(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    import tensorflow as tf

    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    resized = tf.image.resize(image, (image_size, image_size), method=RESIZE_METHOD, antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def decode_images(images: Sequence[bytes], image_size: int) -> tf.Tensor:
    """A batch of encoded images -> float32 ``(N, S, S, 3)``, decoded exactly like ``serving_default``."""
    import tensorflow as tf

    return tf.stack([decode_image_bytes(tf.constant(data), image_size) for data in images])


def model_image_size(model: keras.Model) -> int:
    """The square input size S of a model whose input is ``(None, S, S, 3)``; ExportError otherwise."""
    shape = tuple(model.input_shape) if not isinstance(model.input_shape, list) else None
    if shape is None or len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[1] != shape[2]:
        raise ExportError(
            f"the model's input shape is {model.input_shape}; export needs one input (None, S, S, 3) of "
            "RGB pixels. Build the model with training.models.build_model."
        )
    return int(shape[1])


def _build_module(model: keras.Model, labels: Sequence[str], image_size: int, top_k: int) -> Any:
    import tensorflow as tf

    labels_tensor = list(labels)
    k = min(top_k, len(labels_tensor))

    class ServingModule(tf.Module):
        """The Keras model plus its two serving signatures."""

        def __init__(self) -> None:
            super().__init__(name="tfloop_serving")
            self.model = model

        def outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            probabilities = tf.cast(self.model(images, training=False), tf.float32)
            scores, indices = tf.math.top_k(probabilities, k=k)
            classes = tf.gather(tf.constant(labels_tensor, dtype=tf.string), indices)
            return {"classes": classes, "scores": scores, "probabilities": probabilities}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        def serve_bytes(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
            images = tf.map_fn(
                lambda data: decode_image_bytes(data, image_size),
                image_bytes,
                fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
            )
            return self.outputs(images)

        @tf.function(
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=IMAGES_INPUT)]
        )
        def serve_images(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            return self.outputs(images)

    return ServingModule()


@dataclass(frozen=True)
class ExportedModel:
    """A SavedModel folder written by :func:`export_saved_model` and its ``tfloop.json`` content."""

    path: Path
    metadata: dict[str, Any]


def build_metadata(
    *,
    model_name: str,
    labels: Sequence[str],
    image_size: int,
    backbone: str = "custom",
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset_fingerprint: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    version: int | None = None,
) -> dict[str, Any]:
    """The ``tfloop.json`` document (docs/contracts.md); ``version`` is filled in when published."""
    return {
        "model_name": model_name,
        "version": version,
        "labels": list(labels),
        "backbone": backbone,
        "image_size": int(image_size),
        "run_id": run_id,
        "metrics": {key: float(value) for key, value in (metrics or {}).items()},
        "dataset_fingerprint": dataset_fingerprint,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tfloop_version": tfloop_version(),
        "top_k": min(int(top_k), len(labels)),
    }


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike[str],
    *,
    labels: Sequence[str],
    model_name: str,
    backbone: str = "custom",
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset_fingerprint: str | None = None,
    warmup_images: Sequence[bytes] | None = None,
    top_k: int = DEFAULT_TOP_K,
    extra_files: Mapping[str, bytes] | None = None,
) -> ExportedModel:
    """Write ``model`` as a SavedModel with both signatures, labels, ``tfloop.json`` and warmup records.

    ``export_dir`` is a local folder that must not exist yet or be empty. ``metrics`` uses the contract's
    keys (``accuracy``, ``macro_f1``). ``warmup_images`` are encoded images (default: a few synthetic
    ones). ``extra_files`` (plain file names -> content) are written beside ``tfloop.json``. Raises
    :class:`ExportError` when the model or labels do not fit the contract.
    """
    import tensorflow as tf

    labels = [str(label) for label in labels]
    if not labels:
        raise ExportError("the label list is empty; pass the labels in the model's output order")
    if len(set(labels)) != len(labels):
        raise ExportError(f"the labels contain duplicates ({labels}); each output needs its own label")
    if any("\n" in label for label in labels):
        raise ExportError("a label contains a newline; labels.txt holds one label per line")
    image_size = model_image_size(model)
    output_shape = tuple(model.output_shape) if not isinstance(model.output_shape, list) else ()
    if len(output_shape) != 2 or output_shape[1] != len(labels):
        raise ExportError(
            f"the model outputs shape {model.output_shape} but there are {len(labels)} labels; the model "
            "must output one probability per label (None, n_labels)"
        )
    if top_k < 1:
        raise ExportError(f"top_k must be at least 1, got {top_k}")
    extra = dict(extra_files or {})
    reserved = {METADATA_FILE, "saved_model.pb", "variables", "assets", "assets.extra"}
    if any(Path(name).name != name or name in reserved for name in extra):
        raise ExportError(
            f"extra files must be plain file names other than {sorted(reserved)}, got {sorted(extra)}"
        )
    target = Path(export_dir)
    if target.exists() and any(target.iterdir()):
        raise ExportError(f"{target} is not empty; export into a new folder")

    module = _build_module(model, labels, image_size, top_k)
    with tempfile.TemporaryDirectory(prefix="tfloop-labels-") as scratch:
        labels_file = Path(scratch) / LABELS_ASSET
        labels_file.write_text("\n".join(labels) + "\n", encoding="utf-8")
        module.labels_asset = tf.saved_model.Asset(str(labels_file))
        signatures = {
            SERVING_SIGNATURE: module.serve_bytes.get_concrete_function(),
            IMAGES_SIGNATURE: module.serve_images.get_concrete_function(),
        }
        try:
            tf.saved_model.save(module, str(target), signatures=signatures)
        except (ValueError, TypeError, tf.errors.OpError) as error:
            raise ExportError(f"TensorFlow could not save the model as a SavedModel: {error}") from error

    metadata = build_metadata(
        model_name=model_name,
        labels=labels,
        image_size=image_size,
        backbone=backbone,
        run_id=run_id,
        metrics=metrics,
        dataset_fingerprint=dataset_fingerprint,
        top_k=top_k,
    )
    write_metadata(target, metadata)
    for name, content in extra.items():
        (target / name).write_bytes(content)
    samples = list(warmup_images) if warmup_images else synthetic_sample_images(image_size)
    write_warmup_file(target, samples, model_name=model_name)
    return ExportedModel(path=target, metadata=metadata)


def write_metadata(saved_model_dir: str | os.PathLike[str], metadata: Mapping[str, Any]) -> Path:
    """Write ``tfloop.json`` into a local SavedModel folder (replacing the file, never editing it)."""
    from storage import write_text

    target = Path(saved_model_dir) / METADATA_FILE
    write_text(str(target), json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")
    return target


def read_metadata(version_dir: str) -> dict[str, Any]:
    """The ``tfloop.json`` of a SavedModel folder or published version (local path or ``gs://``)."""
    from storage import join, read_text

    try:
        document = json.loads(read_text(join(version_dir, METADATA_FILE)))
    except json.JSONDecodeError as error:
        raise ExportError(f"{join(version_dir, METADATA_FILE)} is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise ExportError(f"{join(version_dir, METADATA_FILE)} must hold a JSON object")
    return document
