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
    """A tracking URI with two training runs logged the way the training stage logs them."""
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
    run_ids = [run_id]
    run_ids.append(
        client.create_run(
            experiment, tags={"tfloop.model_name": "shapes", "tfloop.dataset_fingerprint": "fp-2"}
        ).info.run_id
    )
    for logged in run_ids:
        client.log_artifact(logged, str(files / "model" / "model.keras"), artifact_path="model")
        client.log_artifact(logged, str(files / "labels.json"))
        client.log_artifact(logged, str(files / "train_config.json"))
        client.log_param(logged, "backbone", "tiny")
        client.log_metric(logged, "val_accuracy", 0.8)
        client.log_metric(logged, "val_macro_f1", 0.78)
        client.log_metric(logged, "test_accuracy", 0.75)
        client.log_metric(logged, "test_macro_f1", 0.7)
        client.set_terminated(logged)
    return {"tracking_uri": tracking_uri, "run_id": run_id, "run_id_2": run_ids[1], "root": str(root)}


def test_export_run_publishes_registers_and_promotes(store, tmp_path):
    import tensorflow as tf
    from mlflow import MlflowClient

    from export.api import export_run
    from export.registry import champion_version, promote, version_by_alias
    from export.warmup import read_warmup_images
    from storage import versions

    base = str(tmp_path / "models")
    image = encode(sample_pixels(11), "PNG")
    first = export_run(store["run_id"], base=base, tracking_uri=store["tracking_uri"], sample_images=[image])
    assert first.version == 1
    assert first.path == str(tmp_path / "models" / "shapes" / "1")
    meta = json.loads(Path(first.path, "tfloop.json").read_text())
    assert meta["run_id"] == store["run_id"]
    assert meta["metrics"] == {  # the test split's scores are the model's; validation only picked epochs
        "accuracy": 0.75,
        "macro_f1": 0.7,
        "validation_accuracy": 0.8,
        "validation_macro_f1": 0.78,
    }
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

    again = export_run(store["run_id"], base=base, tracking_uri=store["tracking_uri"])
    assert again.reused and again.version == 1 and again.path == first.path
    assert again.registered_version == first.registered_version
    assert versions.numbered_versions(base, "shapes") == [1]  # one folder ...
    runs_versions = client.search_model_versions(f"name='shapes' and run_id='{store['run_id']}'")
    assert [int(v.version) for v in runs_versions] == [first.registered_version]  # ... one registered version

    second = export_run(store["run_id_2"], base=base, tracking_uri=store["tracking_uri"])
    assert second.version == 2 and not second.reused
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
    assert champion.metrics == meta["metrics"]

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


def test_cli_export_json_no_register_and_promote(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from storage import TfloopError

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

    from tests.test_shadow import ANSWERS, write_shadow_log

    write_shadow_log(str(tmp_path / "home" / "feedback"), ANSWERS, candidate=1, model_name="cli-shapes")
    promote = ["promote", "1", "--model-name", "cli-shapes", "--model-base", base]
    result = runner.invoke(app, [*promote, "--min-agreement", "0.9"])
    assert result.exit_code == 1 and "under --min-agreement 0.9" in result.output
    assert not (Path(base) / "cli-shapes" / "live.json").exists()
    result = runner.invoke(app, [*promote, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["version"] == 1 and payload["alias"] == "champion" and payload["previous"] is None
    agreeing = sum(live == shadow for live, shadow, _ in ANSWERS)
    assert payload["shadow"]["compared"] == len(ANSWERS) and payload["shadow"]["agreed"] == agreeing
    assert "second opinion: on 7 live requests" in result.stderr
    assert f"run {store['run_id']} has no gate decision" in result.stderr  # found through the registry
    pointer = json.loads((Path(base) / "cli-shapes" / "live.json").read_text())
    assert pointer["version"] == 1 and pointer["promoted_by"] == "tfloop promote"

    # The unregistered version (exported with --no-register) cannot be promoted: one clear line.
    result = runner.invoke(app, ["promote", "1", "--model-name", "shapes"])
    assert result.exit_code == 1
    assert isinstance(result.exception, TfloopError) and "not registered" in str(result.exception)
    assert not (tmp_path / "home" / "models" / "shapes" / "live.json").exists()


def test_export_registers_a_version_published_before_a_crash(store, tmp_path):
    """A crash between publishing and registering leaves a published, unregistered version (what
    ``register=False`` leaves); exporting the run again registers that version instead of a second one."""
    from mlflow import MlflowClient

    from export.api import export_run
    from storage import versions

    base = str(tmp_path / "models")
    name = "crash-shapes"
    published = export_run(
        store["run_id"], base=base, tracking_uri=store["tracking_uri"], model_name=name, register=False
    )
    assert published.registered_version is None
    retried = export_run(store["run_id"], base=base, tracking_uri=store["tracking_uri"], model_name=name)
    assert retried.reused and retried.version == published.version == 1
    assert retried.metadata["run_id"] == store["run_id"]
    assert versions.numbered_versions(base, name) == [1]
    client = MlflowClient(tracking_uri=store["tracking_uri"])
    registered = client.search_model_versions(f"name='{name}'")
    assert len(registered) == 1 and registered[0].tags["tfloop.serving_version"] == "1"
    assert int(registered[0].version) == retried.registered_version
    assert "challenger" in client.get_model_version(name, registered[0].version).aliases


def test_promote_version_writes_the_live_pointer_and_moves_champion(store, tmp_path):
    from export.api import export_model, export_run
    from export.errors import PromotionError
    from export.registry import champion_version, promote_version
    from pipeline.promotion import current_live_version
    from storage import versions

    base = str(tmp_path / "models")
    name = "promo-shapes"
    uri = store["tracking_uri"]
    first = export_run(store["run_id"], base=base, tracking_uri=uri, model_name=name)
    second = export_run(store["run_id_2"], base=base, tracking_uri=uri, model_name=name)
    assert (first.version, second.version) == (1, 2)

    promoted = promote_version(model_name=name, model_base=base, version=1, tracking_uri=uri, promoted_by="t")
    pointer = json.loads(Path(base, name, "live.json").read_text())
    assert pointer["version"] == 1 and pointer["promoted_by"] == "t" and pointer["promoted_at"]
    assert promoted.registered_version == first.registered_version and promoted.pointer_written
    assert champion_version(name, tracking_uri=uri).serving_version == 1
    assert current_live_version(model_base=base, model_name=name) == 1  # not the newest (2)

    promoted = promote_version(model_name=name, model_base=base, version=2, tracking_uri=uri)
    assert versions.read_live_pointer(base, name).version == 2 and promoted.previous == 1
    assert champion_version(name, tracking_uri=uri).registered_version == second.registered_version
    again = promote_version(model_name=name, model_base=base, version=2, tracking_uri=uri)
    assert not again.pointer_written and again.previous == 1  # a retry converges, history kept

    with pytest.raises(PromotionError, match=r"not complete.*complete versions: \[1, 2\]"):
        promote_version(model_name=name, model_base=base, version=7, tracking_uri=uri)
    unregistered = export_model(tiny_model(seed=5), base=base, model_name=name, labels=LABELS)
    with pytest.raises(PromotionError, match="not registered"):
        promote_version(model_name=name, model_base=base, version=unregistered.version, tracking_uri=uri)
    assert versions.read_live_pointer(base, name).version == 2  # a refused promotion wrote nothing
    assert champion_version(name, tracking_uri=uri).serving_version == 2


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
