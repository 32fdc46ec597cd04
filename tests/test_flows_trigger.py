"""flows.yaml on a real Prefect server (event and automation services on, one server for the module) with a
process worker: a second run of a deployment while the first is running waits for it (ENQUEUE), a run of
another deployment of the same model waits for the model's global concurrency limit, and the
feedback trigger starts exactly one ``retrain-from-feedback`` run once the corrections of two clients (a
real serving process over HTTP and a second sender of the same events) cross the threshold.

Slow (a server, workers and a serving process start; a tiny model is exported). The retraining run is the
real flow; the test stops it once it has been seen running, and cancels it so that it frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.model]

ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 3  # corrections: THRESHOLD - 2 from serving, one from a second client, one more
LABELS = ("circle", "square")


def _png(seed: int) -> bytes:
    from training.demo_data import draw_demo_image

    buffer = io.BytesIO()
    draw_demo_image(LABELS[seed % 2], seed=1000 + seed, image_size=32).save(buffer, format="PNG")
    return buffer.getvalue()


def _start(command: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started, with everything it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)


def _wait_until(predicate: Any, *, timeout: float, what: str, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    tails = "\n".join(
        f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]) for log in logs
    )
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture
def exported_model(tfloop_home: Path) -> dict[str, str]:
    """A tiny (untrained) model exported for real, a tiny base dataset and an empty feedback queue."""
    from export.api import export_model
    from training.demo_data import make_demo_dataset
    from training.models import build_model

    data = tfloop_home / "data" / "demo"
    make_demo_dataset(str(data), per_class=6, image_size=32, labels=LABELS)
    model = build_model("mobilenet_v2", len(LABELS), image_size=32, weights="none")
    base = tfloop_home / "models"
    export_model(
        model, base=str(base), model_name="tfloop-classifier", labels=list(LABELS), backbone="mobilenet_v2"
    )
    return {"data": str(data), "models": str(base), "feedback": str(tfloop_home / "feedback")}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from pipeline.prefect_server import start_server

    home = tmp_path_factory.mktemp("prefect-server")
    # An enqueued run is looked at again after this many seconds (Prefect's default: 30).
    extra = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3"}
    with start_server(home=home, startup_timeout=300, extra_env=extra) as server:
        yield server


@contextlib.contextmanager
def _client(api_url: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _feedback_runs(api_url: str, *, besides: frozenset[Any] = frozenset()) -> list[Any]:
    """The runs of ``feedback-retrain`` on the server, except those whose ids are in ``besides``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(api_url) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["feedback-retrain"]))
        )
    return [run for run in runs if run.id not in besides]


