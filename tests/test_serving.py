"""API tests of the serving process against a real exported tiny model: TF Serving REST formats, /classify,
/feedback (local and GCS), version pinning, hot swap under load, bad input, concurrency with restarts,
the upload page in headless Chromium, and a schemathesis run over /openapi.json."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import storage
from serving.app import create_app
from serving.settings import ServingSettings
from tests.conftest import free_port
from tests.tools import missing_tool

pytestmark = pytest.mark.slow

NAME = "tiny"
LABELS = ["cat", "dog", "fish"]
REPO = Path(__file__).resolve().parents[1]


def image_bytes(seed: int, fmt: str = "PNG", size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Keras classifier (32 px, 3 labels) exported by export.savedmodel."""
    import keras

    from export.savedmodel import export_saved_model

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    target = tmp_path_factory.mktemp("export") / "model"
    export_saved_model(keras.Model(inputs, outputs), target, labels=LABELS, model_name=NAME)
    return target


def publish(exported: Path, base: str) -> int:
    from export.publish import publish_version

    return publish_version(exported, base=base, model_name=NAME).version


def publish_broken(base: str, version: int) -> None:
    """A version folder that looks complete but holds no loadable SavedModel."""
    target = storage.join(base, NAME, str(version))
    storage.write_text(storage.join(target, "tfloop.json"), json.dumps({"labels": LABELS}))
    storage.write_bytes(storage.join(target, "saved_model.pb"), b"not a protobuf")


@pytest.fixture
def model_base(tmp_path: Path, exported_model: Path) -> str:
    base = str(tmp_path / "models")
    publish(exported_model, base)
    return base


def settings_for(base: str, tmp_path: Path, **overrides: object) -> ServingSettings:
    values: dict[str, object] = {
        "model_base": base,
        "model_name": NAME,
        "feedback_uri": str(tmp_path / "feedback"),
        "cache_dir": tmp_path / "cache",
        "poll_interval_s": 0.2,
        "max_batch_size": 8,
        "max_batch_wait_ms": 5,
        **overrides,
    }
    return ServingSettings(**values)


