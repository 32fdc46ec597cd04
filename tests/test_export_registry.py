"""Export of an MLflow training run end to end: artifacts -> published version -> Model Registry, and the CLI.

A real MLflow SQLite store in a temporary folder holds a run laid out like `tfloop train` logs it (a tiny
Keras model at 32 px, labels.json, train_config.json, metrics, tags).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_export import LABELS, encode, sample_pixels, tiny_model

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """A tracking URI with one training run logged the way the training stage logs it."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("tfloop-test", artifact_location=str(root / "artifacts"))
    run = client.create_run(
        experiment, tags={"tfloop.model_name": "shapes", "tfloop.dataset_fingerprint": "fp-1"}
    )
    run_id = run.info.run_id
    files = root / "files"
    (files / "model").mkdir(parents=True)
    tiny_model(seed=3).save(files / "model" / "model.keras")
    (files / "labels.json").write_text(json.dumps(LABELS))
    data_root = root / "data"
    for index, label in enumerate(LABELS):
        (data_root / label).mkdir(parents=True)
        (data_root / label / "a.png").write_bytes(encode(sample_pixels(100 + index), "PNG"))
    (data_root / LABELS[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (files / "train_config.json").write_text(
        json.dumps(
            {
                "backbone": "tiny",
                "image_size": 32,
                "weights": "none",
                "model_name": "shapes",
                "data": [str(root / "missing"), str(data_root)],
            }
        )
    )
    client.log_artifact(run_id, str(files / "model" / "model.keras"), artifact_path="model")
    client.log_artifact(run_id, str(files / "labels.json"))
    client.log_artifact(run_id, str(files / "train_config.json"))
    client.log_param(run_id, "backbone", "tiny")
    client.log_metric(run_id, "val_accuracy", 0.75)
    client.log_metric(run_id, "val_macro_f1", 0.7)
    client.set_terminated(run_id)
    return {"tracking_uri": tracking_uri, "run_id": run_id, "root": str(root)}


def test_export_run_publishes_registers_and_promotes(store, tmp_path):
    import tensorflow as tf
    from mlflow import MlflowClient

    from export.api import export_run
    from export.registry import champion_version, promote, version_by_alias
    from export.warmup import read_warmup_images

    base = str(tmp_path / "models")
    image = encode(sample_pixels(11), "PNG")
    first = export_run(store["run_id"], base=base, tracking_uri=store["tracking_uri"], sample_images=[image])
    assert first.version == 1
    assert first.path == str(tmp_path / "models" / "shapes" / "1")
    meta = json.loads(Path(first.path, "tfloop.json").read_text())
    assert meta["run_id"] == store["run_id"]
    assert meta["metrics"] == {"accuracy": 0.75, "macro_f1": 0.7}
    assert meta["dataset_fingerprint"] == "fp-1"
    assert meta["backbone"] == "tiny"
    assert meta["version"] == 1 and first.metadata["version"] == 1

    loaded = tf.saved_model.load(first.path)
    result = loaded.signatures["serving_default"](image_bytes=tf.constant([image]))
    assert result["probabilities"].shape == (1, len(LABELS))

    client = MlflowClient(tracking_uri=store["tracking_uri"])
    registered = client.get_model_version("shapes", str(first.registered_version))
    assert registered.run_id == store["run_id"]
    assert registered.source == first.path
    assert registered.tags["tfloop.export_uri"] == first.path
    assert registered.tags["tfloop.serving_version"] == "1"
    assert float(registered.tags["tfloop.metric.accuracy"]) == 0.75
    assert float(registered.tags["tfloop.metric.macro_f1"]) == 0.7
    assert "challenger" in registered.aliases
    assert champion_version("shapes", tracking_uri=store["tracking_uri"]) is None

    second = export_run(store["run_id"], base=base, tracking_uri=store["tracking_uri"])
    assert second.version == 2
    warmup = read_warmup_images(Path(second.path, "assets.extra", "tf_serving_warmup_requests"))
    dataset_images = {p.read_bytes() for p in Path(store["root"], "data").glob("*/a.png")}
    assert dataset_images <= set(warmup)  # the dataset's images verify and warm up the model
    assert second.registered_version == first.registered_version + 1
    challenger = version_by_alias("shapes", tracking_uri=store["tracking_uri"], alias="challenger")
    assert challenger is not None and challenger.serving_version == 2

    promote("shapes", first.registered_version, tracking_uri=store["tracking_uri"])
    champion = champion_version("shapes", tracking_uri=store["tracking_uri"])
    assert champion is not None
    assert champion.registered_version == first.registered_version
    assert champion.serving_version == 1
    assert champion.export_uri == first.path
    assert champion.metrics == {"accuracy": 0.75, "macro_f1": 0.7}

    promote("shapes", second.registered_version, tracking_uri=store["tracking_uri"])
    assert champion_version("shapes", tracking_uri=store["tracking_uri"]).serving_version == 2


def test_promote_unknown_version_is_a_clear_error(store):
    from export.errors import RegistryError
    from export.registry import champion_version, promote

    with pytest.raises(RegistryError, match="version 999"):
        promote("shapes", 999, tracking_uri=store["tracking_uri"])
    assert champion_version("no-such-model", tracking_uri=store["tracking_uri"]) is None


def test_export_unknown_run_is_a_clear_error(store, tmp_path):
    from export.api import export_run
    from export.errors import ExportError

    with pytest.raises(ExportError, match="no MLflow run"):
        export_run("0123456789abcdef", base=str(tmp_path), tracking_uri=store["tracking_uri"])
    assert not any(tmp_path.iterdir())


def test_cli_export_json_and_no_register(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["tracking_uri"])
    monkeypatch.setenv("TFLOOP_HOME", str(tmp_path / "home"))
    base = str(tmp_path / "cli-models")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["export", "--run", store["run_id"], "--base", base, "--model-name", "cli-shapes", "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["version"] == 1
    assert payload["path"] == str(Path(base) / "cli-shapes" / "1")
    assert isinstance(payload["registered_version"], int)

    result = runner.invoke(app, ["export", "--run", store["run_id"], "--no-register", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["registered_version"] is None
    assert payload["path"] == str(tmp_path / "home" / "models" / "shapes" / "1")  # default base

    result = runner.invoke(app, ["promote", "1", "--model-name", "cli-shapes", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["serving_version"] == 1 and payload["alias"] == "champion"


@pytest.mark.slow
def test_cli_reports_user_errors_in_one_line(store, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": store["tracking_uri"], "TFLOOP_HOME": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "export", "--run", "doesnotexist", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert completed.returncode == 1
    assert "error: no MLflow run" in completed.stderr
    assert "Traceback" not in completed.stderr
