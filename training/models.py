"""Transfer-learning classifiers: a Keras application backbone with its own preprocessing and a new head.

Every model takes float32 RGB pixels in ``[0, 255]`` of shape ``(None, S, S, 3)`` and returns softmax
probabilities. The backbone's preprocessing is a registered layer inside the model, so a saved ``.keras``
file restores with :func:`load_model` and serves raw pixels. Layer names are fixed (``preprocess``,
``backbone``, ``pool``, ``dropout``, ``predictions``) so training can freeze the backbone, unfreeze its top
layers, or train the head alone on cached backbone features. Importing this module imports Keras (and
TensorFlow): command-line code imports it inside the command.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
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
    imagenet_url: str
    """Where Keras downloads the ImageNet weights without the top; ``{rows}`` is the input size bucket."""

    def imagenet_file_name(self, image_size: int) -> str:
        """The file name Keras looks for in its cache folder (:func:`keras_models_cache`)."""
        return self.imagenet_url.rsplit("/", 1)[-1].format(rows=_mobilenet_rows(image_size))


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications"
BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(
        "vgg16",
        "VGG16",
        "caffe",
        224,
        32,
        f"{_KERAS_APPS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "inception_v3": BackboneSpec(
        "inception_v3",
        "InceptionV3",
        "tf",
        299,
        75,
        f"{_KERAS_APPS}/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0",
        "EfficientNetB0",
        "none",
        224,
        32,
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2",
        "MobileNetV2",
        "tf",
        224,
        32,
        f"{_KERAS_APPS}/mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{{rows}}_no_top.h5",
    ),
}
_MOBILENET_ROWS = (96, 128, 160, 192, 224)


def _mobilenet_rows(image_size: int) -> int:
    # MobileNetV2 ships ImageNet weights for five input sizes and falls back to 224 for any other size.
    return image_size if image_size in _MOBILENET_ROWS else 224


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


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights a model starts from: what was asked (``imagenet``, ``none``, a path or ``gs://`` URI),
    the local file that is loaded (``None`` for ``none``) and that file's sha256."""

    requested: str
    path: Path | None
    sha256: str | None

    @property
    def imagenet(self) -> bool:
        return self.requested == "imagenet"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keras_models_cache() -> Path:
    """Keras' cache folder for application weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    from keras.src.backend.config import keras_home

    return Path(keras_home()).expanduser() / "models"


def imagenet_weights_file(
    backbone: str, *, image_size: int, cache_dir: Path | None = None, download: bool = True
) -> Path:
    """The ImageNet weights file of ``backbone`` (without top) in Keras' cache, downloaded when missing.

    Offline (or with ``download=False``) and not cached, one :class:`ModelError` says where to put the
    file or how to pass one instead.
    """
    spec = backbone_spec(backbone)
    folder = cache_dir or keras_models_cache()
    name = spec.imagenet_file_name(image_size)
    target = folder / name
    if target.is_file():
        return target
    problem = "downloads are off"
    if download:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(
                keras.utils.get_file(
                    name,
                    spec.imagenet_url.format(rows=_mobilenet_rows(image_size)),
                    cache_dir=str(folder.parent),
                    cache_subdir=folder.name,
                )
            )
        # Keras raises a plain Exception for any failed download (no network, proxy, HTTP error).
        except Exception as error:  # noqa: BLE001
            problem = f"the download failed ({str(error).strip() or type(error).__name__})"
    raise ModelError(
        f"imagenet weights for {backbone} are not in Keras' cache and {problem}. Put the file "
        f"{name} (from {spec.imagenet_url.format(rows=_mobilenet_rows(image_size))}) at {target}, "
        "or pass a local or gs:// weights file with --weights PATH"
    )


@contextlib.contextmanager
def resolve_weights(
    backbone: str, weights: str, *, image_size: int, cache_dir: Path | None = None
) -> Iterator[ResolvedWeights]:
    """The local file behind ``weights`` (a ``gs://`` file is downloaded to a temporary folder that lives
    as long as the context) with its sha256; ``none`` resolves to no file."""
    if weights == "none":
        yield ResolvedWeights(weights, None, None)
        return
    if weights == "imagenet":
        path = imagenet_weights_file(backbone, image_size=image_size, cache_dir=cache_dir)
        yield ResolvedWeights(weights, path, file_sha256(path))
        return
    if not weights.endswith(".weights.h5"):
        raise ModelError(
            f"weights file {weights} must be a Keras `.weights.h5` file of the {backbone} backbone "
            "(save one with backbone.save_weights(...)), or pass imagenet or none"
        )
    with tempfile.TemporaryDirectory(prefix="tfloop-weights-") as workdir:
        if storage.is_gcs(weights):
            path = Path(workdir) / Path(weights).name
            try:
                path.write_bytes(storage.read_bytes(weights))
            except FileNotFoundError:
                raise ModelError(f"weights file {weights} does not exist") from None
        else:
            path = storage.local_path(weights)
            if not path.is_file():
                raise ModelError(
                    f"weights file {weights} does not exist; pass imagenet, none, or a .weights.h5 file"
                )
        yield ResolvedWeights(weights, path, file_sha256(path))


def _build_backbone(spec: BackboneSpec, *, image_size: int, weights: ResolvedWeights) -> keras.Model:
    constructor = getattr(keras.applications, spec.application)
    keras_weights = str(weights.path) if weights.imagenet and weights.path is not None else None
    try:
        backbone = constructor(
            include_top=False, weights=keras_weights, input_shape=(image_size, image_size, 3)
        )
    except (OSError, ValueError) as error:
        hint = (
            f" (imagenet weights from {weights.path}: delete the file to fetch it again)"
            if keras_weights
            else ""
        )
        raise ModelError(f"cannot build {spec.name} at {image_size}px: {error}{hint}") from error
    backbone.name = BACKBONE_LAYER
    if weights.path is not None and not weights.imagenet:
        try:
            backbone.load_weights(weights.path)
        except (OSError, ValueError) as error:
            raise ModelError(
                f"cannot load weights {weights.requested} into {spec.name} at {image_size}px: {error}. The "
                "file must hold this backbone's weights without its top (include_top=False)"
            ) from error
    return backbone


def build_model(
    backbone: str,
    num_classes: int,
    *,
    image_size: int,
    weights: str | ResolvedWeights = "none",
    dropout: float = 0.2,
) -> keras.Model:
    """A classifier: float32 ``(None, S, S, 3)`` pixels in [0, 255] -> softmax ``(None, num_classes)``.

    ``weights`` is ``imagenet`` (Keras' cached file, downloaded when missing), ``none`` (random init;
    BatchNorm momentum is lowered so moving statistics keep up on small data), a local/``gs://``
    ``.weights.h5`` file of the backbone without its top, or weights already resolved by
    :func:`resolve_weights`. Under a mixed precision policy the softmax output stays float32.
    """
    spec = backbone_spec(backbone)
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least two classes, got {num_classes}")
    if image_size < spec.min_image_size:
        raise ModelError(f"{backbone} needs --image-size >= {spec.min_image_size}, got {image_size}")
    if isinstance(weights, ResolvedWeights):
        base = _build_backbone(spec, image_size=image_size, weights=weights)
    else:
        with resolve_weights(backbone, weights, image_size=image_size) as resolved:
            base = _build_backbone(spec, image_size=image_size, weights=resolved)
    if (weights.requested if isinstance(weights, ResolvedWeights) else weights) == "none":
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
