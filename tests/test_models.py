"""Model building: shapes for every backbone, preprocessing inside the model, weights files, trainable flags
per training phase, and the .keras round trip through training.models.load_model."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from training.fit import TrainConfig, plan_phases
from training.models import (
    BACKBONES,
    BackbonePreprocessing,
    ModelError,
    backbone_of,
    build_model,
    feature_extractor,
    head_model,
    load_model,
    set_trainable,
)

pytestmark = pytest.mark.model

SMALL_SIZES = {"vgg16": 32, "inception_v3": 75, "efficientnet_b0": 32, "mobilenet_v2": 32}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_maps_pixels_to_probabilities(backbone: str) -> None:
    size = SMALL_SIZES[backbone]
    model = build_model(backbone, 3, image_size=size)
    assert model.input_shape == (None, size, size, 3)
    assert model.inputs[0].dtype == "float32"
    assert model.output_shape == (None, 3)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("preprocess").mode == BACKBONES[backbone].preprocessing


def test_preprocessing_modes() -> None:
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(
        np.asarray(BackbonePreprocessing("tf")(pixels)), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(BackbonePreprocessing("caffe")(pixels)),
        [[[[255.0 - 103.939, 127.5 - 116.779, 0.0 - 123.68]]]],
        atol=1e-4,
    )
    np.testing.assert_array_equal(np.asarray(BackbonePreprocessing("none")(pixels)), pixels)


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown backbone 'resnet'"):
        build_model("resnet", 3, image_size=64)
    with pytest.raises(ModelError, match="image-size >= 75"):
        build_model("inception_v3", 3, image_size=64)
    with pytest.raises(ModelError, match="at least two classes"):
        build_model("mobilenet_v2", 1, image_size=32)
    with pytest.raises(ModelError, match="does not exist"):
        build_model("mobilenet_v2", 2, image_size=32, weights=str(tmp_path / "missing.weights.h5"))
    (tmp_path / "backbone.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"\.weights\.h5"):
        build_model("mobilenet_v2", 2, image_size=32, weights=str(tmp_path / "backbone.h5"))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random MobileNetV2 backbone weights saved to a file: the offline stand-in for downloaded weights."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    backbone_of(build_model("mobilenet_v2", 2, image_size=32)).save_weights(path)
    return path


def test_trainable_flags_per_phase(weights_file: Path) -> None:
    config = TrainConfig(
        data=("x",),
        backbone="mobilenet_v2",
        weights=str(weights_file),
        fine_tune_epochs=2,
        unfreeze=10,
        augment=False,
    )
    assert [(p.name, p.trainable, p.cached_features) for p in plan_phases(config)] == [
        ("head", "head", True),
        ("fine_tune", "fine_tune", False),
    ]
    model = build_model("mobilenet_v2", 3, image_size=32, weights=str(weights_file))
    backbone = backbone_of(model)
    source = build_model("mobilenet_v2", 2, image_size=32)
    backbone_of(source).load_weights(weights_file)
    for got, want in zip(backbone.get_weights(), backbone_of(source).get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    head_weights = {id(w) for w in model.get_layer("predictions").trainable_weights}

    set_trainable(model, phase="head")
    assert backbone.trainable_weights == []
    assert {id(w) for w in model.trainable_weights} == head_weights

    set_trainable(model, phase="fine_tune", unfreeze=10)
    top = backbone.layers[-10:]
    assert all(not layer.trainable for layer in backbone.layers[:-10])
    assert all(layer.trainable == (not isinstance(layer, keras.layers.BatchNormalization)) for layer in top)
    trainable_layers = {layer.name for layer in backbone.layers if layer.trainable_weights}
    assert trainable_layers and trainable_layers <= {layer.name for layer in top}

    set_trainable(model, phase="full")
    assert len(model.trainable_weights) == len(model.weights) - len(model.non_trainable_weights)
    assert all(layer.trainable for layer in backbone.layers)
    assert any(
        isinstance(layer, keras.layers.BatchNormalization) and layer.trainable_weights
        for layer in backbone.layers
    )


def test_phases_without_pretrained_weights_train_every_layer() -> None:
    config = TrainConfig(data=("x",), weights="none", fine_tune_epochs=3, augment=False)
    assert [(p.name, p.trainable, p.cached_features) for p in plan_phases(config)] == [
        ("full", "full", False),
        ("fine_tune", "full", False),
    ]
    augmented = TrainConfig(data=("x",), weights="imagenet", augment=True)
    assert [(p.name, p.cached_features) for p in plan_phases(augmented)] == [("head", False)]


def test_head_and_feature_models_share_the_classifier_layers() -> None:
    model = build_model("mobilenet_v2", 3, image_size=32, dropout=0.0)
    pixels = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    features = feature_extractor(model).predict(pixels, verbose=0)
    np.testing.assert_allclose(
        np.asarray(head_model(model)(features, training=False)),
        np.asarray(model(pixels, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_keras_file_round_trip(tmp_path: Path) -> None:
    model = build_model("mobilenet_v2", 2, image_size=32)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = load_model(path)
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(restored(pixels, training=False)), np.asarray(model(pixels, training=False)), rtol=1e-5
    )
    assert restored.get_layer("preprocess").mode == "tf"
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nothing.keras")


def test_training_options_reuse_the_train_config_fields() -> None:
    from pydantic import ValidationError

    from pipeline.options import TrainingOptions
    from training.fit import TrainingParameters

    assert set(TrainingParameters.model_fields) <= set(TrainingOptions.model_fields)
    assert {"validation_fraction", "test_fraction", "min_images_per_label"} <= set(TrainConfig.model_fields)
    options = TrainingOptions(test_fraction=0.3, epochs=2, extra={"learning_rate": 0.5, "epochs": 3})
    config = options.train_config(data=["a", "b"], model_name="m")
    assert config.data == ("a", "b") and config.model_name == "m"
    assert config.test_fraction == 0.3 and config.learning_rate == 0.5 and config.epochs == 3
    with pytest.raises(ValidationError, match="must stay below 1"):
        TrainingOptions(validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValidationError, match="unknown backbone"):
        options.model_copy(update={"extra": {"backbone": "resnet"}}).train_config(data=["a"], model_name="m")