def _worker_env(server: Any, tfloop_home: Path, data: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(server.env())
    env.update(
        {
            "TFLOOP_HOME": str(tfloop_home),
            "TFLOOP_DATA_URI": data,
            "KUBECONFIG": str(tfloop_home / "no-kubeconfig"),
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        }
    )
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


def _cancel_unfinished(api_url: str) -> None:
    """Cancel runs a stopped worker left behind and free the model's loop slot they held (the server would
    free it when its lease expires), so the next test on this server does not wait for them."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled

    from pipeline.locking import loop_limit_name

    with _client(api_url) as client:
        for run in _feedback_runs(api_url):
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(run.id, Cancelled(message="stopped by the test"), force=True)
        with contextlib.suppress(ObjectNotFound):
            client.update_global_concurrency_limit(
                loop_limit_name("tfloop-classifier"), GlobalConcurrencyLimitUpdate(active_slots=0)
            )


def _slot_interval(client: Any, run: Any) -> tuple[Any, Any]:
    """When a run worked inside the model's loop slot: from its first task's start to its last task's end
    (its tasks run only while it holds the slot; the run itself ends a moment after it gave the slot up)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    starts = [task_run.start_time for task_run in task_runs if task_run.start_time is not None]
    ends = [task_run.end_time for task_run in task_runs if task_run.end_time is not None]
    assert starts and len(ends) == len(task_runs), f"run {run.name}: tasks not all finished: {task_runs}"
    return min(starts), max(ends)


def test_runs_of_a_model_never_overlap(tfloop_home: Path, prefect_server: Any, tmp_path: Path) -> None:
    """Two runs of one deployment and one of another, all due at once: the second run of the deployment is
    enqueued (ENQUEUE), and the other deployment's run waits for the model's global concurrency limit.

    Each run is given a dataset that does not exist, so it holds the slot while its first task retries
    (about 15 s) and then fails: long enough for the runs to collide, without any training."""
    from pipeline.locking import loop_limit_name
    from pipeline.prefect_server import DeployOptions, deploy_flows

    api_url = prefect_server.api_url
    deploy_flows(
        flows_file=ROOT / "flows.yaml",
        project_dir=ROOT,
        api_url=api_url,
        home=prefect_server.home,
        options=DeployOptions(names=("feedback-retrain", "train-and-deploy"), feedback_threshold=10_000),
        model_name="tfloop-classifier",
    )
    missing = {"data_uri": str(tmp_path / "no-dataset")}
    with _client(api_url) as client:
        feedback = client.read_deployment_by_name("retrain-from-feedback/feedback-retrain")
        manual = client.read_deployment_by_name("train-and-deploy/train-and-deploy")
        for deployment in (feedback, manual):
            assert deployment.global_concurrency_limit is not None
            assert deployment.global_concurrency_limit.limit == 1
            assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
        # All runs are due before the worker's first poll: they collide for certain.
        created = [
            client.create_flow_run_from_deployment(
                feedback.id, parameters={**missing, "reason": f"run {index}"}
            )
            for index in range(2)
        ]
        created.append(client.create_flow_run_from_deployment(manual.id, parameters=missing))
    worker_log = tmp_path / "worker.log"
    worker = _start(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "tfloop-local", "--type", "process"],
        env=_worker_env(prefect_server, tfloop_home, str(tmp_path / "no-dataset")),
        log=worker_log,
    )
    try:

        def finished() -> list[Any] | None:
            with _client(api_url) as client:
                runs = [client.read_flow_run(run.id) for run in created]
            return runs if all(run.state and run.state.is_final() for run in runs) else None

        runs = _wait_until(
            finished, timeout=400, what="the three runs to finish", logs=[worker_log, prefect_server.log_path]
        )
        with _client(api_url) as client:
            histories = [[state.name for state in client.read_flow_run_states(run.id)] for run in runs]
            slots = [_slot_interval(client, run) for run in runs]
            limit = client.read_global_concurrency_limit_by_name(loop_limit_name("tfloop-classifier"))
    finally:
        _stop(worker)
    for run in runs:
        assert run.state.is_failed() and "base dataset" in (run.state.message or ""), (run.name, run.state)
    # The deployment's own limit: exactly one of its two runs was enqueued, the other deployment's never.
    assert ["AwaitingConcurrencySlot" in history for history in histories].count(True) == 1, histories
    assert "AwaitingConcurrencySlot" not in histories[2], histories[2]
    # The model's limit: the manual run was running while a feedback run was ...
    manual_run = runs[2]
    assert any(
        run.start_time < manual_run.end_time and manual_run.start_time < run.end_time for run in runs[:2]
    ), [(run.start_time, run.end_time) for run in runs]
    # ... but no two runs held the slot at the same time.
    ordered = sorted(slots)
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert end <= start, ordered
    assert limit.limit == 1 and limit.active_slots == 0  # released by every run, failed ones too


async def _emit_as_second_client(api_url: str, *, label: str) -> bool:
    """A feedback event exactly as a serving replica emits it, from another client."""
    from serving.events import PrefectEventSender, feedback_event

    sender = PrefectEventSender(api_url, timeout_s=10.0)
    await sender.start()
    try:
        return await sender.send(
            feedback_event(model_name="tfloop-classifier", label=label, payload={"source": "second client"})
        )
    finally:
        await sender.stop()