def wait_ready(get: object, *, version: int | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = get("/readyz")  # type: ignore[operator]
            if response.status_code == 200 and (
                version is None or response.json()["model_version"] == version
            ):
                return response.json()
        time.sleep(0.1)
    raise AssertionError(f"server not ready (version {version}) within {timeout}s")


@contextlib.contextmanager
def client(settings: ServingSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        wait_ready(test_client.get)
        yield test_client


@contextlib.contextmanager
def thread_server(settings: ServingSettings) -> Iterator[str]:
    """The app under a real uvicorn server on loopback, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            wait_ready(http.get)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def direct_probabilities(exported: Path, images: list[bytes]) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported))
    return loaded.signatures["serving_default"](image_bytes=tf.constant(images))["probabilities"].numpy()


# --- TF Serving REST ------------------------------------------------------------------------------


def test_tf_serving_status_and_metadata(model_base: str, tmp_path: Path) -> None:
    with client(settings_for(model_base, tmp_path)) as api:
        expected = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        assert api.get(f"/v1/models/{NAME}").json() == {"model_version_status": [expected]}
        assert api.get(f"/v1/models/{NAME}/versions/1").json() == {"model_version_status": [expected]}
        for path in (f"/v1/models/{NAME}/metadata", f"/v1/models/{NAME}/versions/1/metadata"):
            body = api.get(path).json()
            assert body["model_spec"] == {"name": NAME, "signature_name": "", "version": "1"}
            signatures = body["metadata"]["signature_def"]["signature_def"]
            default = signatures["serving_default"]
            assert default["method_name"] == "tensorflow/serving/predict"
            assert default["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
            assert set(default["outputs"]) == {"classes", "scores", "probabilities"}
            assert signatures["predict_images"]["inputs"]["images"]["tensor_shape"]["dim"][1] == {
                "size": "32"
            }
        for path in (
            "/v1/models/other",
            f"/v1/models/{NAME}/versions/9",
            f"/v1/models/{NAME}/versions/9/metadata",
        ):
            response = api.get(path)
            assert response.status_code == 404 and "Servable not found" in response.json()["error"]


def test_tf_serving_predict_row_and_columnar(model_base: str, tmp_path: Path, exported_model: Path) -> None:
    images = [image_bytes(i) for i in range(3)] + [image_bytes(9, "JPEG")]
    expected = direct_probabilities(exported_model, images)
    with client(settings_for(model_base, tmp_path)) as api:
        row = api.post(f"/v1/models/{NAME}:predict", json={"instances": [b64(i) for i in images]})
        assert row.status_code == 200, row.text
        predictions = row.json()["predictions"]
        assert np.allclose([p["probabilities"] for p in predictions], expected, atol=1e-5)
        for prediction, probabilities in zip(predictions, expected, strict=True):
            assert prediction["classes"][0] == LABELS[int(np.argmax(probabilities))]
            assert prediction["scores"] == sorted(prediction["scores"], reverse=True)

        named = api.post(
            f"/v1/models/{NAME}/versions/1:predict",
            json={"signature_name": "serving_default", "instances": [{"image_bytes": b64(images[0])}]},
        )
        assert np.allclose(named.json()["predictions"][0]["probabilities"], expected[0], atol=1e-5)

        columnar = api.post(
            f"/v1/models/{NAME}:predict", json={"inputs": {"image_bytes": [b64(i) for i in images]}}
        )
        outputs = columnar.json()["outputs"]
        assert np.allclose(outputs["probabilities"], expected, atol=1e-5)
        assert len(outputs["classes"]) == 4 and len(outputs["classes"][0]) == 3

        pixels = np.asarray(Image.open(io.BytesIO(images[0])), dtype=np.float32)[None].tolist()
        arrays = api.post(
            f"/v1/models/{NAME}:predict", json={"signature_name": "predict_images", "inputs": pixels}
        )
        assert np.allclose(arrays.json()["outputs"]["probabilities"][0], expected[0], atol=1e-4)


def test_predict_lane_answers_like_the_declared_routes(model_base: str, tmp_path: Path) -> None:
    # The predict routes are answered ahead of FastAPI's router: still documented, still counted per route
    # template, and the body is read as JSON whatever content type the client sends (as TF Serving does).
    # A body of declared size skips the middleware stack; a chunked one takes it, with the same answer.
    body = json.dumps({"instances": [b64(image_bytes(3))]})
    with client(settings_for(model_base, tmp_path)) as api:
        plain = api.post(f"/v1/models/{NAME}:predict", content=body, headers={"content-type": "text/plain"})
        assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
        assert plain.json()["predictions"][0]["classes"][0] in LABELS
        assert plain.headers["X-Model-Version"] == "1"
        chunked = api.post(f"/v1/models/{NAME}:predict", content=iter([body[:9].encode(), body[9:].encode()]))
        assert chunked.status_code == 200 and chunked.json() == plain.json()
        assert chunked.headers["X-Model-Version"] == "1"
        pinned = api.post(f"/v1/models/{NAME}/versions/1:predict", content=body)
        assert pinned.json() == plain.json()
        assert api.post(f"/v1/models/{NAME}/versions/x:predict", content=body).status_code == 400
        for bad in (b'{"instances": [1], "signature_name": 7}', b'{"instances": {"b64": "AA=="}}', b"\xff"):
            refused = api.post(f"/v1/models/{NAME}:predict", content=bad)
            assert refused.status_code == 400 and list(refused.json()) == ["error"], bad
        paths = api.get("/openapi.json").json()["paths"]
        assert (
            "/v1/models/{name}:predict" in paths and "/v1/models/{name}/versions/{version}:predict" in paths
        )
        metrics = api.get("/metrics").text
        assert 'route="/v1/models/{name}:predict",status="200"} 2.0' in metrics
        assert 'route="/v1/models/{name}/versions/{version}:predict",status="200"} 1.0' in metrics
        assert 'route="/v1/models/{name}:predict",status="400"} 3.0' in metrics
        latest = 'protocol="rest",route="/v1/models/{name}:predict"'
        assert f'tfloop_request_latency_seconds_count{{method="POST",{latest}}} 5.0' in metrics


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"instances": [{"b64": "%%%"}]}, 400, "base64"),
        ({"instances": [b64(b"not an image at all")]}, 400, "image_bytes[0]"),
        ({"instances": [b64(image_bytes(1)[:80])]}, 400, "truncated"),
        ({"signature_name": "nope", "instances": [b64(b"x")]}, 400, "known signatures"),
        ({"instances": []}, 400, "non-empty"),
        ({"signature_name": "predict_images", "instances": [[1, 2, 3]]}, 400, "expected shape"),
        ({"inputs": 5, "instances": [1]}, 400, "exactly one"),
        ({"instances": [b64(image_bytes(1))] * 65}, 413, "instances"),
    ],
)
def test_tf_serving_errors_use_its_error_shape(
    model_base: str, tmp_path: Path, body: dict, status: int, fragment: str
) -> None:
    with client(settings_for(model_base, tmp_path)) as api:
        response = api.post(f"/v1/models/{NAME}:predict", json=body)
        assert response.status_code == status
        assert list(response.json()) == ["error"] and fragment in response.json()["error"]


def test_one_bad_image_in_a_batch_fails_alone(model_base: str, tmp_path: Path) -> None:
    # A 1-bit BMP passes Pillow's validation but TensorFlow's decoder refuses it, so the batched model call
    # raises; the batcher retries item by item and only that request fails (400), its batch mates succeed.
    one_bit = io.BytesIO()
    Image.new("1", (16, 16)).save(one_bit, format="BMP")
    good = [image_bytes(i) for i in range(6)]
    with client(settings_for(model_base, tmp_path, max_batch_wait_ms=100)) as api:

        def post(data: bytes) -> int:
            return api.post(f"/v1/models/{NAME}:predict", json={"instances": [b64(data)]}).status_code

        with ThreadPool(8) as pool:
            statuses = pool.map(post, [*good, one_bit.getvalue(), *good])
        assert statuses.count(200) == 12 and statuses[6] == 400
        metrics = api.get("/metrics").text
        assert "tfloop_predict_errors_total 1.0" in metrics
        batches = float(metrics.split("tfloop_batch_size_count ")[1].split()[0])
        assert batches < 13 + 3  # coalesced: fewer model calls than requests plus retries


def test_truncated_image_in_a_batch_is_found_by_the_screen(model_base: str, tmp_path: Path) -> None:
    # The hot path checks only the header; the model refuses the truncated JPEG, Pillow's full decode finds
    # it, and its batch mates run again together instead of one model call each.
    truncated = image_bytes(99, fmt="JPEG")[:-200]
    good = [image_bytes(i) for i in range(6)]
    with client(settings_for(model_base, tmp_path, max_batch_wait_ms=200, batch_workers=1)) as api:

        def post(data: bytes) -> httpx.Response:
            return api.post(f"/v1/models/{NAME}:predict", json={"instances": [b64(data)]})

        with ThreadPool(7) as pool:
            responses = pool.map(post, [*good[:3], truncated, *good[3:]])
        assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 200, 200]
        error = responses[3].json()["error"]
        assert error.startswith("image_bytes[0]: ") and "truncated" in error
        batches = float(api.get("/metrics").text.split("tfloop_batch_size_count ")[1].split()[0])
        assert batches <= 5  # warmup-free count: the failed batch and its rerun, not 7 single calls


class ThreadPool:
    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(workers)

    def __enter__(self) -> ThreadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown()

    def map(self, fn, items) -> list:
        return list(self._pool.map(fn, items))


# --- classify, feedback ---------------------------------------------------------------------------


def test_classify_then_feedback(model_base: str, tmp_path: Path, exported_model: Path) -> None:
    data = image_bytes(5, "JPEG")
    expected = direct_probabilities(exported_model, [data])[0]
    with client(settings_for(model_base, tmp_path)) as api:
        answer = api.post("/classify", files={"file": ("cat.jpg", data, "application/octet-stream")})
        result = answer.json()
        assert result["model_name"] == NAME and result["model_version"] == 1
        assert answer.headers["X-Model-Version"] == "1"
        assert [t["label"] for t in result["top_k"]] == [LABELS[i] for i in np.argsort(-expected)]
        assert np.allclose([t["score"] for t in result["top_k"]], np.sort(expected)[::-1], atol=1e-5)

        wrong = api.post("/feedback", data={"label": "cow", "prediction_id": result["prediction_id"]})
        assert wrong.status_code == 400 and "cat, dog, fish" in wrong.json()["error"]
        accepted = api.post(
            "/feedback", data={"label": "fish", "prediction_id": result["prediction_id"], "note": "it swims"}
        )
        assert accepted.status_code == 202, accepted.text
        # The id alone works on the replica that classified the image (it keeps recent images); any replica
        # takes the id with the image (tests/test_serving_replicas.py).
        again = api.post("/feedback", data={"label": "fish", "prediction_id": result["prediction_id"]})
        assert again.json()["duplicate"] and again.json()["feedback_id"] == accepted.json()["feedback_id"]
        uploaded = api.post(
            "/feedback", data={"label": "dog"}, files={"file": ("x.png", image_bytes(6), "image/png")}
        )
        assert uploaded.status_code == 202 and not uploaded.json()["duplicate"]

        assert api.post("/feedback", data={"label": "dog"}).status_code == 400
        unknown = api.post("/feedback", data={"label": "dog", "prediction_id": "0" * 32})
        assert unknown.status_code == 400 and "'file'" in unknown.json()["error"]

        assert api.get("/docs").status_code == 200 and "tfloop classifier" in api.get("/").text
        assert api.get("/info").json()["labels"] == LABELS
        stats = api.get("/feedback/stats").json()
        assert stats["total"] == 2 and stats["labels"]["fish"]["pending"] == 1
        metrics = api.get("/metrics").text
        assert 'tfloop_feedback_total{result="accepted"} 2.0' in metrics
        assert 'tfloop_feedback_total{result="refused"} 3.0' in metrics
        assert 'tfloop_model_version_loaded{model="tiny"} 1.0' in metrics
        assert 'route="/classify",status="200"' in metrics and "tfloop_batch_size_bucket" in metrics

    sha = hashlib.sha256(data).hexdigest()
    record = json.loads(
        (tmp_path / "feedback" / "records" / f"{accepted.json()['feedback_id']}.json").read_text()
    )
    assert (tmp_path / "feedback" / "pending" / "fish" / f"{sha}.jpg").read_bytes() == data
    assert record["note"] == "it swims" and record["predicted"][0]["label"] == result["top_k"][0]["label"]
    assert record["model_version"] == 1 and record["prediction_id"] == result["prediction_id"]
    assert record["model_name"] == NAME and record["predicted_at"]


def test_token_guards_feedback_and_new_labels(model_base: str, tmp_path: Path) -> None:
    settings = settings_for(model_base, tmp_path, token="s3cret", allow_new_labels=True)
    with client(settings) as api:
        files = {"file": ("x.png", image_bytes(1), "image/png")}
        assert api.post("/feedback", data={"label": "dog"}, files=files).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert api.post("/feedback", data={"label": "dog"}, files=files, headers=wrong).status_code == 401
        assert api.get("/feedback/stats").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        new = api.post("/feedback", data={"label": "cow"}, files=files, headers=good)
        assert new.status_code == 202 and new.json()["label"] == "cow"
        bad = api.post("/feedback", data={"label": "../../etc"}, files=files, headers=good)
        assert bad.status_code == 400
    assert [p.name for p in (tmp_path / "feedback" / "pending").iterdir()] == ["cow"]


def test_feedback_emits_prefect_event_and_survives_outage(model_base: str, tmp_path: Path) -> None:
    from http.server import ThreadingHTTPServer

    from tests.test_serving_units import _Receiver  # a loopback HTTP receiver

    receiver = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    _Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_port}/api"
        with client(settings_for(model_base, tmp_path, prefect_api_url=url)) as api:
            files = {"file": ("x.png", image_bytes(3), "image/png")}
            assert api.post("/feedback", data={"label": "cat"}, files=files).status_code == 202
            deadline = time.monotonic() + 5
            while not _Receiver.received and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        receiver.shutdown()
        receiver.server_close()
    ((path, events),) = _Receiver.received
    assert path == "/api/events"
    assert events[0]["event"] == "tfloop.feedback.received"
    assert events[0]["resource"] == {
        "prefect.resource.id": f"tfloop.model.{NAME}",
        "tfloop.label": "cat",
        "tfloop.model": NAME,
    }

    # A Prefect API that takes connections and never answers: the post is answered while its event is still
    # pending (neither sent nor failed yet); the event fails once that API goes away.
    import socket

    hung = socket.create_server(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{hung.getsockname()[1]}/api"
    settings = settings_for(model_base, tmp_path / "second", prefect_api_url=dead, event_timeout_s=60)
    with client(settings) as api:
        files = {"file": ("x.png", image_bytes(4), "image/png")}
        assert api.post("/feedback", data={"label": "dog"}, files=files).status_code == 202
        assert "tfloop_prefect_events_total{" not in api.get("/metrics").text
        hung.close()  # the connection waiting in its backlog is reset
        deadline = time.monotonic() + 30
        while 'tfloop_prefect_events_total{result="failed"} 1.0' not in api.get("/metrics").text:
            assert time.monotonic() < deadline, "the failed event was not counted"
            time.sleep(0.1)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_4xx_and_the_server_lives(model_base: str, tmp_path: Path) -> None:
    bomb = io.BytesIO()
    Image.new("1", (6000, 6000)).save(bomb, format="PNG")
    settings = settings_for(model_base, tmp_path, max_body_bytes=2_000_000, max_image_pixels=4_000_000)
    with client(settings) as api:
        cases = [
            (api.post("/classify", files={"file": ("a.png", b"GIF89a-nope", "image/png")}), 400),
            (api.post("/classify", files={"file": ("a.txt", b"plain text", "image/png")}), 400),
            (api.post("/classify", files={"file": ("a.png", image_bytes(1)[:100], "image/png")}), 400),
            (api.post("/classify", files={"file": ("b.png", bomb.getvalue(), "image/png")}), 413),
            (api.post("/classify", files={"file": ("c.png", b"\0" * 3_000_000, "image/png")}), 413),
            (
                api.post(
                    "/classify",
                    content=b"--x\r\nbroken",
                    headers={"content-type": "multipart/form-data; boundary=x"},
                ),
                400,
            ),
            (api.post("/classify"), 400),
            (api.post(f"/v1/models/{NAME}:predict", content=b"{not json"), 400),
            (api.post(f"/v1/models/{NAME}:predict", json=[1, 2]), 400),
            (api.get("/nowhere"), 404),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert "error" in response.json()
        assert api.get("/healthz").json() == {"status": "ok"}
        assert api.post("/classify", files={"file": ("ok.png", image_bytes(2), "x/y")}).status_code == 200


def test_oversized_upload_is_answered_413_to_a_client_that_writes_before_it_reads(
    model_base: str, tmp_path: Path
) -> None:
    # urllib and requests send "Connection: close" and write the whole body before reading: a server that
    # answers 413 and closes while the body is still arriving resets their connection instead. A body up to
    # the discard bound is read and dropped first; one declared beyond it (or stalled) is answered at once.
    import http.client
    import socket
    import urllib.error
    import urllib.request

    limit = 1024 * 1024
    settings = settings_for(
        model_base, tmp_path, max_body_bytes=limit, max_discard_bytes=64 * limit, max_discard_s=1.0
    )
    error = {"error": f"the request body is over the limit of {limit} bytes"}
    body = b"\0" * (24 * limit)  # more than loopback's socket buffers hold while the server is not reading
    with thread_server(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        for path in ("/classify", "/feedback", f"/v1/models/{NAME}:predict"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request(
                "POST", path, body=body, headers={"Content-Type": "image/png", "Connection": "close"}
            )
            response = connection.getresponse()
            assert (response.status, json.loads(response.read())) == (413, error), path
            connection.close()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url + path, data=body), timeout=30)
            assert (refused.value.code, json.loads(refused.value.read())) == (413, error), path

        def answer_to(head: bytes, sent: bytes) -> bytes:
            """What the server answers to ``head`` and the start of a body, read before sending the rest."""
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                raw.sendall(head + sent)
                received = b""
                while chunk := raw.recv(65536):
                    received += chunk
                return received

        # Declared beyond the discard bound: answered without waiting for the body.
        beyond = answer_to(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n", b"")
        assert beyond.startswith(b"HTTP/1.1 413 ") and json.loads(beyond.split(b"\r\n\r\n", 1)[1]) == error
        # Within the bound but the client stops sending: answered when max_discard_s is over.
        started = time.monotonic()
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * limit}\r\n\r\n".encode()
        stalled = answer_to(head, b"\0" * limit)
        assert stalled.startswith(b"HTTP/1.1 413 ") and time.monotonic() - started < 20
        with httpx.Client(base_url=url) as http:
            assert http.get("/healthz").status_code == 200


# --- versions -------------------------------------------------------------------------------------


def test_version_pinning(model_base: str, tmp_path: Path, exported_model: Path) -> None:
    assert publish(exported_model, model_base) == 2
    with client(settings_for(model_base, tmp_path, version_policy=1)) as api:
        time.sleep(0.5)  # several polls: a pinned server must not move
        assert api.get("/readyz").json()["model_version"] == 1
        assert api.get(f"/v1/models/{NAME}/versions/2").status_code == 404
        assert (
            api.post(
                f"/v1/models/{NAME}/versions/2:predict", json={"instances": [b64(image_bytes(1))]}
            ).status_code
            == 404
        )
    with client(settings_for(model_base, tmp_path, version_policy="latest")) as api:
        assert api.get("/readyz").json()["model_version"] == 2
    with TestClient(create_app(settings_for(model_base, tmp_path, version_policy=7))) as api:
        time.sleep(0.5)
        status = api.get("/readyz")
        assert status.status_code == 503 and "pinned version 7" in status.json()["error"]


def test_live_pointer_rollback_and_a_broken_candidate(
    model_base: str, tmp_path: Path, exported_model: Path
) -> None:
    from storage import versions

    assert publish(exported_model, model_base) == 2
    versions.write_live_pointer(model_base, NAME, 1, promoted_by="test")
    body = {"instances": [b64(image_bytes(1))]}

    def answered(route: str = "") -> int | None:
        response = api.post(f"/v1/models/{NAME}{route}:predict", json=body)
        return int(response.headers["X-Model-Version"]) if response.status_code == 200 else None

    def settle(condition: object, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    with client(settings_for(model_base, tmp_path, retry_failed_after_s=3600)) as api:
        settle(lambda: answered("/labels/candidate") == 2, "candidate 2 loads")
        assert answered() == 1 and api.get("/info").json()["candidate_version"] == 2
        versions.write_live_pointer(model_base, NAME, 2, promoted_by="test")
        settle(lambda: answered() == 2, "promotion to 2")
        assert answered("/versions/1") is None and answered("/labels/candidate") is None
        versions.write_live_pointer(model_base, NAME, 1, promoted_by="test")  # roll back: 1 loads again
        settle(lambda: answered() == 1, "rollback to 1")
        assert answered("/labels/candidate") == 2 and answered("/labels/live") == 1
        publish_broken(model_base, 3)  # the newest is the candidate now, and it cannot load
        settle(lambda: answered("/labels/candidate") is None, "broken candidate 3 replaces 2")
        assert answered() == 1
        status = api.get(f"/v1/models/{NAME}").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("1", "AVAILABLE"), ("3", "END")]
        assert "failed to load" in status[1]["status"]["error_message"]
        assert api.get(f"/v1/models/{NAME}/versions/3").json()["model_version_status"][0]["state"] == "END"


def test_hot_swap_under_load_and_broken_version(
    model_base: str, tmp_path: Path, exported_model: Path
) -> None:
    settings = settings_for(model_base, tmp_path, poll_interval_s=0.2, retry_failed_after_s=3600)
    outcomes: list[tuple[int, int | None]] = []
    stop = threading.Event()
    with thread_server(settings) as url:

        def hammer(seed: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    response = http.post(
                        "/classify", files={"file": ("x.png", image_bytes(seed), "image/png")}
                    )
                    version = response.json().get("model_version") if response.status_code == 200 else None
                    outcomes.append((response.status_code, version))

        workers = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(1)
            assert publish(exported_model, model_base) == 2
            with httpx.Client(base_url=url) as http:
                wait_ready(http.get, version=2, timeout=30)
                time.sleep(0.5)
                publish_broken(model_base, 3)
                time.sleep(1.5)
                assert http.get("/readyz").json()["model_version"] == 2
                assert (
                    'tfloop_model_loads_total{model="tiny",result="failed"} 1.0' in http.get("/metrics").text
                )
                assert publish(exported_model, model_base) == 4
                wait_ready(http.get, version=4, timeout=30)
                time.sleep(0.3)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
    statuses = {status for status, _ in outcomes}
    assert statuses == {200}, f"requests failed during the swap: {statuses}"
    versions_seen = [version for _, version in outcomes]
    assert {1, 2, 4} <= set(versions_seen) and 3 not in versions_seen
    assert len(outcomes) > 30


def test_gcs_model_base_and_feedback_queue(gcs_bucket: str, tmp_path: Path, exported_model: Path) -> None:
    base = f"{gcs_bucket}/models"
    publish(exported_model, base)
    settings = settings_for(base, tmp_path, feedback_uri=f"{gcs_bucket}/feedback", token="gcs-token")
    auth = {"Authorization": "Bearer gcs-token"}  # a gs:// queue is production mode: the token is required
    with client(settings) as api:
        data = image_bytes(11)
        result = api.post("/classify", files={"file": ("x.png", data, "image/png")}).json()
        assert result["model_version"] == 1
        form = {"label": "dog", "prediction_id": result["prediction_id"]}
        assert api.post("/feedback", data=form).status_code == 401
        response = api.post("/feedback", data=form, headers=auth)
        assert response.status_code == 202
        stats = api.get("/feedback/stats", headers=auth).json()
        assert stats["labels"] == {"dog": {"pending": 1, "consumed": 0}} and stats["quarantined"] == 0
    sha = hashlib.sha256(data).hexdigest()
    assert storage.read_bytes(f"{gcs_bucket}/feedback/pending/dog/{sha}.png") == data
    assert (tmp_path / "cache" / NAME / "1" / "saved_model.pb").is_file()


# --- a real process: concurrency, durability across restarts --------------------------------------


def start_process(args: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            wait_ready(http.get, timeout=120)
    except AssertionError:
        process.kill()
        raise AssertionError(process.communicate()[1].decode()[-3000:]) from None
    return process


def test_hundreds_of_parallel_feedback_posts_survive_a_crash(model_base: str, tmp_path: Path) -> None:
    """`tfloop serve` in its own process takes 300 parallel posts and is killed (SIGKILL) in the middle of
    the burst, once 100 answers arrived and while others are in flight. A restarted server finds every item
    that was answered 202; the unanswered ones may be absent or present, but nothing is half-written: every
    record parses and names its image, every image's sha256 is its name."""
    port = free_port()
    feedback = tmp_path / "feedback"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFLOOP_SERVE_")}
    env["TFLOOP_HOME"] = str(tmp_path / "home")
    args = [
        str(Path(sys.executable).parent / "tfloop"),
        "serve",
        "--model-base",
        model_base,
        "--model-name",
        NAME,
        "--feedback",
        str(feedback),
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--host",
        "127.0.0.1",
    ]
    process = start_process(args, env, port)
    count, kill_after = 300, 100
    images = [image_bytes(1000 + i, size=8 + i % 24) for i in range(count)]
    try:

        async def post_and_kill() -> list[httpx.Response | BaseException]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
            ) as http:
                tasks = [
                    asyncio.create_task(
                        http.post(
                            "/feedback",
                            data={"label": LABELS[i % 3]},
                            files={"file": (f"{i}.png", images[i], "image/png")},
                        )
                    )
                    for i in range(count)
                ]
                for arrived, done in enumerate(asyncio.as_completed(tasks), start=1):
                    with contextlib.suppress(httpx.HTTPError):
                        await done
                    if arrived == kill_after:
                        process.send_signal(signal.SIGKILL)  # no graceful shutdown
                        break
                return await asyncio.gather(*tasks, return_exceptions=True)

        outcomes = asyncio.run(post_and_kill())
    finally:
        process.kill()
        process.wait()
    answered = {
        i: outcome.json()["feedback_id"]
        for i, outcome in enumerate(outcomes)
        if isinstance(outcome, httpx.Response) and outcome.status_code == 202
    }
    assert all(
        isinstance(outcome, httpx.TransportError)
        or (isinstance(outcome, httpx.Response) and outcome.status_code == 202)
        for outcome in outcomes
    ), {type(o).__name__ for o in outcomes}
    assert kill_after <= len(answered) < count, "the kill must land in the middle of the burst"

    with client(settings_for(model_base, tmp_path)) as api:  # the restarted server, same queue root
        stats = api.get("/feedback/stats").json()
    records = {
        path.stem: json.loads(path.read_text()) for path in (feedback / "records").glob("*.json")
    }  # every record that is there parses
    for i, feedback_id in answered.items():
        record = records[feedback_id]
        assert (feedback / record["image"]).read_bytes() == images[i] and record["label"] == LABELS[i % 3]
    for record in records.values():
        image = (feedback / record["image"]).read_bytes()
        assert hashlib.sha256(image).hexdigest() == record["image_sha256"]
    pending = storage.list_files(str(feedback / "pending"))
    for name in pending:  # what the queue lists is whole: each image's sha256 is its name
        data = (feedback / "pending" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == Path(name).name.split(".")[0], name
    assert stats["total"] == len(records) >= len(answered)
    assert stats["pending"] == len(pending) >= len(answered)


# --- the page in headless Chromium ----------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def test_upload_page_in_chromium(model_base: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        missing_tool(
            CHROMIUM,
            why="the upload page cannot be tested in a browser",
            how="install it with `apt-get install chromium` (make system-deps)",
        )
    from playwright.sync_api import sync_playwright

    picture = tmp_path / "upload.png"
    picture.write_bytes(image_bytes(21))
    with thread_server(settings_for(model_base, tmp_path)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("text=version 1")
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#results .row")
            rows = page.locator("#results .row")
            assert rows.count() == 3
            widths = [
                float(w.rstrip("%"))
                for w in rows.locator(".bar").evaluate_all("els => els.map(e => e.style.width)")
            ]
            assert widths == sorted(widths, reverse=True) and abs(sum(widths) - 100) < 1
            page.select_option("#label", "fish")
            page.click("#send")
            page.wait_for_selector("#status.ok")
            assert "queued" in page.inner_text("#status")
        finally:
            browser.close()
    sha = hashlib.sha256(picture.read_bytes()).hexdigest()
    assert (tmp_path / "feedback" / "pending" / "fish" / f"{sha}.png").is_file()


# --- schemathesis ---------------------------------------------------------------------------------


def test_openapi_fuzzing_finds_no_server_errors(model_base: str, tmp_path: Path) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    with thread_server(settings_for(model_base, tmp_path)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        failures: list[str] = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 13
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(
                    max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case: object) -> None:
                    response = case.call(base_url=url)  # type: ignore[attr-defined]
                    if response.status_code >= 500:
                        where = f"{case.method} {case.formatted_path}"  # type: ignore[attr-defined]
                        failures.append(f"{where}: {response.status_code} {response.text[:200]}")

                with contextlib.suppress(Unsatisfiable):  # no negative case exists for some routes
                    run()
        with httpx.Client(base_url=url) as http:
            assert http.get("/healthz").status_code == 200
    assert not failures, "\n".join(failures[:10])


def test_module_entry_point_reports_bad_settings_without_traceback() -> None:
    env = {**os.environ, "TFLOOP_SERVE_PORT": "not-a-port"}
    result = subprocess.run(
        [sys.executable, "-m", "serving"], env=env, cwd=REPO, capture_output=True, timeout=60
    )
    assert result.returncode == 1
    assert (
        result.stderr.decode().startswith("error: invalid serving settings")
        and b"Traceback" not in result.stderr
    )
