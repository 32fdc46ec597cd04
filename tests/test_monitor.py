"""The drift watch: the statistics on known distributions, and ``tfloop monitor`` as a user runs it (its own
process) on a prediction log drawn from the training distribution (no drift) and on one where a class is
five times over-represented (drift, exit code 3, the event ``tfloop.drift.detected`` on a real Prefect
server), with a training run's reference in a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import storage
from storage.predictions import PredictionRecord, batch_name, model_log_uri
from tests.test_flows_trigger import prefect_server  # noqa: F401 - the module's real Prefect server
from training.drift import (
    DriftOptions,
    DriftReference,
    build_reference,
    chi_square_p_value,
    compare,
    psi,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "watched"
LABELS = ["ant", "bee", "cat", "dog", "eel", "fox"]
TEST_SHARES = [0.2, 0.2, 0.15, 0.15, 0.15, 0.15]


def draws(count: int, shares: Sequence[float], *, seed: int) -> dict[str, Any]:
    """Predictions as the model makes them on the training distribution, with class ``shares``."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(shares) / np.sum(shares)
    return {
        "predicted": [LABELS[i] for i in rng.choice(len(LABELS), size=count, p=weights)],
        "confidences": np.clip(rng.beta(8, 2, size=count), 0, 1).tolist(),
        "bytes": rng.normal(20_000, 2_000, size=count).astype(int).tolist(),
        "pixels": [64 * 64] * count,
    }


def reference() -> DriftReference:
    test = draws(400, TEST_SHARES, seed=1)
    return build_reference(
        labels=LABELS,
        train_labels=draws(2000, TEST_SHARES, seed=2)["predicted"],
        test_predicted=test["predicted"],
        test_confidences=test["confidences"],
        test_bytes=test["bytes"],
        test_pixels=test["pixels"],
    )


# --- the statistics -------------------------------------------------------------------------------------


def test_psi_and_chi_square_tell_a_shift_from_noise() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert psi([0.5, 0.5], [0.9, 0.1]) > 0.5
    assert chi_square_p_value([0.5, 0.5], [500, 500]) > 0.9
    assert chi_square_p_value([0.5, 0.5], [600, 400]) < 1e-6
    # exact survival function values (chi-square distribution tables): 6.04 on 3 dof, 4.0 on 1, 10.0 on 5
    assert chi_square_p_value([0.25] * 4, [64, 50, 45, 41]) == pytest.approx(0.1097, abs=0.005)
    assert chi_square_p_value([0.5, 0.5], [60, 40]) == pytest.approx(0.0455, abs=0.005)
    assert chi_square_p_value([1 / 6] * 6, [30, 20, 20, 20, 10, 20]) == pytest.approx(0.0752, abs=0.005)


def test_compare_names_what_drifted() -> None:
    ref = reference()
    options = DriftOptions()
    same = draws(600, TEST_SHARES, seed=3)
    calm = compare(
        ref,
        predicted=same["predicted"],
        confidences=same["confidences"],
        input_bytes=same["bytes"],
        input_pixels=same["pixels"],
        options=options,
    )
    assert calm.enough and not calm.drift, calm.checks
    skewed = draws(600, [5 * TEST_SHARES[0], *TEST_SHARES[1:]], seed=4)
    shifted = compare(
        ref,
        predicted=skewed["predicted"],
        confidences=skewed["confidences"],
        input_bytes=skewed["bytes"],
        input_pixels=skewed["pixels"],
        options=options,
    )
    verdicts = {(c.name, c.statistic): c.drifted for c in shifted.checks}
    assert shifted.drift and verdicts[("predicted class shares", "psi")]
    assert verdicts[("predicted class shares", "chi_square_p")]
    assert not verdicts[("top-1 confidence", "psi")] and not verdicts[("input bytes", "psi")]
    unsure = dict(same, confidences=(np.asarray(same["confidences"]) * 0.5).tolist())
    doubtful = compare(
        ref,
        predicted=unsure["predicted"],
        confidences=unsure["confidences"],
        input_bytes=unsure["bytes"],
        input_pixels=unsure["pixels"],
        options=options,
    )
    assert {c.name for c in doubtful.checks if c.drifted} == {"top-1 confidence"}
    few = compare(
        ref,
        predicted=skewed["predicted"][:20],
        confidences=skewed["confidences"][:20],
        input_bytes=skewed["bytes"][:20],
        input_pixels=skewed["pixels"][:20],
        options=options,
    )
    assert not few.enough and not few.drift


# --- tfloop monitor, as a user runs it -------------------------------------------------------------------


