"""The drift watch: the statistics on known distributions; the watch as a library over a published version
and a prediction log (local and on the GCS emulator); and ``tfloop monitor`` as a user runs it (its own
process) on a log drawn from the training distribution (no drift, exit 0) and on one where a class is five
times over-represented (drift, exit 3, the event ``tfloop.drift.detected`` read back from a real Prefect
server). That training writes the reference and export carries it: tests/test_training.py."""

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
    DriftReport,
    InputStats,
    build_reference,
    chi_square_p_value,
    compare,
    psi,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "watched"
LABELS = ["ant", "bee", "cat", "dog", "eel", "fox"]
SHARES = [0.2, 0.2, 0.15, 0.15, 0.15, 0.15]
SKEWED = [5 * SHARES[0], *SHARES[1:]]  # "ant" five times over-represented


def draws(count: int, shares: Sequence[float], *, seed: int, side: int = 64) -> dict[str, Any]:
    """Predictions as the model makes them on the training distribution, with class ``shares``."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(shares) / np.sum(shares)
    return {
        "predicted": [LABELS[i] for i in rng.choice(len(LABELS), size=count, p=weights)],
        "confidences": np.clip(rng.beta(8, 2, size=count), 0, 1).tolist(),
        "inputs": InputStats(
            bytes=rng.normal(20_000, 2_000, size=count).astype(int).tolist(),
            width=[side] * count,
            height=[side] * count,
            format=["jpeg" if i % 4 else "png" for i in range(count)],
        ),
    }


def reference() -> DriftReference:
    test = draws(400, SHARES, seed=1)
    train = draws(2000, SHARES, seed=2)
    return build_reference(
        labels=LABELS,
        train_labels=train["predicted"],
        test_predicted=test["predicted"],
        test_confidences=test["confidences"],
        inputs=train["inputs"],
    )


def compare_sample(sample: dict[str, Any], options: DriftOptions | None = None) -> DriftReport:
    return compare(
        reference(),
        predicted=sample["predicted"],
        confidences=sample["confidences"],
        inputs=sample["inputs"],
        options=options or DriftOptions(),
    )


def drifted(report: DriftReport) -> set[tuple[str, str]]:
    return {(check.name, check.statistic) for check in report.checks if check.drifted}


# --- the statistics -------------------------------------------------------------------------------------


@pytest.mark.code
def test_psi_and_chi_square_tell_a_shift_from_noise() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.0)
    assert psi([0.5, 0.5], [0.9, 0.1]) > 0.5
    assert psi([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == pytest.approx(0.0)  # empty bins do not blow up
    assert chi_square_p_value([0.5, 0.5], [500, 500]) > 0.9
    assert chi_square_p_value([0.5, 0.5], [600, 400]) < 1e-6
    # exact survival function values (chi-square distribution tables): 6.04 on 3 dof, 4.0 on 1, 10.0 on 5
    assert chi_square_p_value([0.25] * 4, [64, 50, 45, 41]) == pytest.approx(0.1097, abs=0.005)
    assert chi_square_p_value([0.5, 0.5], [60, 40]) == pytest.approx(0.0455, abs=0.005)
    assert chi_square_p_value([1 / 6] * 6, [30, 20, 20, 20, 10, 20]) == pytest.approx(0.0752, abs=0.005)


@pytest.mark.code
def test_compare_names_what_drifted() -> None:
    calm = compare_sample(draws(600, SHARES, seed=3))
    assert calm.enough and not calm.drift and calm.verdict == "no drift", calm.checks
    assert {c.name for c in calm.checks} == {
        "predicted class shares",
        "top-1 confidence",
        "input bytes",
        "input width",
        "input height",
        "input format",
    }

    shifted = compare_sample(draws(600, SKEWED, seed=4))
    assert shifted.drift and shifted.verdict == "drift"
    assert drifted(shifted) == {("predicted class shares", "psi"), ("predicted class shares", "chi_square_p")}

    same = draws(600, SHARES, seed=3)
    unsure = compare_sample({**same, "confidences": (np.asarray(same["confidences"]) * 0.5).tolist()})
    assert drifted(unsure) == {("top-1 confidence", "psi")}

    bigger = compare_sample(draws(600, SHARES, seed=3, side=640))
    assert drifted(bigger) == {("input width", "psi"), ("input height", "psi")}

    pngs = InputStats(**{**same["inputs"].__dict__, "format": ["png"] * 600})
    assert drifted(compare_sample({**same, "inputs": pngs})) == {("input format", "psi")}


@pytest.mark.code
def test_too_few_predictions_never_count_as_drift() -> None:
    sample = draws(600, SKEWED, seed=4)
    few = {
        "predicted": sample["predicted"][:20],
        "confidences": sample["confidences"][:20],
        "inputs": InputStats(
            *(getattr(sample["inputs"], f)[:20] for f in ("bytes", "width", "height", "format"))
        ),
    }
    report = compare_sample(few)
    assert not report.enough and not report.drift and report.verdict == "too few predictions"
    assert not drifted(report)
    assert compare_sample(few, DriftOptions(min_predictions=10)).drift
    assert not compare_sample({"predicted": [], "confidences": [], "inputs": InputStats()}).drift


@pytest.mark.code
def test_reference_round_trips_and_refuses_other_documents() -> None:
    ref = reference()
    assert DriftReference.from_dict(json.loads(ref.to_json())) == ref
    assert ref.class_prior == pytest.approx([0.2, 0.2, 0.15, 0.15, 0.15, 0.15], abs=0.03)
    assert ref.input_formats == {"jpeg": 0.75, "png": 0.25} and ref.input_items == 2000
    with pytest.raises(KeyError):
        DriftReference.from_dict({"labels": LABELS})
    with pytest.raises(ValueError):
        DriftReference.from_dict({**ref.to_dict(), "class_prior": [1.0]})


# --- the watch over storage -------------------------------------------------------------------------------


def write_log(
    root: str, sample: dict[str, Any], *, now: datetime, version: int = 1, writer: str = "a"
) -> None:
    """The sample as serving writes it: batches of JSON lines below predictions/<model>/<day>/."""
    inputs: InputStats = sample["inputs"]
    records = [
        PredictionRecord(
            sha256=f"{i:064x}",
            model_name=NAME,
            model_version=version,
            top_k=[(label, confidence), ("other", 1 - confidence)],
            margin=2 * confidence - 1,
            entropy=0.5,
            time=(now - timedelta(minutes=30) + timedelta(seconds=i)).isoformat(),
            bytes=inputs.bytes[i],
            format=inputs.format[i],
            width=inputs.width[i],
            height=inputs.height[i],
        )
        for i, (label, confidence) in enumerate(zip(sample["predicted"], sample["confidences"], strict=True))
    ]
    for sequence, start in enumerate(range(0, len(records), 250)):
        batch = records[start : start + 250]
        name = batch_name(now, writer=f"replica-{writer}", sequence=sequence)
        uri = storage.join(model_log_uri(root, NAME), name)
        storage.write_if_absent(uri, ("\n".join(r.to_json() for r in batch) + "\n").encode())


def publish(models: str, version: int, *, with_reference: bool = True) -> None:
    """A published version as export leaves it: tfloop.json, the reference, saved_model.pb last."""
    folder = storage.join(models, NAME, str(version))
    storage.write_text(storage.join(folder, "tfloop.json"), json.dumps({"labels": LABELS, "run_id": "r1"}))
    if with_reference:
        storage.write_text(storage.join(folder, "reference.json"), reference().to_json())
    storage.write_bytes(storage.join(folder, "saved_model.pb"), b"complete")


@pytest.fixture
def watched(tmp_path: Path) -> dict[str, str]:
    """A published version 1 carrying its reference, an MLflow store for the watch's runs."""
    models = str(tmp_path / "models")
    publish(models, 1)
    return {
        "tracking": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "models": models,
        "feedback": str(tmp_path / "feedback"),
        "artifacts": str(tmp_path / "monitor-artifacts"),
    }


