"""Training end to end on tiny generated datasets, with MLflow in a temporary SQLite store: what is logged,
both phases with a weights file, training from the GCS emulator, resuming after a crash, evaluation, and the
``tfloop train`` / ``tfloop data make-demo`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import storage
from training.demo_data import make_demo_dataset
from training.drift import BYTES_EDGES, SIDE_EDGES, DriftReference
from training.evaluate import compute_report, evaluate_predict_fn

pytestmark = pytest.mark.model

LABELS = ("circle", "square", "stripes")
SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "demo"
    make_demo_dataset(str(root), per_class=8, seed=0, image_size=SIZE, labels=LABELS)
    (root / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "square" / "square-0000.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random MobileNetV2 backbone weights in a file: the offline stand-in for downloaded weights."""
    from training.models import backbone_of, build_model

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    backbone_of(build_model("mobilenet_v2", 2, image_size=SIZE)).save_weights(path)
    return path


def _tracking(tmp_path: Path):
    from training.tracking import TrackingSettings

    return TrackingSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="tests",
        artifact_root=str(tmp_path / "art"),
    )


def _config(data: list[str], **overrides):
    from training.fit import TrainConfig

    settings = {
        "data": tuple(data),
        "backbone": "mobilenet_v2",
        "image_size": SIZE,
        "batch_size": 8,
        "min_images_per_label": 3,
        "model_name": "shapes",
        "patience": 10,
        **overrides,
    }
    return TrainConfig(**settings)


def _metric_steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_train_from_scratch_on_a_local_folder_logs_everything(dataset: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from training.fit import train
    from training.models import load_model

    tracking = _tracking(tmp_path)
    result = train(
        _config([str(dataset)], epochs=1, augment=True, learning_rate=1e-3),
        tracking=tracking,
        checkpoint_dir=tmp_path / "ckpt",
        verbose=0,
    )

    assert result.labels == list(LABELS) and result.phases == ["full"]
    assert 0.0 <= result.accuracy <= 1.0
    assert result.eval_report.n == sum(result.data_report.test_counts.values())
    assert result.validation_report.n == sum(result.data_report.validation_counts.values())
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tests" and experiment.artifact_location.endswith("art")
    params = run.data.params
    assert (
        params["backbone"] == "mobilenet_v2" and params["weights"] == "none" and params["image_size"] == "32"
    )
    assert params["batch_size"] == "8" and params["seed"] == "0" and params["phases"] == "full"
    assert params["learning_rate"] == "0.001" and params["augment"] == "True"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.accuracy)
    assert run.data.metrics["test_macro_f1"] == pytest.approx(result.macro_f1)
    assert run.data.metrics["val_accuracy"] == pytest.approx(result.validation_report.accuracy)
    assert _metric_steps(client, result.run_id, "full_loss") == [0]
    assert _metric_steps(client, result.run_id, "full_val_accuracy") == [0]
    assert run.data.tags["tfloop.model_name"] == "shapes"
    assert run.data.tags["tfloop.dataset_fingerprint"] == result.data_report.fingerprint
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "model")
    }
    assert {
        "model/model.keras",
        "labels.json",
        "train_config.json",
        "data_report.json",
        "split.json",
        "eval_report.json",
        "validation_report.json",
        "confusion_matrix.png",
        "training_curves.png",
    } <= artifacts

    downloaded = Path(client.download_artifacts(result.run_id, "", str(tmp_path / "dl")))
    assert json.loads((downloaded / "labels.json").read_text()) == list(LABELS)
    assert json.loads((downloaded / "train_config.json").read_text())["image_size"] == SIZE
    report = json.loads((downloaded / "data_report.json").read_text())
    assert report["skipped_counts"]["corrupt"] == 1 and report["skipped_counts"]["unsupported_extension"] == 1
    assert (downloaded / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    split = json.loads((downloaded / "split.json").read_text())
    assert set(split) == {"train", "validation", "test", "quarantined"}
    assert split["test"] == sorted(r.sha256 for r in result.dataset.side("test"))
    train_set, validation_set, test_set = (set(split[name]) for name in ("train", "validation", "test"))
    assert not train_set & validation_set and not train_set & test_set and not validation_set & test_set
    restored = load_model(downloaded / "model" / "model.keras")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(restored(pixels, training=False)),
        np.asarray(result.model(pixels, training=False)),
        rtol=1e-4,
    )
    assert not (tmp_path / "ckpt" / "state.json").exists()

    reference = json.loads((downloaded / "drift" / "reference.json").read_text())
    train_records = result.dataset.side("train")
    train_labels = [r.label for r in train_records]
    assert reference["labels"] == list(LABELS) and reference["train_items"] == len(train_records)
    assert reference["class_prior"] == pytest.approx(
        [train_labels.count(label) / len(train_labels) for label in LABELS]
    )
    confusion = np.asarray(result.eval_report.confusion)
    assert reference["test_items"] == result.eval_report.n
    assert reference["predicted_shares"] == pytest.approx((confusion.sum(axis=0) / confusion.sum()).tolist())
    assert sum(reference["confidence"]) == pytest.approx(1.0)
    # the input statistics are the training images': every demo image is a SIZE x SIZE JPEG
    assert reference["input_items"] == len(train_records) and reference["input_formats"] == {"jpeg": 1.0}
    side_bin = int(np.searchsorted(SIDE_EDGES, SIZE, side="right")) - 1
    assert reference["input_width"][side_bin] == pytest.approx(1.0)
    assert reference["input_height"][side_bin] == pytest.approx(1.0)
    sizes, _ = np.histogram([Path(r.local_path).stat().st_size for r in train_records], bins=BYTES_EDGES)
    assert reference["input_bytes"] == pytest.approx((sizes / sizes.sum()).tolist())

    # export carries the reference into the published version, where `tfloop monitor` reads it
    from export.api import export_run

    exported = export_run(
        result.run_id, base=str(tmp_path / "models"), tracking_uri=tracking.tracking_uri, register=False
    )
    carried = json.loads((Path(exported.path) / "reference.json").read_text())
    assert DriftReference.from_dict(carried) == DriftReference.from_dict(reference)


