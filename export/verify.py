"""Check an exported SavedModel before it is published: signatures, shapes, dtypes, and same answers as Keras.

The SavedModel is reloaded with plain ``tf.saved_model.load`` (what TensorFlow Serving and tfloop's server
do). Sample images go through ``serving_default`` as bytes and, decoded by the same graph function, through
the Keras model and ``predict_images``; every probability must agree within ``tolerance`` (1e-4), and
``classes``/``scores`` must be the top-k of ``probabilities``. Any difference raises
:class:`export.errors.VerificationError`, and the caller publishes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from export.errors import VerificationError
from export.savedmodel import (
    BYTES_INPUT,
    IMAGES_INPUT,
    IMAGES_SIGNATURE,
    OUTPUT_KEYS,
    SERVING_SIGNATURE,
    decode_images,
)
from export.warmup import synthetic_sample_images

if TYPE_CHECKING:
    import keras

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class VerificationReport:
    """What verification compared: image count and the largest probability differences seen."""

    images: int
    max_abs_diff_bytes: float
    max_abs_diff_images: float


def _check_signature(
    signature: Any,
    *,
    name: str,
    input_name: str,
    input_dtype: Any,
    input_shape: list[int | None],
    k: int,
    n: int,
) -> None:
    import tensorflow as tf

    _, kwargs = signature.structured_input_signature
    if list(kwargs) != [input_name]:
        raise VerificationError(f"signature {name!r} takes inputs {list(kwargs)}, expected [{input_name!r}]")
    spec = kwargs[input_name]
    if spec.dtype != input_dtype or spec.shape.as_list() != input_shape:
        raise VerificationError(
            f"signature {name!r} input {input_name!r} is {spec.dtype.name} {spec.shape.as_list()}, expected "
            f"{input_dtype.name} {input_shape}"
        )
    outputs = signature.structured_outputs
    expected = {
        "classes": (tf.string, [None, k]),
        "scores": (tf.float32, [None, k]),
        "probabilities": (tf.float32, [None, n]),
    }
    if sorted(outputs) != sorted(OUTPUT_KEYS):
        raise VerificationError(
            f"signature {name!r} returns {sorted(outputs)}, expected {sorted(OUTPUT_KEYS)}"
        )
    for key, (dtype, shape) in expected.items():
        got = outputs[key]
        if got.dtype != dtype or got.shape.as_list() != shape:
            raise VerificationError(
                f"signature {name!r} output {key!r} is {got.dtype.name} {got.shape.as_list()}, expected "
                f"{dtype.name} {shape}"
            )


def _check_top_k(result: dict[str, Any], labels: Sequence[str], k: int, name: str) -> None:
    import numpy as np

    probabilities = result["probabilities"].numpy()
    scores = result["scores"].numpy()
    classes = result["classes"].numpy()
    expected_scores = -np.sort(-probabilities, axis=1)[:, :k]
    if not np.allclose(scores, expected_scores, atol=1e-6):
        raise VerificationError(f"signature {name!r}: scores are not the top-{k} probabilities")
    label_array = np.array([label.encode() for label in labels], dtype=object)
    for row, (row_classes, row_probs) in enumerate(zip(classes, probabilities, strict=True)):
        indices = [list(label_array).index(value) for value in row_classes if value in label_array]
        if len(indices) != k or not np.allclose(row_probs[indices], scores[row], atol=1e-6):
            raise VerificationError(
                f"signature {name!r}: classes of image {row} do not match the probabilities in label order"
            )


def verify_saved_model(
    saved_model_dir: str | os.PathLike[str],
    model: keras.Model,
    *,
    labels: Sequence[str],
    sample_images: Sequence[bytes] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    top_k: int = 5,
) -> VerificationReport:
    """Reload ``saved_model_dir`` and check it against ``model``; raises VerificationError on a mismatch."""
    import numpy as np
    import tensorflow as tf

    from export.savedmodel import model_image_size

    image_size = model_image_size(model)
    n = len(labels)
    k = min(top_k, n)
    try:
        loaded = tf.saved_model.load(str(saved_model_dir))
    except (OSError, ValueError, tf.errors.OpError) as error:
        raise VerificationError(f"the SavedModel at {saved_model_dir} does not load: {error}") from error
    for name in (SERVING_SIGNATURE, IMAGES_SIGNATURE):
        if name not in loaded.signatures:
            raise VerificationError(
                f"the SavedModel has no {name!r} signature (it has {sorted(loaded.signatures)}); "
                "export it with export.savedmodel.export_saved_model"
            )
    _check_signature(
        loaded.signatures[SERVING_SIGNATURE],
        name=SERVING_SIGNATURE,
        input_name=BYTES_INPUT,
        input_dtype=tf.string,
        input_shape=[None],
        k=k,
        n=n,
    )
    _check_signature(
        loaded.signatures[IMAGES_SIGNATURE],
        name=IMAGES_SIGNATURE,
        input_name=IMAGES_INPUT,
        input_dtype=tf.float32,
        input_shape=[None, image_size, image_size, 3],
        k=k,
        n=n,
    )

    images = list(sample_images) if sample_images else synthetic_sample_images(image_size)
    try:
        pixels = decode_images(images, image_size)
    except tf.errors.InvalidArgumentError as error:
        raise VerificationError(
            f"a sample image cannot be decoded ({error.message}); pass JPEG, PNG, GIF or BMP samples"
        ) from error
    expected = np.asarray(model(pixels, training=False), dtype=np.float32)
    from_bytes = loaded.signatures[SERVING_SIGNATURE](**{BYTES_INPUT: tf.constant(images)})
    from_pixels = loaded.signatures[IMAGES_SIGNATURE](**{IMAGES_INPUT: pixels})
    diffs = []
    for name, result in ((SERVING_SIGNATURE, from_bytes), (IMAGES_SIGNATURE, from_pixels)):
        probabilities = result["probabilities"].numpy()
        if probabilities.shape != expected.shape:
            raise VerificationError(
                f"signature {name!r} returned probabilities of shape {probabilities.shape}, "
                f"Keras {expected.shape}"
            )
        diff = float(np.max(np.abs(probabilities - expected))) if expected.size else 0.0
        if not np.isfinite(diff) or diff > tolerance:
            raise VerificationError(
                f"signature {name!r} differs from the Keras model by {diff:.2e} (limit {tolerance:.0e}) on "
                f"{len(images)} sample images; the export does not reproduce the model, nothing was published"
            )
        _check_top_k(result, labels, k, name)
        diffs.append(diff)
    return VerificationReport(images=len(images), max_abs_diff_bytes=diffs[0], max_abs_diff_images=diffs[1])
