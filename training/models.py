"""Transfer-learning classifiers: a Keras application backbone with its own preprocessing and a new head.

Every model takes float32 RGB pixels in ``[0, 255]`` of shape ``(None, S, S, 3)`` and returns softmax
probabilities. The backbone's preprocessing is a registered layer inside the model, so a saved ``.keras``
file restores with :func:`load_model` and serves raw pixels. Layer names are fixed (``preprocess``,
``backbone``, ``pool``, ``dropout``, ``predictions``) so training can freeze the backbone, unfreeze its top
layers, or train the head alone on cached backbone features. Importing this module imports Keras (and
TensorFlow): command-line code imports it inside the command.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

import storage
from storage import TfloopError

BACKBONE_LAYER = "backbone"
POOL_LAYER = "pool"
DROPOUT_LAYER = "dropout"
OUTPUT_LAYER = "predictions"
FROM_SCRATCH_BN_MOMENTUM = 0.9


class ModelError(TfloopError):
    """A model cannot be built or loaded as asked (unknown backbone, bad weights file, tiny input)."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: its Keras application, preprocessing mode and input sizes."""

    name: str
    application: str
    preprocessing: str
    default_image_size: int
    min_image_size: int


BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("vgg16", "VGG16", "caffe", 224, 32),
    "inception_v3": BackboneSpec("inception_v3", "InceptionV3", "tf", 299, 75),
    "efficientnet_b0": BackboneSpec("efficientnet_b0", "EfficientNetB0", "none", 224, 32),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 224, 32),
}
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def backbone_spec(backbone: str) -> BackboneSpec:
    """The spec of ``backbone``; a clear error listing the choices for an unknown name."""
    try:
        return BACKBONES[backbone]
    except KeyError:
        raise ModelError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}") from None


@keras.saving.register_keras_serializable(package="tfloop", name="BackbonePreprocessing")
class BackbonePreprocessing(keras.layers.Layer):
    """Maps RGB pixels in [0, 255] to what a backbone expects (``caffe``, ``tf`` or ``none``)."""

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in {"caffe", "tf", "none"}:
            raise ModelError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        if self.mode == "tf":
            return inputs / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = keras.ops.flip(inputs, axis=-1)
            return bgr - keras.ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=bgr.dtype)
        return inputs

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


CUSTOM_OBJECTS: dict[str, type[keras.layers.Layer]] = {"tfloop>BackbonePreprocessing": BackbonePreprocessing}


def _local_weights_file(weights: str, workdir: Path) -> Path:
    if storage.is_gcs(weights):
        target = workdir / Path(weights).name
        target.write_bytes(storage.read_bytes(weights))
        return target
    path = storage.local_path(weights)
    if not path.is_file():
        raise ModelError(f"weights file {weights} does not exist; pass imagenet, none, or a .weights.h5 file")
    return path


def _build_backbone(spec: BackboneSpec, *, image_size: int, weights: str) -> keras.Model:

    constructor = getattr(keras.applications, spec.application)
    keras_weights = "imagenet" if weights == "imagenet" else None
    try:
        backbone = constructor(
            include_top=False, weights=keras_weights, input_shape=(image_size, image_size, 3)
        )
    except (OSError, ValueError) as error:
        hint = (
            " (imagenet weights are downloaded by Keras: check the network, or pass a weights file)"
            if keras_weights
            else ""
        )
        raise ModelError(f"cannot build {spec.name} at {image_size}px: {error}{hint}") from error
    backbone.name = BACKBONE_LAYER
    if weights not in {"imagenet", "none"}:
        if not weights.endswith(".weights.h5"):
            raise ModelError(
                f"weights file {weights} must be a Keras `.weights.h5` file of the {spec.name} backbone"
            )
        with tempfile.TemporaryDirectory(prefix="tfloop-weights-") as workdir:
            try:
                backbone.load_weights(_local_weights_file(weights, Path(workdir)))
            except (OSError, ValueError) as error:
                raise ModelError(
                    f"cannot load weights {weights} into {spec.name} at {image_size}px: {error}. The file "
                    "must hold this backbone's weights without its top (include_top=False)"
                ) from error
    return backbone