@pytest.mark.slow
def test_two_phases_from_gcs_with_a_weights_file(
    dataset: Path, weights_file: Path, gcs_bucket: str, tmp_path: Path
) -> None:
    import keras
    from mlflow import MlflowClient

    from training.fit import train
    from training.models import backbone_of, build_model

    remote = storage.join(gcs_bucket, "datasets", "shapes")
    storage.upload_tree(str(dataset), remote)
    remote_weights = storage.join(gcs_bucket, "weights", weights_file.name)
    storage.write_bytes(remote_weights, weights_file.read_bytes())
    tracking = _tracking(tmp_path)
    config = _config(
        [remote], weights=remote_weights, augment=False, epochs=2, fine_tune_epochs=1, unfreeze=5
    )

    result = train(config, tracking=tracking, checkpoint_dir=tmp_path / "ckpt", verbose=0)

    assert result.phases == ["head", "fine_tune"]
    assert result.data_report.roots == [remote]
    assert (tmp_path / "ckpt" / "data-cache").is_dir()
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["cached_features"] == "True" and run.data.params["weights"] == remote_weights
    assert _metric_steps(client, result.run_id, "head_loss") == [0, 1]
    assert _metric_steps(client, result.run_id, "fine_tune_loss") == [2]
    assert "val_accuracy" in run.data.metrics and "val_macro_f1" in run.data.metrics

    original = backbone_of(build_model("mobilenet_v2", 2, image_size=SIZE, weights=str(weights_file))).layers
    trained = backbone_of(result.model).layers
    changed = {
        position
        for position, (before, after) in enumerate(zip(original, trained, strict=True))
        if any(
            not np.array_equal(a, b) for a, b in zip(before.get_weights(), after.get_weights(), strict=False)
        )
    }
    top = {
        position
        for position in range(len(trained) - 5, len(trained))
        if not isinstance(trained[position], keras.layers.BatchNormalization)
    }
    assert changed and changed <= top


