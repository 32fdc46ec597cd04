"""TF Serving's gRPC API of the serving process, called with TF Serving's own stubs
(``tensorflow_serving.apis``) against a real exported tiny model: status, metadata, Predict on both
signatures (the Inception client's JPEG ``images`` included), version pinning, every error code, health,
concurrency, and REST and gRPC requests sharing one batch."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.server import build_server
from storage import versions
from tests import test_serving
from tests.conftest import free_port
from tests.test_serving import LABELS, NAME, b64, image_bytes, publish, settings_for, wait_ready

pytestmark = pytest.mark.slow

exported_model = test_serving.exported_model  # the tiny exported model (a session fixture)
BODY_LIMIT = 64 * 1024
PIXEL_LIMIT = 200 * 200


@dataclass
class Running:
    url: str
    target: str
    services: Any  # the server's own state, only to start a drain


@contextlib.contextmanager
def running_server(
    base: str, tmp_path: Path, *, ready: bool = True, **overrides: object
) -> Iterator[Running]:
    """``build_server`` (REST and gRPC in one process and event loop) in a thread on loopback."""
    settings = settings_for(
        base,
        tmp_path,
        host="127.0.0.1",
        port=free_port(),
        grpc_port=free_port(),
        log_level="warning",
        **overrides,
    )
    server = build_server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            if ready:
                wait_ready(http.get)
            else:
                deadline = time.monotonic() + 30
                while not server.started and time.monotonic() < deadline:
                    time.sleep(0.05)
        deadline = time.monotonic() + 30
        while not getattr(server, "exit_code", 0) and time.monotonic() < deadline:
            with (
                contextlib.suppress(grpc.RpcError),
                grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as ch,
            ):
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                break
            time.sleep(0.05)
        yield Running(url, f"127.0.0.1:{settings.grpc_port}", server.config.app.state.services)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, exported_model: Path) -> Iterator[Running]:
    """Versions 1 (live, by the pointer) and 2 (candidate) loaded; small body and pixel limits."""
    tmp_path = tmp_path_factory.mktemp("grpc")
    base = str(tmp_path / "models")
    publish(exported_model, base)
    publish(exported_model, base)
    versions.write_live_pointer(base, NAME, 1, promoted_by="test")
    with running_server(
        base,
        tmp_path,
        max_body_bytes=BODY_LIMIT,
        max_image_pixels=PIXEL_LIMIT,
        max_batch_size=16,
        max_batch_wait_ms=500,
        batch_workers=1,
    ) as running:
        with grpc.insecure_channel(running.target) as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            deadline = time.monotonic() + 60
            while len(status(stub).model_version_status) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        yield running


@pytest.fixture
def channel(two_versions: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(two_versions.target) as opened:
        yield opened


def status(stub: Any, **spec: Any) -> get_model_status_pb2.GetModelStatusResponse:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = spec.pop("name", NAME)
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    return stub.GetModelStatus(request, timeout=10)


def image_request(
    images: list[bytes], *, signature: str = "", key: str = "image_bytes", name: str = NAME
) -> predict_pb2.PredictRequest:
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature:
        request.model_spec.signature_name = signature
    request.inputs[key].CopyFrom(tf.make_tensor_proto(images, shape=[len(images)]))
    return request


def predict(channel: grpc.Channel, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def code_of(channel: grpc.Channel, request: predict_pb2.PredictRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        predict(channel, request)
    return raised.value.code(), raised.value.details()


def outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    import tensorflow as tf

    return {key: tf.make_ndarray(tensor) for key, tensor in response.outputs.items()}


def test_model_status_and_metadata(channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    answer = status(stub)
    assert [(s.version, s.state) for s in answer.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
    ]
    assert [s.version for s in status(stub, label="candidate").model_version_status] == [2]
    assert [s.version for s in status(stub, version=1).model_version_status] == [1]

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = NAME
    request.metadata_field.append("signature_def")
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
        request, timeout=10
    )
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert set(default.inputs) == {"image_bytes"}
    assert set(default.outputs) == {"classes", "scores", "probabilities"}
    assert signatures.signature_def["predict_images"].inputs["images"].tensor_shape.dim[1].size == 32


def test_predict_on_both_signatures(channel: grpc.Channel) -> None:
    import tensorflow as tf

    png = image_bytes(3)
    default = predict(channel, image_request([png, image_bytes(4)]))
    assert default.model_spec.name == NAME
    assert default.model_spec.version.value == 1
    assert default.model_spec.signature_name == "serving_default"
    answer = outputs(default)
    assert answer["classes"].shape == (2, 3)
    assert {label.decode() for label in answer["classes"][0]} == set(LABELS)
    assert answer["probabilities"].shape == (2, 3)
    assert np.allclose(answer["probabilities"].sum(axis=1), 1, atol=1e-5)

    # TF Serving's Inception client: predict_images with JPEG bytes in "images"
    jpeg = image_bytes(5, fmt="JPEG")
    inception = outputs(predict(channel, image_request([jpeg], signature="predict_images", key="images")))
    assert inception["classes"].shape == (1, 3)
    assert inception["scores"].dtype == np.float32
    assert list(inception["scores"][0]) == sorted(inception["scores"][0], reverse=True)

    # decoded floats go to the float signature, and agree with the image-bytes path
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)[None]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    request.model_spec.signature_name = "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels))
    floats = predict(channel, request)
    assert floats.model_spec.signature_name == "predict_images"
    assert np.allclose(outputs(floats)["probabilities"][0], answer["probabilities"][0], atol=1e-4)

    request.output_filter.append("scores")
    assert set(predict(channel, request).outputs) == {"scores"}


def test_version_pinning_by_number_and_label(channel: grpc.Channel) -> None:
    request = image_request([image_bytes(6)])
    assert predict(channel, request).model_spec.version.value == 1
    request.model_spec.version.value = 2
    assert predict(channel, request).model_spec.version.value == 2
    request.model_spec.version_label = "candidate"
    assert predict(channel, request).model_spec.version.value == 2
    request.model_spec.version_label = "live"
    assert predict(channel, request).model_spec.version.value == 1


def test_error_codes(channel: grpc.Channel) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    code, message = code_of(channel, image_request([b"not an image"]))
    assert code == invalid and "image_bytes[0]" in message and "not a supported image" in message
    code, message = code_of(channel, image_request([image_bytes(1)], key="pictures"))
    assert code == invalid and "image_bytes" in message
    code, message = code_of(channel, image_request([image_bytes(1)], signature="nope"))
    assert code == invalid and "nope" in message
    truncated = image_bytes(2, fmt="JPEG")[:200]
    assert code_of(channel, image_request([truncated]))[0] == invalid

    code, message = code_of(channel, image_request([image_bytes(1)], name="other"))
    assert code == grpc.StatusCode.NOT_FOUND and "other" in message
    pinned = image_request([image_bytes(1)])
    pinned.model_spec.version.value = 7
    code, message = code_of(channel, pinned)
    assert code == grpc.StatusCode.NOT_FOUND and "7" in message
    pinned.model_spec.version_label = "stable"
    assert code_of(channel, pinned)[0] == grpc.StatusCode.NOT_FOUND

    noise = np.random.default_rng(0).integers(0, 255, BODY_LIMIT, dtype=np.uint8).tobytes()
    assert code_of(channel, image_request([noise]))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    buffer = io.BytesIO()
    Image.new("RGB", (400, 400)).save(buffer, format="PNG")  # 160000 pixels, a few hundred bytes
    code, message = code_of(channel, image_request([buffer.getvalue()]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pixels" in message

    # the server lives on
    assert predict(channel, image_request([image_bytes(8)])).model_spec.version.value == 1


def test_classify_maps_tf_examples_with_image_bytes(channel: grpc.Channel) -> None:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = NAME
    for seed in (1, 2):
        example = request.input.example_list.examples.add()
        example.features.feature["image_bytes"].bytes_list.value.append(image_bytes(seed))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Classify(request, timeout=30)
    assert response.model_spec.version.value == 1
    assert len(response.result.classifications) == 2
    assert {c.label for c in response.result.classifications[0].classes} == set(LABELS)
    del request.input.example_list.examples[1].features.feature["image_bytes"]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_32_concurrent_callers_and_per_protocol_metrics(two_versions: Running, channel: grpc.Channel) -> None:
    def call(seed: int) -> int:
        return predict(channel, image_request([image_bytes(seed)])).model_spec.version.value

    with ThreadPoolExecutor(32) as pool:
        answered = list(pool.map(call, range(64)))
    assert answered == [1] * 64
    metrics = httpx.get(f"{two_versions.url}/metrics", timeout=10).text
    count = re.search(
        r'tfloop_requests_total\{method="POST",protocol="grpc",'
        r'route="/tensorflow.serving.PredictionService/Predict",status="OK"\} (\S+)',
        metrics,
    )
    assert count is not None and float(count.group(1)) >= 64, metrics[:2000]
    assert 'protocol="rest"' in metrics


def test_rest_and_grpc_requests_share_a_batch(two_versions: Running, channel: grpc.Channel) -> None:
    """4 REST and 4 gRPC one-image requests at once: a batch of more than 4 images held both kinds."""

    def histogram() -> dict[str, float]:
        text = httpx.get(f"{two_versions.url}/metrics", timeout=10).text
        return {le: float(v) for le, v in re.findall(r'tfloop_batch_size_bucket\{le="([^"]+)"\} (\S+)', text)}

    before = histogram()
    barrier = threading.Barrier(8)

    def rest(seed: int) -> int:
        body = {"instances": [b64(image_bytes(seed))]}
        barrier.wait()
        return httpx.post(f"{two_versions.url}/v1/models/{NAME}:predict", json=body, timeout=30).status_code

    def over_grpc(seed: int) -> int:
        request = image_request([image_bytes(seed)])
        barrier.wait()
        return predict(channel, request).model_spec.version.value

    with ThreadPoolExecutor(8) as pool:
        rests = [pool.submit(rest, seed) for seed in range(4)]
        grpcs = [pool.submit(over_grpc, seed) for seed in range(4, 8)]
        assert [f.result() for f in rests] == [200] * 4
        assert [f.result() for f in grpcs] == [1] * 4
    after = histogram()
    batches = after["+Inf"] - before["+Inf"]
    at_most_four = after["4.0"] - before["4.0"]
    assert batches >= 1
    assert at_most_four < batches, f"no batch held more than 4 images: {before} -> {after}"


def test_health_follows_drain(two_versions: Running) -> None:
    with grpc.insecure_channel(two_versions.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        service = health_pb2.HealthCheckRequest(service="tensorflow.serving.PredictionService")
        assert stub.Check(service, timeout=5).status == serving
        two_versions.services.drain()  # what the first SIGTERM does
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert answer == health_pb2.HealthCheckResponse.NOT_SERVING
            assert predict(ch, image_request([image_bytes(9)])).model_spec.version.value == 1  # still served
        finally:
            two_versions.services.draining = False


def test_not_loaded_is_unavailable(tmp_path: Path) -> None:
    with (
        running_server(str(tmp_path / "empty"), tmp_path, ready=False) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        code, message = code_of(ch, image_request([image_bytes(1)]))
        assert code == grpc.StatusCode.UNAVAILABLE and "no version loaded" in message
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_module_process_drains_grpc_on_sigterm(tmp_path: Path, exported_model: Path) -> None:
    """``python -m serving`` with TFLOOP_SERVE_GRPC_PORT: on SIGTERM health turns NOT_SERVING while calls
    are still answered, then the process exits 0; a second process on the same gRPC port exits 1."""
    base = str(tmp_path / "models")
    publish(exported_model, base)
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFLOOP_SERVE_")}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        TFLOOP_SERVE_MODEL_BASE=base,
        TFLOOP_SERVE_MODEL_NAME=NAME,
        TFLOOP_SERVE_FEEDBACK_URI=str(tmp_path / "feedback"),
        TFLOOP_SERVE_CACHE_DIR=str(tmp_path / "cache"),
        TFLOOP_SERVE_HOST="127.0.0.1",
        TFLOOP_SERVE_PORT=str(port),
        TFLOOP_SERVE_GRPC_PORT=str(grpc_port),
        TFLOOP_SERVE_DRAIN_S="3",
    )
    process = test_serving.start_process([sys.executable, "-m", "serving"], env, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            clash = subprocess.run(
                [sys.executable, "-m", "serving"],
                env={**env, "TFLOOP_SERVE_PORT": str(free_port())},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert clash.returncode == 1
            assert "gRPC" in clash.stderr and "--grpc-port" in clash.stderr, clash.stderr[-2000:]
            assert "Traceback" not in clash.stderr

            process.send_signal(signal.SIGTERM)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert answer == health_pb2.HealthCheckResponse.NOT_SERVING
            assert predict(ch, image_request([image_bytes(1)])).model_spec.version.value == 1
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_reflection_lists_tf_serving_services(channel: grpc.Channel) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    assert {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
    } <= set(database.get_services())
    service = DescriptorPool(database).FindServiceByName("tensorflow.serving.PredictionService")
    assert {"Predict", "Classify", "GetModelMetadata"} <= {method.name for method in service.methods}


def test_the_rollout_smoke_test_speaks_grpc(two_versions: Running) -> None:
    # What `tfloop deploy --smoke-grpc` runs after a rollout, against the real server: the candidate is
    # asked on its pinned version, the live one unpinned; a version that is not served fails with the reason.
    from k8s.smoke import grpc_smoke_test

    candidate = grpc_smoke_test(target=two_versions.target, model_name=NAME, expected_version=2)
    assert candidate.ok and candidate.reported_versions == ["2"] and "gRPC" in candidate.message
    live = grpc_smoke_test(target=two_versions.target, model_name=NAME, expected_version=1, pinned=False)
    assert live.ok, live.message
    not_live = grpc_smoke_test(target=two_versions.target, model_name=NAME, expected_version=2, pinned=False)
    assert not not_live.ok and "answered by version 1" in not_live.message
    missing = grpc_smoke_test(target=two_versions.target, model_name=NAME, expected_version=7)
    assert not missing.ok and "NOT_FOUND" in missing.message
    unreachable = grpc_smoke_test(
        target=f"127.0.0.1:{free_port()}", model_name=NAME, expected_version=1, timeout_s=2
    )
    assert not unreachable.ok and "UNAVAILABLE" in unreachable.message