def build_model(
    backbone: str,
    num_classes: int,
    *,
    image_size: int,
    weights: str = "none",
    dropout: float = 0.2,
) -> keras.Model:
    """A classifier: float32 ``(None, S, S, 3)`` pixels in [0, 255] -> softmax ``(None, num_classes)``.

    ``weights`` is ``imagenet`` (Keras downloads them), ``none`` (random init; BatchNorm momentum is
    lowered so moving statistics keep up on small data), or a local/``gs://`` ``.weights.h5`` file of the
    backbone without its top.
    """
    spec = backbone_spec(backbone)
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least two classes, got {num_classes}")
    if image_size < spec.min_image_size:
        raise ModelError(f"{backbone} needs --image-size >= {spec.min_image_size}, got {image_size}")
    base = _build_backbone(spec, image_size=image_size, weights=weights)
    if weights == "none":
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = FROM_SCRATCH_BN_MOMENTUM
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="image")
    x = BackbonePreprocessing(spec.preprocessing, name="preprocess")(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(x)
    x = keras.layers.Dropout(dropout, name=DROPOUT_LAYER)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"tfloop_{backbone}")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model of a tfloop classifier."""
    return model.get_layer(BACKBONE_LAYER)


def set_trainable(model: keras.Model, *, phase: str, unfreeze: int = 0) -> None:
    """Set trainable flags for a training phase.

    ``head``: backbone frozen (BatchNorm in inference mode), head trainable. ``fine_tune``: the top
    ``unfreeze`` backbone layers trainable except BatchNorm layers, which stay frozen so their statistics
    survive a small dataset. ``full``: everything trainable (training from random weights).
    """

    base = backbone_of(model)
    model.trainable = True
    if phase == "full":
        base.trainable = True
        for layer in base.layers:
            layer.trainable = True
        return
    if phase == "head":
        base.trainable = False
        return
    if phase != "fine_tune":
        raise ModelError(f"unknown training phase {phase!r}")
    base.trainable = True
    cut = max(0, len(base.layers) - max(0, unfreeze))
    for position, layer in enumerate(base.layers):
        top = position >= cut
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


def feature_extractor(model: keras.Model) -> keras.Model:
    """A model sharing ``model``'s layers that returns the pooled backbone features."""

    return keras.Model(model.inputs, model.get_layer(POOL_LAYER).output, name="features")


def head_model(model: keras.Model) -> keras.Model:
    """A model sharing ``model``'s head (dropout + dense) that maps pooled features to probabilities."""

    width = model.get_layer(POOL_LAYER).output.shape[-1]
    features = keras.Input(shape=(width,), dtype="float32", name="features")
    x = model.get_layer(DROPOUT_LAYER)(features)
    outputs = model.get_layer(OUTPUT_LAYER)(x)
    return keras.Model(features, outputs, name="head")


def save_model(model: keras.Model, path: Path) -> Path:
    """Save ``model`` as a ``.keras`` file (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def load_model(path: str | Path) -> keras.Model:
    """Restore a tfloop ``.keras`` model from a local path or ``gs://`` URI (custom layers registered)."""
    uri = str(path)
    with tempfile.TemporaryDirectory(prefix="tfloop-model-") as workdir:
        if storage.is_gcs(uri):
            local = Path(workdir) / "model.keras"
            local.write_bytes(storage.read_bytes(uri))
        else:
            local = storage.local_path(uri)
            if not local.is_file():
                raise ModelError(f"model file {uri} does not exist")
        try:
            return keras.saving.load_model(local, compile=False, custom_objects=CUSTOM_OBJECTS)
        except (OSError, ValueError, TypeError) as error:
            raise ModelError(f"cannot load model {uri}: {error}") from error
