"""Training on accelerators' terms, run on CPUs: weights files and Keras' ImageNet cache (sha256 logged, one
clear error offline), mixed precision, MirroredStrategy over two logical CPUs and two multi-worker processes
on loopback; the device, cluster and Indexed Job helpers as plain functions."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port
from training.accel import (
    DeviceError,
    Gpu,
    WorkerRole,
    resolve_distribution,
    resolve_jit_compile,
    resolve_precision,
    worker_role,
)
from training.demo_data import make_demo_dataset
from training.distribute import ClusterError, job_name_from_hostname, tf_config_for_pod, tf_config_from_index

REPO = Path(__file__).resolve().parents[1]
TFLOOP = (sys.executable, "-m", "pipeline.cli")
SMALL = ("--image-size", "75", "--epochs", "1", "--min-images", "3")
LABELS = ("circle", "square")
SIZE = 32


# ---------------------------------------------------------------------------------------------------------
# plain functions (no TensorFlow)


@pytest.mark.code
def test_precision_follows_compute_capability() -> None:
    assert resolve_precision("auto", []) == "float32"
    assert resolve_precision("auto", [Gpu("T4", (7, 5))]) == "mixed_float16"
    assert resolve_precision("auto", [Gpu("A100", (8, 0)), Gpu("A100", (8, 0))]) == "mixed_bfloat16"
    assert resolve_precision("auto", [Gpu("A100", (8, 0)), Gpu("V100", (7, 0))]) == "mixed_float16"
    assert resolve_precision("auto", [Gpu("K80", (3, 7))]) == "float32"
    assert resolve_precision("auto", [Gpu("unknown", None)]) == "float32"
    assert resolve_precision("mixed_float16", []) == "mixed_float16"
    assert resolve_jit_compile("auto", on_gpu=True) and not resolve_jit_compile("auto", on_gpu=False)
    assert resolve_jit_compile("on", on_gpu=False) and not resolve_jit_compile("off", on_gpu=True)


@pytest.mark.code
def test_distribution_choice_and_worker_roles() -> None:
    single = WorkerRole()
    two = worker_role(
        json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}})
    )
    assert (two.workers, two.index, two.is_chief) == (2, 1, False)
    chief = worker_role(
        json.dumps({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}})
    )
    assert chief.is_chief and chief.workers == 2
    assert worker_role(None) == single and single.is_chief
    assert resolve_distribution("auto", gpu_count=0, role=single) == "none"
    assert resolve_distribution("auto", gpu_count=4, role=single) == "mirrored"
    assert resolve_distribution("auto", gpu_count=1, role=two) == "multi-worker"
    assert resolve_distribution("none", gpu_count=4, role=single) == "none"
    with pytest.raises(DeviceError, match="TF_CONFIG"):
        resolve_distribution("multi-worker", gpu_count=1, role=single)
    for bad in (
        "{not json",
        json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}),
    ):
        with pytest.raises(DeviceError, match="TF_CONFIG"):
            worker_role(bad)


@pytest.mark.code
def test_tf_config_from_the_indexed_job_completion_index() -> None:
    config = tf_config_from_index(1, workers=3, job_name="tfloop-train-x7", service="workers", port=2222)
    assert config == {
        "cluster": {"worker": [f"tfloop-train-x7-{i}.workers:2222" for i in range(3)]},
        "task": {"type": "worker", "index": 1},
    }
    assert worker_role(json.dumps(config)) == WorkerRole("worker", 1, 3)
    env = {"JOB_COMPLETION_INDEX": "2"}
    from_env = tf_config_for_pod(env, hostname="tfloop-train-x7-2", workers=3, service="w")
    assert from_env is not None and from_env["task"]["index"] == 2
    assert from_env["cluster"]["worker"][0] == "tfloop-train-x7-0.w:12345"
    assert tf_config_for_pod({}, hostname="h", workers=1) is None
    assert tf_config_for_pod({**env, "TF_CONFIG": "{}"}, hostname="h-2", workers=3) is None
    assert job_name_from_hostname("a-b-10", 10) == "a-b"
    with pytest.raises(ClusterError, match="Indexed"):
        tf_config_for_pod({}, hostname="h-0", workers=2)
    with pytest.raises(ClusterError, match="-1"):
        job_name_from_hostname("pod-0", 1)
    with pytest.raises(ClusterError, match="outside"):
        tf_config_from_index(3, workers=3, job_name="j")


@pytest.mark.code
def test_gpu_job_template_runs_an_indexed_job_behind_a_headless_service() -> None:
    import yaml

    from k8s import manifests

    template = json.loads((REPO / "k8s" / "manifests" / "prefect" / "gpu-job-template.json").read_text())
    assert template == manifests.prefect_gpu_job_template()
    job = template["job_configuration"]["job_manifest"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == "{{ workers }}"
    pod = job["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "training.distribute"]
    service = manifests.prefect_train_workers_service()
    shipped = yaml.safe_load(
        (REPO / "k8s" / "manifests" / "prefect" / "train-workers-service.yaml").read_text()
    )
    assert shipped == service
    assert service["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == "{{ workers_service }}"
    assert template["variables"]["properties"]["workers_service"]["default"] == service["metadata"]["name"]
    assert set(service["spec"]["selector"].items()) <= set(pod["metadata"]["labels"].items())
    variables = template["variables"]["properties"]
    assert variables["workers"]["default"] == 1
    assert container["command"][3:] == [
        "--workers={{ workers }}",
        "--service={{ workers_service }}",
        "--port={{ worker_port }}",
        "--",
    ]
    assert container["args"] == "{{ command }}"
    flows = yaml.safe_load((REPO / "flows.yaml").read_text())
    pool = flows["definitions"]["work_pools"]["kubernetes-gpu-multi-worker"]
    assert pool["name"] == "tfloop-gpu"
    variables = pool["job_variables"]
    assert variables["workers"] >= 2 and variables["backoff_limit"] >= 1
    assert set(variables) - {"env"} <= set(template["variables"]["properties"])
    command = variables["command"].split()
    assert command[:2] == ["tfloop", "train"] and command[command.index("--distribute") + 1] == "multi-worker"
    assert (
        command[command.index("--data") + 1] == "$(TFLOOP_DATA_URI)" and "TFLOOP_DATA_URI" in variables["env"]
    )


# ---------------------------------------------------------------------------------------------------------
# weights


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_demo_dataset(str(root), per_class=12, seed=0, image_size=SIZE, labels=LABELS)
    return root


def _config(data: Path, **overrides: Any) -> Any:
    from training.fit import TrainConfig

    settings: dict[str, Any] = {
        "data": (str(data),),
        "backbone": "mobilenet_v2",
        "image_size": SIZE,
        "batch_size": 8,
        "epochs": 1,
        "min_images_per_label": 3,
        "model_name": "shapes",
        "patience": 5,
        **overrides,
    }
    return TrainConfig(**settings)


def _tracking(folder: Path) -> Any:
    from training.tracking import TrackingSettings

    return TrackingSettings(
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        experiment="accel",
        artifact_root=str(folder / "art"),
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.model
def test_imagenet_cache_file_is_used_and_a_missing_one_offline_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.models import ModelError, imagenet_weights_file

    cache = tmp_path / "keras" / "models"
    # A proxy on a closed loopback port: any download attempt fails at once, nothing leaves the machine.
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ModelError) as caught:
        imagenet_weights_file("vgg16", image_size=224, cache_dir=cache)
    message = str(caught.value)
    assert str(cache / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5") in message
    assert "--weights PATH" in message and "download failed" in message
    assert not list(cache.glob("*.h5")), "a failed download must not leave a file behind"
    with pytest.raises(
        ModelError, match=re.escape("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
    ):
        imagenet_weights_file("inception_v3", image_size=299, cache_dir=cache, download=False)
    with pytest.raises(ModelError, match=re.escape("_1.0_160_no_top.h5")):
        imagenet_weights_file("mobilenet_v2", image_size=160, cache_dir=cache, download=False)
    cached = cache / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"cached")
    assert imagenet_weights_file("vgg16", image_size=224, cache_dir=cache) == cached


@pytest.mark.slow
@pytest.mark.model
def test_cli_imagenet_offline_without_cache_says_where_to_put_the_file(dataset: Path, tmp_path: Path) -> None:
    proxy = f"http://127.0.0.1:{free_port()}"
    env = {
        **{k: v for k, v in os.environ.items() if k.lower() not in {"no_proxy", "tf_config"}},
        "KERAS_HOME": str(tmp_path / "keras"),
        "TFLOOP_HOME": str(tmp_path / "home"),
        "https_proxy": proxy,
        "HTTPS_PROXY": proxy,
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [
            *TFLOOP,
            "train",
            "--data",
            str(dataset),
            "--backbone",
            "inception_v3",
            "--weights",
            "imagenet",
            *SMALL,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode != 0
    expected = tmp_path / "keras" / "models" / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert str(expected) in done.stderr and "--weights PATH" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# ---------------------------------------------------------------------------------------------------------
# precision and strategies: a run exports the same contract as a plain float32 model


def _contract(saved_model: str) -> dict[str, Any]:
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)
    contract = {}
    for name, function in loaded.signatures.items():
        inputs = {
            k: (v.dtype.name, v.shape.as_list()) for k, v in function.structured_input_signature[1].items()
        }
        outputs = {k: (v.dtype.name, v.shape.as_list()) for k, v in function.structured_outputs.items()}
        contract[name] = (inputs, outputs)
    return contract


@pytest.fixture(scope="module")
def plain_contract(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The signatures of a float32, single-device classifier of the same size and labels."""
    from export.api import export_model
    from training.models import build_model

    model = build_model("mobilenet_v2", len(LABELS), image_size=SIZE)
    base = tmp_path_factory.mktemp("plain")
    return _contract(export_model(model, base=str(base), model_name="shapes", labels=list(LABELS)).path)