def request_for(watched: dict[str, str], **overrides: Any) -> Any:
    from pipeline.monitor import MonitorRequest

    fields: dict[str, Any] = {
        "model_name": NAME,
        "model_base": watched["models"],
        "feedback_uri": watched["feedback"],
        "tracking_uri": watched["tracking"],
        "artifact_root": watched["artifacts"],
        "since": datetime.now(UTC) - timedelta(hours=2),
    }
    return MonitorRequest(**(fields | overrides))


@pytest.mark.slow
def test_only_the_watched_versions_predictions_count(watched: dict[str, str], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.monitor import run_monitor

    now = datetime.now(UTC)
    publish(watched["models"], 2)
    write_log(watched["feedback"], draws(600, SHARES, seed=5), now=now, version=1)
    write_log(watched["feedback"], draws(400, SKEWED, seed=6), now=now, version=2, writer="b")
    v1 = run_monitor(request_for(watched, model_version=1), report_path=tmp_path / "v1.png", emit=False)
    assert v1.model_version == 1 and v1.report.predictions == 600 and not v1.report.drift
    assert (tmp_path / "v1.png").read_bytes().startswith(b"\x89PNG")
    live = run_monitor(request_for(watched), report_path=None, emit=False)
    assert live.model_version == 2 and live.report.predictions == 400 and live.report.drift
    assert not live.event_emitted and live.report_png is None
    mixed = run_monitor(
        request_for(watched, model_version=1, all_versions=True), report_path=None, emit=False
    )
    assert mixed.report.predictions == 1000
    old = run_monitor(
        request_for(watched, model_version=1, until=now - timedelta(minutes=25)), report_path=None, emit=False
    )
    assert old.report.predictions == 300  # one record a second from 30 minutes before `now`

    client = MlflowClient(tracking_uri=watched["tracking"])
    runs = client.search_runs([client.get_experiment_by_name(f"{NAME}-monitor").experiment_id])
    by_version = {(r.data.tags["tfloop.model_version"], r.data.metrics["predictions"]) for r in runs}
    assert by_version == {("1", 600.0), ("2", 400.0), ("1", 1000.0), ("1", 300.0)}
    run = client.get_run(live.mlflow_run_id)
    assert run.data.metrics["drift"] == 1.0 and run.data.metrics["predicted_class_shares_psi"] > 0.2
    assert "drift_report.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_the_watch_reads_a_version_and_a_log_on_gcs(gcs_bucket: str, tmp_path: Path) -> None:
    from pipeline.monitor import run_monitor

    watched = {
        "tracking": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "models": f"{gcs_bucket}/models",
        "feedback": f"{gcs_bucket}/feedback",
        "artifacts": str(tmp_path / "monitor-artifacts"),
    }
    publish(watched["models"], 1)
    write_log(watched["feedback"], draws(300, SKEWED, seed=7), now=datetime.now(UTC))
    result = run_monitor(request_for(watched), report_path=None, emit=False)
    assert result.model_version == 1 and result.report.predictions == 300 and result.report.drift


# --- tfloop monitor, as a user runs it -------------------------------------------------------------------


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
    write_log(watched["feedback"], draws(600, SHARES, seed=5), now=now)
    calm = monitor(watched, tmp_path, api_url, "--json", "--report", str(tmp_path / "calm.png"))
    assert calm.returncode == 0, calm.stderr
    result = json.loads(calm.stdout.strip().splitlines()[-1])
    assert result["drift"] is False and result["predictions"] == 600 and result["model_version"] == 1
    assert result["event_emitted"] is False and result["report"] == str(tmp_path / "calm.png")
    assert {"name", "statistic", "value", "threshold", "drifted"} <= set(result["checks"][0])
    assert not any(check["drifted"] for check in result["checks"])
    assert (tmp_path / "calm.png").read_bytes().startswith(b"\x89PNG")

    skewed_root = str(tmp_path / "feedback-skewed")
    write_log(skewed_root, draws(600, SKEWED, seed=6), now=now)
    watched_skewed = {**watched, "feedback": skewed_root}
    shifted = monitor(watched_skewed, tmp_path, api_url, "--json")
    assert shifted.returncode == 3, shifted.stderr
    result = json.loads(shifted.stdout.strip().splitlines()[-1])
    assert result["drift"] is True and result["event_emitted"] is True, result
    flagged = {(c["name"], c["statistic"]) for c in result["checks"] if c["drifted"]}
    assert ("predicted class shares", "psi") in flagged and ("top-1 confidence", "psi") not in flagged
    assert Path(result["report"]).read_bytes().startswith(b"\x89PNG")
    deadline = time.monotonic() + 60
    while not (events := drift_events(api_url)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(events) == 1, events  # the calm run sent none
    assert events[0]["resource"]["prefect.resource.id"] == f"tfloop.model.{NAME}"
    assert events[0]["resource"]["tfloop.model_version"] == "1"
    assert events[0]["payload"]["predictions"] == 600 and events[0]["payload"]["drift"] is True

    text = monitor(watched_skewed, tmp_path, api_url, "--no-event")
    assert text.returncode == 3, text.stderr
    assert "DRIFT" in text.stdout and "predicted class shares" in text.stdout and "threshold" in text.stdout
    time.sleep(2)
    assert len(drift_events(api_url)) == 1


@pytest.mark.slow
def test_drift_with_an_unreachable_prefect_still_reports_it(watched: dict[str, str], tmp_path: Path) -> None:
    write_log(watched["feedback"], draws(600, SKEWED, seed=6), now=datetime.now(UTC))
    result = monitor(watched, tmp_path, "http://127.0.0.1:9/api", "--json")
    assert result.returncode == 3, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["drift"] is True and payload["event_emitted"] is False and payload["event_error"]
    assert "no Prefect event sent" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_monitor_says_how_to_fix_what_is_missing(watched: dict[str, str], tmp_path: Path) -> None:
    nowhere = "http://127.0.0.1:9/api"
    no_log = monitor(watched, tmp_path, nowhere, "--json")
    assert no_log.returncode == 1 and no_log.stdout == ""
    assert "no prediction log of watched" in no_log.stderr and "--feedback-uri" in no_log.stderr
    assert "Traceback" not in no_log.stderr

    write_log(watched["feedback"], draws(100, SHARES, seed=8), now=datetime.now(UTC))
    publish(watched["models"], 2, with_reference=False)
    no_reference = monitor(watched, tmp_path, nowhere)
    assert no_reference.returncode == 1
    assert "version 2 of watched carries no" in no_reference.stderr and "tfloop train" in no_reference.stderr
    assert "Traceback" not in no_reference.stderr

    empty = monitor({**watched, "models": str(tmp_path / "nothing")}, tmp_path, nowhere)
    assert empty.returncode == 1 and "no published version" in empty.stderr

    bad_since = monitor(watched, tmp_path, nowhere, "--since", "yesterday")
    assert bad_since.returncode == 2 and "neither a duration" in bad_since.stderr
