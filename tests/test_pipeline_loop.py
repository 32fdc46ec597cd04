"""Code tier: the loop's plain functions (dataset roots, consuming feedback, summaries) and the deployment
file handling, on local folders and on the GCS emulator."""

from __future__ import annotations

from pathlib import Path

import pytest

import storage
from pipeline import delivery, feedback_queue, locking, options, summary
from pipeline.prefect_server import (
    DeployOptions,
    PrefectServerError,
    apply_deploy_options,
    load_flows_file,
    locate_server,
)

pytestmark = pytest.mark.code
ROOT = Path(__file__).resolve().parent.parent


def _queue(root: str, items: dict[str, bytes]) -> None:
    for name, data in items.items():
        storage.write_bytes(storage.join(root, name), data)


@pytest.fixture(params=["local", "gcs"])
def roots(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    base = str(tmp_path) if request.param == "local" else request.getfixturevalue("gcs_bucket")
    data = storage.join(base, "data")
    feedback = storage.join(base, "feedback")
    _queue(data, {"cat/a.jpg": b"a", "dog/b.jpg": b"b"})
    return data, feedback


def test_gather_roots_lists_consumed_and_pending(roots: tuple[str, str]) -> None:
    data, feedback = roots
    _queue(feedback, {"pending/cat/1.jpg": b"1", "pending/dog/2.png": b"2", "consumed/run-a/cat/0.jpg": b"0"})
    gathered = feedback_queue.gather_roots(data_uri=data, feedback_root=feedback)
    assert gathered.all == [
        data,
        storage.join(feedback, "consumed", "run-a"),
        storage.join(feedback, "pending"),
    ]
    assert gathered.pending_files == ("cat/1.jpg", "dog/2.png")
    without = feedback_queue.gather_roots(data_uri=data, feedback_root=feedback, include_consumed=False)
    assert without.all == [data, storage.join(feedback, "pending")]


def test_gather_roots_refuses_a_missing_base_dataset(tmp_path: Path) -> None:
    with pytest.raises(storage.TfloopError, match="make-demo"):
        feedback_queue.gather_roots(data_uri=str(tmp_path / "nothing"), feedback_root=str(tmp_path / "fb"))


def test_consume_feedback_moves_only_the_listed_files_and_is_idempotent(roots: tuple[str, str]) -> None:
    _, feedback = roots
    _queue(feedback, {"pending/cat/1.jpg": b"1", "pending/dog/2.png": b"2", "pending/dog/late.png": b"3"})
    files = ("cat/1.jpg", "dog/2.png")
    first = feedback_queue.consume_feedback(feedback_root=feedback, run_id="abc123", files=files)
    assert (first.moved, first.already_moved, first.missing) == (2, 0, 0)
    assert first.destination == storage.join(feedback, "consumed", "abc123")
    assert storage.list_files(storage.join(feedback, "consumed", "abc123")) == ["cat/1.jpg", "dog/2.png"]
    assert storage.read_bytes(storage.join(feedback, "consumed", "abc123", "dog", "2.png")) == b"2"
    # The item that arrived during training stays pending for the next run.
    assert feedback_queue.pending_files(feedback) == ["dog/late.png"]
    again = feedback_queue.consume_feedback(feedback_root=feedback, run_id="abc123", files=files)
    assert (again.moved, again.already_moved, again.missing) == (0, 2, 0)


def test_consume_feedback_rejects_path_tricks(tmp_path: Path) -> None:
    with pytest.raises(storage.TfloopError, match="relative"):
        feedback_queue.consume_feedback(feedback_root=str(tmp_path), run_id="r", files=["../../etc/passwd"])
    with pytest.raises(storage.TfloopError, match="run id"):
        feedback_queue.consumed_folder_name("///")
    assert feedback_queue.consumed_folder_name("a/b c") == "a-b-c"


def test_threshold_check_counts_pending_items(tmp_path: Path) -> None:
    feedback = str(tmp_path / "fb")
    assert not feedback_queue.feedback_threshold_reached(feedback_root=feedback, threshold=2)
    _queue(feedback, {"pending/cat/1.jpg": b"1", "pending/cat/2.jpg": b"2"})
    assert feedback_queue.feedback_threshold_reached(feedback_root=feedback, threshold=2)
    assert not feedback_queue.feedback_threshold_reached(feedback_root=feedback, threshold=3)


def test_describe_trigger_and_summary() -> None:
    text = summary.describe_trigger(
        "feedback threshold reached", {"event_id": "e1", "resource": "", "x": None}
    )
    assert text == "feedback threshold reached (event_id=e1)"
    assert summary.describe_trigger(None, None) == "started manually"
    result = summary.LoopResult(run_id="r1", reason="manual", gate_passed=False, gate_reason="refused: worse")
    result.skipped.append("export: the gate refused the candidate")
    text = summary.format_summary(result)
    assert "REFUSED" in text and "skipped: export" in text
    assert summary.LoopResult.from_dict(result.to_dict()) == result


def test_gate_options_make_a_policy() -> None:
    policy = options.GateOptions(min_accuracy=0.7, max_accuracy_drop=0.05).policy()
    assert policy.min_accuracy == 0.7 and policy.max_accuracy_drop == 0.05


def test_delivery_steps_skip_with_a_reason_when_nothing_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    request = delivery.DeliveryRequest(
        model_name="m",
        model_base=str(tmp_path / "models"),
        version=3,
        run_id="r",
        tracking_uri="sqlite:///x.db",
        options=options.DeliveryOptions(build_image=False),
    )
    build = delivery.build_serving_image(request)
    assert not build.ran and "disabled" in build.detail and "version 3" in build.detail
    rollout = delivery.roll_out_image(request, image=None)
    assert not rollout.ran and "no image" in rollout.detail
    forced = delivery.roll_out_image(request, image="registry/m:v3")
    assert not forced.ran and "no cluster configured" in forced.detail
    smoke = delivery.smoke_test_serving(request, rollout=rollout)
    assert not smoke.ran and "serving URL" in smoke.detail


def test_flows_yaml_follows_the_prefect_schema() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    config = load_flows_file(ROOT / "flows.yaml")
    model = PrefectYamlModel.model_validate(config)
    names = {d.name: d for d in model.deployments}
    assert set(names) == {"nightly-retrain", "feedback-retrain", "drift-retrain", "train-and-deploy"}
    drift = {d["name"]: d for d in config["deployments"]}["drift-retrain"]["triggers"][0]
    assert drift["expect"] == ["tfloop.drift.detected"] and drift["threshold"] == 1
    raw = {d["name"]: d for d in config["deployments"]}
    assert raw["nightly-retrain"]["schedules"][0]["cron"]
    trigger = raw["feedback-retrain"]["triggers"][0]
    assert trigger["expect"] == ["tfloop.feedback.received"]
    assert trigger["threshold"] == 50 and trigger["within"] == 86400
    assert "{{ event.id | string }}" in str(trigger["parameters"])
    assert all(d["work_pool"]["name"] == "tfloop-local" for d in raw.values())
    for deployment in raw.values():
        module, _, function = deployment["entrypoint"].partition(":")
        assert (ROOT / module).is_file()
        assert f"def {function}(" in (ROOT / module).read_text()


def test_deploy_options_override_threshold_pool_and_selection() -> None:
    config = load_flows_file(ROOT / "flows.yaml")
    options = DeployOptions(
        pool="kubernetes-gpu", feedback_threshold=3, feedback_within_s=600, names=("feedback-retrain",)
    )
    applied = apply_deploy_options(config, options, environ={"TFLOOP_TRAIN_IMAGE": "reg/tfloop-train:1"})
    assert [d["name"] for d in applied["deployments"]] == ["feedback-retrain"]
    deployment = applied["deployments"][0]
    assert deployment["triggers"][0]["threshold"] == 3 and deployment["triggers"][0]["within"] == 600
    assert deployment["work_pool"]["name"] == "tfloop-gpu"
    variables = deployment["work_pool"]["job_variables"]
    assert variables["image"] == "reg/tfloop-train:1"
    assert "MLFLOW_TRACKING_URI" not in variables["env"]  # unset variables are dropped, not sent as templates
    assert config["deployments"][1]["triggers"][0]["threshold"] == 50  # the original is untouched
    every = {
        d["name"]: d for d in apply_deploy_options(config, DeployOptions(feedback_threshold=7))["deployments"]
    }
    assert every["feedback-retrain"]["triggers"][0]["threshold"] == 7
    assert every["drift-retrain"]["triggers"][0]["threshold"] == 1  # one drift event is enough, always
    with pytest.raises(PrefectServerError, match="unknown deployment"):
        apply_deploy_options(config, DeployOptions(names=("nope",)))
    with pytest.raises(PrefectServerError, match="work pool kind"):
        DeployOptions(pool="nope")


def test_locate_server_finds_nothing_when_nothing_answers(tmp_path: Path) -> None:
    assert locate_server(home=tmp_path, environ={"PREFECT_API_URL": "http://127.0.0.1:9/api"}) is None


def test_a_cluster_without_a_registry_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(
        delivery.DeliveryConfigError, match=r"set delivery\.registry=HOST\[:PORT\] or delivery\.rollout"
    ):
        delivery.check_delivery(options.DeliveryOptions())
    with pytest.raises(delivery.DeliveryConfigError, match="push=false"):
        delivery.check_delivery(options.DeliveryOptions(registry="registry.example:5000", push=False))
    delivery.check_delivery(options.DeliveryOptions(registry="registry.example:5000"))
    delivery.check_delivery(options.DeliveryOptions(rollout=False))
    delivery.check_delivery(options.DeliveryOptions(build_image=False))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    delivery.check_delivery(options.DeliveryOptions())  # no cluster: nothing to pull, the local path works


def test_final_delivery_errors_are_not_retried() -> None:
    from prefect.states import Failed

    from pipeline import tasks

    def state(error: BaseException) -> object:
        return Failed(data=error)

    assert tasks.roll_out.retry_condition_fn is tasks.retry_unless_final
    assert (
        tasks.retry_unless_final(tasks.roll_out, None, state(delivery.RolledBackError("rolled back")))
        is False
    )
    assert (
        tasks.retry_unless_final(tasks.roll_out, None, state(delivery.DeliveryConfigError("no registry")))
        is False
    )
    assert (
        tasks.retry_unless_final(tasks.roll_out, None, state(delivery.DeliveryError("API timeout"))) is True
    )
    assert tasks.retry_unless_final(tasks.roll_out, None, state(OSError("reset"))) is True


def test_local_loop_lock_excludes_a_second_run_and_dies_with_its_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    with locking.local_loop_lock(tmp_path, "m"):
        with (
            pytest.raises(locking.LoopBusyError, match="one at a time"),
            locking.local_loop_lock(tmp_path, "m", wait_s=0),
        ):
            pass
        with locking.local_loop_lock(tmp_path, "other-model", wait_s=0):
            pass  # another model's runs are not held up
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.locking import local_loop_lock\n"
            f"with local_loop_lock(Path({str(tmp_path)!r}), 'm'):\n"
            "    print('held', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(locking.LoopBusyError), locking.local_loop_lock(tmp_path, "m", wait_s=0):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with locking.local_loop_lock(tmp_path, "m", wait_s=5):
        pass  # a killed holder never leaves the lock held


def test_summary_says_what_is_live() -> None:
    promoted = summary.LoopResult(run_id="r", live_version=3, live_previous=2, promoted=True)
    assert "live: version 3 (promoted (was 2))" in summary.format_summary(promoted)
    refused = summary.LoopResult(run_id="r", gate_passed=False, gate_reason="refused", live_version=2)
    assert "live: version 2 (unchanged)" in summary.format_summary(refused)
    assert "live: no version yet" in summary.format_summary(summary.LoopResult(run_id="r"))


def test_flows_yaml_runs_one_run_at_a_time_per_deployment() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    config = load_flows_file(ROOT / "flows.yaml")
    model = PrefectYamlModel.model_validate(config)
    for deployment in model.deployments:
        assert deployment.concurrency_limit is not None
        assert deployment.concurrency_limit.limit == 1
        assert deployment.concurrency_limit.collision_strategy == "ENQUEUE"
    applied = apply_deploy_options(config, DeployOptions(names=("feedback-retrain",)))
    assert applied["deployments"][0]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