@pytest.mark.slow
def test_a_crashed_run_resumes_from_its_checkpoint(dataset: Path, weights_file: Path, tmp_path: Path) -> None:
    import keras
    from mlflow import MlflowClient

    from training.fit import train

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 0:
                raise RuntimeError("simulated crash after epoch 1")

    class Epochs(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[int] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.seen.append(epoch)

    tracking = _tracking(tmp_path)
    config = _config([str(dataset)], weights=str(weights_file), augment=False, epochs=3)
    checkpoints = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, tracking=tracking, checkpoint_dir=checkpoints, callbacks=[Crash()], verbose=0)
    state = json.loads((checkpoints / "state.json").read_text())
    assert state["phases"]["head"]["epoch"] == 1 and not state["phases"]["head"]["done"]
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    assert client.get_run(state["run_id"]).info.status == "FAILED"

    epochs = Epochs()
    result = train(config, tracking=tracking, checkpoint_dir=checkpoints, callbacks=[epochs], verbose=0)

    assert result.resumed and result.run_id == state["run_id"]
    assert epochs.seen == [1, 2]
    assert len(result.history["loss"]) == 3
    assert _metric_steps(client, result.run_id, "head_loss") == [0, 1, 2]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert not (checkpoints / "state.json").exists()


def test_compute_report_by_hand() -> None:
    report = compute_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert report.accuracy == pytest.approx(3 / 5)
    assert report.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report.per_class["a"].precision == pytest.approx(0.5) and report.per_class["a"].recall == 0.5
    assert report.per_class["b"].f1 == pytest.approx(0.8)
    assert report.per_class["c"].f1 == 0.0 and report.per_class["c"].support == 1
    assert report.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_any_predict_function_is_evaluated_on_file_records(dataset: Path) -> None:
    from training.data import scan_dataset
    from training.evaluate import evaluate_model, keras_top1_fn
    from training.models import build_model

    scanned = scan_dataset([str(dataset)], min_images_per_label=3)
    records = scanned.side("validation")
    model = build_model("mobilenet_v2", 3, image_size=SIZE)
    direct = evaluate_model(model, records, scanned.labels, image_size=SIZE)
    through_bytes = evaluate_predict_fn(
        keras_top1_fn(model, scanned.labels, image_size=SIZE), records, labels=scanned.labels
    )
    assert through_bytes.confusion == direct.confusion and through_bytes.n == len(records)

    def always_new_label(images: list[bytes]) -> list[tuple[str, float]]:
        return [("hexagon", 1.0) for _ in images]

    report = evaluate_predict_fn(always_new_label, records, labels=scanned.labels)
    assert report.labels == [*scanned.labels, "hexagon"] and report.accuracy == 0.0


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TFLOOP_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    tfloop = Path(sys.executable).with_name("tfloop")
    return subprocess.run(
        [str(tfloop), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.slow
def test_cli_make_demo_and_train_json(weights_file: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    demo = _cli(
        ["data", "make-demo", str(tmp_path / "demo"), "--per-class", "8", "--image-size", "32", "--json"],
        home,
    )
    assert demo.returncode == 0, demo.stderr
    assert json.loads(demo.stdout.strip().splitlines()[-1])["files"] == 48

    empty = _cli(["train", "--data", str(tmp_path / "nothing"), "--json"], home)
    assert empty.returncode == 1 and "error: " in empty.stderr and "Traceback" not in empty.stderr

    trained = _cli(
        [
            "train",
            "--data",
            str(tmp_path / "demo"),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            str(weights_file),
            "--no-augment",
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--model-name",
            "cli-shapes",
            "--json",
        ],
        home,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    payload = json.loads(trained.stdout.strip().splitlines()[-1])
    assert {
        "run_id",
        "model_name",
        "labels",
        "accuracy",
        "macro_f1",
        "split",
        "quarantined",
    } <= payload.keys()
    assert sum(payload["split"].values()) == payload["images"] == 48 and payload["quarantined"] == 0
    assert payload["model_name"] == "cli-shapes" and len(payload["labels"]) == 6
    assert "Epoch 1/2" in trained.stderr
    assert (home / "mlflow.db").is_file() and (home / "mlartifacts").is_dir()