def test_threshold_of_corrections_starts_exactly_one_retraining_run(
    tfloop_home: Path, exported_model: dict[str, str], prefect_server: Any, tmp_path: Path
) -> None:
    from pipeline.prefect_server import DeployOptions, deploy_flows

    api_url = prefect_server.api_url
    earlier = frozenset(run.id for run in _feedback_runs(api_url))  # other tests' runs on this server
    deployed = deploy_flows(
        flows_file=ROOT / "flows.yaml",
        project_dir=ROOT,
        api_url=api_url,
        home=prefect_server.home,
        options=DeployOptions(
            feedback_threshold=THRESHOLD,
            feedback_within_s=3600,
            names=("feedback-retrain",),
            parameters={
                "training": {"image_size": 32, "epochs": 1, "batch_size": 8, "min_images_per_label": 2}
            },
        ),
    )
    assert deployed == ["feedback-retrain"]

    env = _worker_env(prefect_server, tfloop_home, exported_model["data"])
    worker_log, serving_log = tmp_path / "worker.log", tmp_path / "serving.log"
    logs = [worker_log, serving_log, prefect_server.log_path]
    worker = _start(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "tfloop-local", "--type", "process"],
        env=env,
        log=worker_log,
    )
    port = free_port()
    serving_env = dict(
        env,
        TFLOOP_SERVE_MODEL_BASE=exported_model["models"],
        TFLOOP_SERVE_MODEL_NAME="tfloop-classifier",
        TFLOOP_SERVE_FEEDBACK_URI=exported_model["feedback"],
        TFLOOP_SERVE_CACHE_DIR=str(tmp_path / "serving-cache"),
        TFLOOP_SERVE_HOST="127.0.0.1",
        TFLOOP_SERVE_PORT=str(port),
        TFLOOP_SERVE_GRPC_PORT="0",
        TFLOOP_SERVE_PREFECT_API_URL=api_url,
    )
    serving = _start([sys.executable, "-m", "serving"], env=serving_env, log=serving_log)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(ready, timeout=300, what="the serving process to be ready", logs=logs)

        def post(index: int) -> None:
            answer = httpx.post(
                f"{url}/feedback",
                data={"label": LABELS[index % 2]},
                files={"file": (f"img{index}.png", _png(index), "image/png")},
                timeout=60,
            )
            assert answer.status_code == 202, answer.text

        for index in range(THRESHOLD - 2):
            post(index)
        assert asyncio.run(_emit_as_second_client(api_url, label=LABELS[1]))
        time.sleep(15)  # time enough for a wrongly eager trigger to fire
        assert _feedback_runs(api_url, besides=earlier) == [], "a run started below the threshold"

        post(THRESHOLD - 1)
        runs = _wait_until(
            lambda: _feedback_runs(api_url, besides=earlier),
            timeout=180,
            what="the feedback trigger to start a run",
            logs=logs,
        )

        def running() -> Any:
            found = _feedback_runs(api_url, besides=earlier)
            return (
                found
                if any(r.state and (r.state.is_running() or r.state.is_final()) for r in found)
                else None
            )

        runs = _wait_until(running, timeout=180, what="the worker to run the retraining flow", logs=logs)
        assert asyncio.run(_emit_as_second_client(api_url, label=LABELS[0]))  # below the next threshold
        time.sleep(10)  # no second run may follow
        runs = _feedback_runs(api_url, besides=earlier)
        assert len(runs) == 1, [(r.name, r.state_name) for r in runs]
        run = runs[0]
        assert run.parameters["reason"] == "feedback threshold reached"
        assert run.parameters["trigger"]["event"] == "tfloop.feedback.received"
        assert run.parameters["trigger"]["resource"] == "tfloop.model.tfloop-classifier"
        assert run.parameters["trigger"]["event_id"]
        assert run.parameters["training"]["epochs"] == 1
        assert run.state is not None and not run.state.is_failed(), run.state
    finally:
        _stop(serving)
        _stop(worker)
        _cancel_unfinished(api_url)