@pytest.mark.slow
@pytest.mark.model
def test_weights_file_and_mixed_precision_keep_float32_outputs_and_the_export_contract(
    dataset: Path, tmp_path: Path, plain_contract: dict[str, Any]
) -> None:
    """One run checks both: it starts from a local weights file (its sha256 logged) under mixed_bfloat16."""
    from mlflow import MlflowClient

    from export.api import export_model
    from training.fit import WEIGHTS_SHA256, WEIGHTS_SHA256_TAG, train
    from training.models import backbone_of, build_model

    weights = tmp_path / "mobilenet_v2.weights.h5"
    backbone_of(build_model("mobilenet_v2", 2, image_size=SIZE, weights="none")).save_weights(weights)
    config = _config(dataset, weights=str(weights), precision="mixed_bfloat16")
    result = train(config, tracking=_tracking(tmp_path), checkpoint_dir=tmp_path / "ckpt")
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.params["weights"] == str(weights)
    assert run.data.params[WEIGHTS_SHA256] == run.data.tags[WEIGHTS_SHA256_TAG] == _sha256(weights)
    assert run.data.params["precision_used"] == result.precision == "mixed_bfloat16"
    assert run.data.params["jit_compile_used"] == "False" and result.distribution == "none"
    assert result.phases == ["head"] and "head_images_per_sec" in run.data.metrics
    source = build_model("mobilenet_v2", 2, image_size=SIZE)
    backbone_of(source).load_weights(weights)
    # The head phase keeps the backbone frozen: it must still hold the file's weights.
    for got, want in zip(
        backbone_of(result.model).get_weights(), backbone_of(source).get_weights(), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    model = result.model
    assert model.dtype_policy.name == "float32"
    assert all(variable.dtype == "float32" for variable in model.weights)
    assert str(model.predict(np.zeros((2, SIZE, SIZE, 3), np.float32), verbose=0).dtype) == "float32"
    exported = export_model(model, base=str(tmp_path / "models"), model_name="shapes", labels=result.labels)
    assert exported.verification is not None and exported.verification.images > 0
    assert _contract(exported.path) == plain_contract


WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    job = json.loads(sys.argv[1])
    import tensorflow as tf
    if job.get("logical_cpus"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * job["logical_cpus"]
        )
    from training.fit import TrainConfig, train
    from training.tracking import TrackingSettings
    result = train(
        TrainConfig(**job["config"]),
        tracking=TrackingSettings(
            tracking_uri=job["tracking_uri"], experiment="accel", artifact_root=job["artifact_root"]
        ),
        checkpoint_dir=job["checkpoint_dir"],
        verbose=0,
    )
    # Trainable weights are kept in sync across replicas; BatchNorm's moving statistics are per replica.
    checksum = float(sum(float(w.numpy().sum()) for w in result.model.trainable_weights))
    out = {**result.summary(), "checksum": checksum}
    if job.get("export_to"):
        from export.api import export_model
        out["export"] = export_model(
            result.model, base=job["export_to"], model_name="shapes", labels=result.labels
        ).path
    print(json.dumps(out))
    """
)


def _worker(job: dict[str, Any], tf_config: dict[str, Any] | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(job)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(process: subprocess.Popen[str], timeout: float = 400) -> dict[str, Any]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _job(dataset: Path, folder: Path, **config: Any) -> dict[str, Any]:
    return {
        "config": _config(dataset, **config).model_dump(mode="json"),
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "artifact_root": str(folder / "art"),
        "checkpoint_dir": str(folder / "ckpt"),
    }


@pytest.mark.slow
@pytest.mark.model
def test_mirrored_strategy_over_two_logical_cpus_exports_the_same_contract(
    dataset: Path, tmp_path: Path, plain_contract: dict[str, Any]
) -> None:
    from mlflow import MlflowClient

    job = {
        **_job(dataset, tmp_path, distribute="mirrored"),
        "logical_cpus": 2,
        "export_to": str(tmp_path / "m"),
    }
    summary = _result(_worker(job))
    assert summary["distribution"] == "mirrored" and summary["accuracy"] >= 0
    params = MlflowClient(job["tracking_uri"]).get_run(summary["run_id"]).data.params
    assert params["strategy"] == "MirroredStrategy" and params["replicas"] == "2"
    assert params["devices"] == "CPU:0,CPU:1"
    assert _contract(summary["export"]) == plain_contract


@pytest.mark.slow
@pytest.mark.model
def test_two_workers_train_one_model_and_only_the_chief_logs_and_saves(dataset: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    job = _job(dataset, tmp_path)
    workers = [
        _worker(job, {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
        for index in range(2)
    ]
    chief, other = (_result(process) for process in workers)
    assert (chief["chief"], other["chief"]) == (True, False)
    assert chief["distribution"] == other["distribution"] == "multi-worker" and chief["workers"] == 2
    # One model trained together: the same weights in both processes.
    assert chief["checksum"] == pytest.approx(other["checksum"], rel=1e-6)
    client = MlflowClient(job["tracking_uri"])
    experiment = client.get_experiment_by_name("accel")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [chief["run_id"]] and other["run_id"] == ""
    run = runs[0]
    assert run.data.params["distribution"] == "multi-worker" and run.data.params["workers"] == "2"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.keras"]
    assert "full_images_per_sec" in run.data.metrics
