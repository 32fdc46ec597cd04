"""The real train-and-deploy flow (in process, Prefect's ephemeral server) on its passing path: the gate
passes, the version is exported and registered, the used feedback is consumed and the version is promoted
(live pointer and MLflow ``champion``); a retried export returns the same version. Delivery that cannot
work (a cluster but no registry) fails before anything is trained, and a rolled-back rollout is not retried
by Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import storage
from storage import versions
from tests.test_flows_gate import MODEL, prepare_flow_env

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture
def flow_env(tfloop_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return prepare_flow_env(tfloop_home, monkeypatch, per_class=8, feedback_per_class=2)


def test_cluster_without_registry_fails_before_training(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.delivery import DeliveryConfigError
    from pipeline.flows import train_and_deploy
    from pipeline.options import TrainingOptions

    kubeconfig = flow_env / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(
        DeliveryConfigError, match=r"a cluster pulls images from a registry: set delivery\.registry"
    ):
        train_and_deploy(reason="test: no registry", training=TrainingOptions(epochs=50))
    assert not (flow_env / "checkpoints").exists()  # training never started
    assert not (flow_env / "mlflow.db").exists()
    assert not (flow_env / "models").exists()


def test_a_rolled_back_rollout_is_not_retried(flow_env: Path) -> None:
    from prefect import flow, task

    from pipeline import tasks
    from pipeline.delivery import DeliveryError, RolledBackError

    attempts: list[str] = []

    def failing(kind: str) -> None:
        attempts.append(kind)
        raise RolledBackError("rolled back") if kind == "rolled-back" else DeliveryError("API unreachable")

    step = task(retries=2, retry_delay_seconds=0, retry_condition_fn=tasks.retry_unless_final)(failing)

    @flow
    def deliver(kind: str) -> None:
        step(kind)

    with pytest.raises(RolledBackError):
        deliver("rolled-back")
    assert attempts == ["rolled-back"]
    attempts.clear()
    with pytest.raises(DeliveryError):
        deliver("transient")
    assert attempts == ["transient"] * 3


def test_passing_path_exports_consumes_feedback_and_promotes(flow_env: Path) -> None:
    from export.registry import champion_version
    from pipeline import feedback_queue, loop, summary
    from pipeline.flows import train_and_deploy
    from pipeline.options import DeliveryOptions, GateOptions, TrainingOptions
    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    pending_before = feedback_queue.pending_files(settings.feedback_root)
    result = train_and_deploy(
        reason="test: first model",
        training=TrainingOptions(
            backbone="mobilenet_v2",
            image_size=32,
            epochs=1,
            batch_size=8,
            validation_fraction=0.4,
            min_images_per_label=2,
        ),
        gate=GateOptions(min_accuracy=0.0),
        delivery=DeliveryOptions(build_image=False),
    )

    assert result["gate_passed"] is True, result["gate_reason"]
    assert result["exported_version"] == 1 and result["promoted"] is True
    assert result["live_version"] == 1 and result["live_previous"] is None
    pointer = json.loads(Path(settings.models_uri, MODEL, "live.json").read_text())
    assert pointer["version"] == 1 and result["run_id"] in pointer["promoted_by"]
    champion = champion_version(MODEL, tracking_uri=settings.tracking_uri)
    assert champion is not None and champion.serving_version == 1
    assert str(champion.registered_version) == result["registered_version"]
    assert result["feedback_consumed"] == len(pending_before) > 0
    assert feedback_queue.pending_files(settings.feedback_root) == []
    consumed = storage.join(settings.feedback_root, "consumed", result["run_id"])
    assert sorted(storage.list_files(consumed)) == sorted(pending_before)
    assert "live: version 1 (promoted)" in summary.format_summary(summary.LoopResult.from_dict(result))
    assert result["second_opinion"] == "second opinion: no shadow traffic recorded for version 1 yet"
    from mlflow import MlflowClient

    from training.gate import DECISION_ARTIFACT

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    decision_file = client.download_artifacts(
        result["run_id"], DECISION_ARTIFACT, str(flow_env / "gate-download")
    )
    opinion = json.loads(Path(decision_file).read_text())["second_opinion"]
    assert opinion["candidate_version"] == 1 and opinion["compared"] == 0  # the gate decision carries it
    assert client.get_run(result["run_id"]).data.metrics["gate_shadow_compared"] == 0

    # A retried export task (e.g. after a crash before its result was stored) gets the same version.
    again = loop.export_candidate(
        run_id=result["run_id"],
        model_base=settings.models_uri,
        model_name=MODEL,
        tracking_uri=settings.tracking_uri,
    )
    assert again["version"] == 1 and str(again["registered_version"]) == result["registered_version"]
    assert versions.numbered_versions(settings.models_uri, MODEL) == [1]