def write_log(root: str, sample: dict[str, Any], *, now: datetime, version: int = 1) -> None:
    """The sample as serving writes it: batches of JSON lines below predictions/<model>/<day>/."""
    records = [
        PredictionRecord(
            sha256=f"{i:064x}",
            model_name=NAME,
            model_version=version,
            top_k=[(label, confidence), ("other", 1 - confidence)],
            margin=2 * confidence - 1,
            entropy=0.5,
            time=(now - timedelta(minutes=30) + timedelta(seconds=i)).isoformat(),
            bytes=size,
            format="jpeg",
            width=64,
            height=64,
        )
        for i, (label, confidence, size) in enumerate(
            zip(sample["predicted"], sample["confidences"], sample["bytes"], strict=True)
        )
    ]
    for sequence, start in enumerate(range(0, len(records), 250)):
        batch = records[start : start + 250]
        uri = storage.join(model_log_uri(root, NAME), batch_name(now, writer="replica-a", sequence=sequence))
        storage.write_if_absent(uri, ("\n".join(r.to_json() for r in batch) + "\n").encode())


@pytest.fixture
def watched(tmp_path: Path) -> dict[str, str]:
    """A published version 1 whose training run (a real MLflow store) carries the reference."""
    from mlflow.tracking import MlflowClient

    from training.drift import REFERENCE_ARTIFACT

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.create_experiment("training", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.log_dict(run.info.run_id, reference().to_dict(), REFERENCE_ARTIFACT)
    client.set_terminated(run.info.run_id)
    version = tmp_path / "models" / NAME / "1"
    version.mkdir(parents=True)
    (version / "tfloop.json").write_text(json.dumps({"labels": LABELS, "run_id": run.info.run_id}))
    (version / "saved_model.pb").write_bytes(b"complete")
    return {"tracking": tracking, "models": str(tmp_path / "models"), "feedback": str(tmp_path / "feedback")}


def monitor(
    watched: dict[str, str], tmp_path: Path, api_url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFLOOP_", "PREFECT_", "MLFLOW_"))}
    env.update({"TFLOOP_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api_url})
    command = [
        str(Path(sys.executable).parent / "tfloop"),
        "monitor",
        "--model-name",
        NAME,
        "--model-base",
        watched["models"],
        "--feedback-uri",
        watched["feedback"],
        "--tracking-uri",
        watched["tracking"],
        "--since",
        "2h",
        *extra,
    ]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def drift_events(api_url: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={"filter": {"event": {"name": ["tfloop.drift.detected"]}, "order": "DESC"}, "limit": 50},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["events"]


@pytest.mark.slow
def test_monitor_reports_no_drift_then_drift_and_emits_the_event(
    watched: dict[str, str],
    tmp_path: Path,
    prefect_server: Any,  # noqa: F811
) -> None:
    api_url = prefect_server.api_url
    now = datetime.now(UTC)
    write_log(watched["feedback"], draws(600, TEST_SHARES, seed=5), now=now)
    calm = monitor(watched, tmp_path, api_url, "--json", "--report", str(tmp_path / "calm.png"))
    assert calm.returncode == 0, calm.stderr
    result = json.loads(calm.stdout.strip().splitlines()[-1])
    assert result["drift"] is False and result["predictions"] == 600 and result["model_version"] == 1
    assert result["event_emitted"] is False
    assert (tmp_path / "calm.png").read_bytes().startswith(b"\x89PNG")
    assert drift_events(api_url) == []

    skewed_root = str(tmp_path / "feedback-skewed")
    write_log(skewed_root, draws(600, [5 * TEST_SHARES[0], *TEST_SHARES[1:]], seed=6), now=now)
    watched_skewed = {**watched, "feedback": skewed_root}
    shifted = monitor(watched_skewed, tmp_path, api_url, "--json")
    assert shifted.returncode == 3, shifted.stderr
    result = json.loads(shifted.stdout.strip().splitlines()[-1])
    assert result["drift"] is True and result["event_emitted"] is True
    drifted = {(c["name"], c["statistic"]) for c in result["checks"] if c["drifted"]}
    assert ("predicted class shares", "psi") in drifted and ("top-1 confidence", "psi") not in drifted
    assert Path(result["report"]).is_file()
    deadline = time.monotonic() + 60
    while not (events := drift_events(api_url)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(events) == 1 and events[0]["resource"]["prefect.resource.id"] == f"tfloop.model.{NAME}"
    assert events[0]["payload"]["predictions"] == 600

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=watched["tracking"])
    runs = client.search_runs([client.get_experiment_by_name(f"{NAME}-monitor").experiment_id])
    assert sorted(run.data.metrics["drift"] for run in runs) == [0.0, 1.0]

    text = monitor(watched_skewed, tmp_path, api_url, "--no-event")
    assert text.returncode == 3 and "DRIFT" in text.stdout and "predicted class shares" in text.stdout
    assert len(drift_events(api_url)) == 1


def test_monitor_without_a_reference_says_how_to_fix(watched: dict[str, str], tmp_path: Path) -> None:
    metadata = Path(watched["models"]) / NAME / "1" / "tfloop.json"
    metadata.write_text(json.dumps({"labels": LABELS}))
    result = monitor(watched, tmp_path, "http://127.0.0.1:9/api", "--json")
    assert result.returncode == 1
    assert "not exported from a training run" in result.stderr and "Traceback" not in result.stderr
    empty = monitor({**watched, "models": str(tmp_path / "nothing")}, tmp_path, "http://127.0.0.1:9/api")
    assert empty.returncode == 1 and "no published version" in empty.stderr
