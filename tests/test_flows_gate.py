"""The real train-and-deploy flow (in process, Prefect's ephemeral server) refuses a candidate that is worse
than the champion: nothing is exported, the champion alias stays, the pending feedback stays pending, and
the decision is on the candidate's MLflow run and in a Prefect markdown artifact.

The champion is an exported, registered SavedModel that is right by construction (a brightness rule on a
dark/bright dataset), so the comparison does not depend on how well a few CPU epochs learn; the candidate is
a real training run whose learning rate makes it diverge.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import storage
from storage import versions

pytestmark = [pytest.mark.slow, pytest.mark.model]

LABELS = ("bright", "dark")  # training orders labels alphabetically
MODEL = "tfloop-classifier"


def _write_images(root: Path, *, per_class: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, (low, high) in (("dark", (0, 90)), ("bright", (165, 256))):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(low, high, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{label}-{seed}-{index}.png")


def _brightness_champion() -> object:
    """A Keras classifier that is right on dark/bright images: softmax over +-(mean pixel sum - 384)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    channel_means = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(channel_means))
    kernel = np.array([[0.1, -0.1]] * 3, dtype="float32")
    dense.set_weights([kernel, np.array([-38.4, 38.4], dtype="float32")])
    return model


def prepare_flow_env(
    home: Path, monkeypatch: pytest.MonkeyPatch, *, per_class: int, feedback_per_class: int
) -> Path:
    """A state folder for in-process flow runs: Prefect's home inside it, no API server, no cluster, a
    base dataset and pending corrections."""
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    monkeypatch.setenv("KUBECONFIG", str(home / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    _write_images(home / "data" / "demo", per_class=per_class, seed=0)
    _write_images(home / "feedback" / "pending", per_class=feedback_per_class, seed=1)
    return home


@pytest.fixture
def flow_env(tfloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return prepare_flow_env(tfloop_home, monkeypatch, per_class=12, feedback_per_class=3)


def test_worse_candidate_is_refused_and_not_exported(flow_env: Path) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from export.api import export_model
    from export.registry import champion_version, promote, register_version
    from pipeline.flows import train_and_deploy
    from pipeline.options import DeliveryOptions, GateOptions, TrainingOptions
    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    exported = export_model(
        _brightness_champion(),
        base=settings.models_uri,
        model_name=MODEL,
        labels=list(LABELS),
        backbone="custom",
    )
    registered = register_version(
        tracking_uri=settings.tracking_uri,
        model_name=MODEL,
        run_id=None,
        export_uri=exported.path,
        serving_version=exported.version,
    )
    promote(MODEL, registered.registered_version, tracking_uri=settings.tracking_uri)
    pending = storage.join(settings.feedback_root, "pending")
    pending_before = storage.list_files(pending)

    result = train_and_deploy(
        reason="test: worse candidate",
        training=TrainingOptions(
            backbone="mobilenet_v2",
            image_size=32,
            epochs=1,
            batch_size=8,
            validation_fraction=0.4,
            min_images_per_label=2,
            extra={"learning_rate": 1e4},  # diverges: the candidate ends up no better than a constant guess
        ),
        gate=GateOptions(min_accuracy=0.0, max_accuracy_drop=0.05, max_macro_f1_drop=0.05),
        delivery=DeliveryOptions(build_image=False),
    )

    assert result["champion_metrics"]["accuracy"] == 1.0, (
        "the brightness rule is right on every held-out image"
    )
    assert result["champion_metrics"]["count"] == result["candidate_metrics"]["count"] > 0
    assert result["candidate_metrics"]["corrected_count"] == result["champion_metrics"]["corrected_count"]
    assert result["candidate_metrics"]["accuracy"] < 0.95
    assert result["gate_passed"] is False
    assert result["gate_reason"].startswith("refused:") and "champion" in result["gate_reason"]
    # Nothing after the gate ran.
    assert result["exported_version"] is None and result["registered_version"] is None
    assert versions.complete_versions(settings.models_uri, MODEL) == [exported.version]
    still = champion_version(MODEL, tracking_uri=settings.tracking_uri)
    assert still is not None and still.registered_version == registered.registered_version
    assert storage.list_files(pending) == pending_before
    assert not storage.exists(storage.join(settings.feedback_root, "consumed"))
    # The decision is on the candidate's MLflow run ...
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.data.tags["tfloop.gate"] == "refused"
    assert run.data.metrics["gate_passed"] == 0.0
    assert run.data.metrics["gate_champion_accuracy"] == 1.0
    local = client.download_artifacts(result["run_id"], "gate/decision.json", str(flow_env / "download"))
    decision = json.loads(Path(local).read_text())
    assert decision["passed"] is False and decision["champion"]["accuracy"] == 1.0
    # ... and a markdown artifact in Prefect.
    with get_client(sync_client=True) as prefect_client:
        artifacts = [a for a in prefect_client.read_latest_artifacts() if a.key == "gate-decision"]
    assert artifacts and "REFUSED" in str(artifacts[0].data)
