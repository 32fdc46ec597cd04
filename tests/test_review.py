"""The model asks for the labels it needs: the prediction log, the review queue (API, expiry, bound, the
page's "help the model" view in headless Chromium) and the shadow candidate, against a real serving
process and a model whose confidence the test controls (its answer is the image's mean colour)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import storage
from serving.review import ReviewItem, ReviewQueue
from serving.tokens import TOKEN_PREFIX
from storage.predictions import read_predictions
from tests.conftest import free_port
from tests.test_serving import CHROMIUM, CHROMIUM_ARGS, b64, start_process
from tests.tools import missing_tool

pytestmark = pytest.mark.slow

NAME = "colours"
LABELS = ["red", "green", "blue"]
TOKEN = "review-token-0123456789"


def colour_model(target: Path, *, green_bias: float = 0.0) -> Path:
    """A SavedModel answering by the image's mean colour: logits 12 * mean(R, G, B) (+ a bias to green).
    A pure colour is a sure answer; an even red/green mix is a coin toss."""
    import keras

    from export.savedmodel import export_saved_model

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3, activation="softmax")
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.eye(3, dtype="float32") * 12.0, np.array([0.0, green_bias, 0.0], dtype="float32")])
    export_saved_model(model, target, labels=LABELS, model_name=NAME)
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("colour-models")
    return colour_model(folder / "v1"), colour_model(folder / "v2", green_bias=2.0)


def mix(red: float, *, seed: int, size: int = 16) -> bytes:
    """A PNG whose pixels are red with probability ``red``, green otherwise (exact share, shuffled)."""
    count = size * size
    reds = round(red * count)
    pixels = np.zeros((count, 3), dtype=np.uint8)
    pixels[:reds, 0] = 255
    pixels[reds:, 1] = 255
    np.random.default_rng(seed).shuffle(pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(size, size, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def direct_probabilities(exported: Path, images: list[bytes]) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported))
    return loaded.signatures["serving_default"](image_bytes=tf.constant(images))["probabilities"].numpy()


def publish(exported: Path, base: str) -> int:
    from export.publish import publish_version

    return publish_version(exported, base=base, model_name=NAME).version


def serving_env(tmp_path: Path, base: str, port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFLOOP_SERVE_")}
    env.update(
        {
            "TFLOOP_SERVE_MODEL_BASE": base,
            "TFLOOP_SERVE_MODEL_NAME": NAME,
            "TFLOOP_SERVE_FEEDBACK_URI": str(tmp_path / "feedback"),
            "TFLOOP_SERVE_CACHE_DIR": str(tmp_path / "cache"),
            "TFLOOP_SERVE_HOST": "127.0.0.1",
            "TFLOOP_SERVE_PORT": str(port),
            "TFLOOP_SERVE_GRPC_PORT": "0",
            "TFLOOP_SERVE_POLL_INTERVAL_S": "0.2",
            "TFLOOP_SERVE_PREDICTION_LOG_FLUSH_S": "0.2",
            "TFLOOP_SERVE_TOKEN": TOKEN,
            "TFLOOP_FEEDBACK_SECRET": "a-shared-secret-of-the-replicas",
            **{f"TFLOOP_SERVE_{key.upper()}": value for key, value in settings.items()},
        }
    )
    return env


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def settle(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def server(tmp_path: Path, models: tuple[Path, Path]) -> Iterator[tuple[str, Path]]:
    """`python -m serving` with version 1 of the colour model; yields its URL and the feedback root."""
    base = str(tmp_path / "models")
    publish(models[0], base)
    port = free_port()
    process = start_process(
        [sys.executable, "-m", "serving"], serving_env(tmp_path, base, port, review_margin="0.3"), port
    )
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "feedback"
    finally:
        stop(process)


def test_ambiguous_predictions_queue_for_review_and_the_page_labels_one(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    url, feedback = server
    clear = [mix(red, seed=i) for i, red in enumerate([1.0, 0.0] * 20)]  # 40 sure answers
    ambiguous = [mix(red, seed=100 + i) for i, red in enumerate(np.linspace(0.48, 0.52, 10))]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        for i, image in enumerate(clear + ambiguous):
            if i % 2:
                response = http.post(f"/v1/models/{NAME}:predict", json={"instances": [b64(image)]})
            else:
                response = http.post("/classify", files={"file": ("x.png", image, "image/png")})
            assert response.status_code == 200, response.text
        assert http.get("/review").status_code == 401  # the token rules of /feedback apply

        def listed() -> list[dict]:
            return http.get("/review", params={"limit": 50}, headers=auth).json()["items"]

        settle(lambda: len(listed()) == len(ambiguous), "the ambiguous predictions reach /review")
        items = listed()
        by_sha = {hashlib.sha256(image).hexdigest(): image for image in ambiguous}
        assert {item["sha256"] for item in items} == set(by_sha)
        margins = [item["margin"] for item in items]
        assert margins == sorted(margins) and margins[-1] < 0.3
        expected_margins = {
            hashlib.sha256(image).hexdigest(): abs(p[0] - p[1])
            for image, p in zip(ambiguous, direct_probabilities_of(tmp_path, ambiguous), strict=True)
        }
        for item in items:
            assert item["model_version"] == 1 and item["prediction_id"].startswith(f"{TOKEN_PREFIX}.")
            assert abs(item["margin"] - expected_margins[item["sha256"]]) < 1e-3
            assert http.get(item["image_url"], headers=auth).content == by_sha[item["sha256"]]
        assert http.get(items[0]["image_url"]).status_code == 401

        settle(lambda: len(list(read_predictions(str(feedback), NAME))) == 50, "50 predictions in the log")
        records = list(read_predictions(str(feedback), NAME))
        assert {record.sha256 for record in records} == {
            hashlib.sha256(image).hexdigest() for image in clear + ambiguous
        }
        assert {(r.model_version, r.format, r.width, r.height) for r in records} == {(1, "png", 16, 16)}
        assert sorted(r.protocol for r in records) == ["rest"] * 50
        logged = [path for path in (feedback / "predictions").rglob("*") if path.is_file()]
        assert logged and all(path.suffix == ".jsonl" for path in logged)  # no image in the log

        metrics = http.get("/metrics").text
        assert 'tfloop_prediction_confidence_count{version="1"} 50.0' in metrics
        assert 'tfloop_predicted_class_total{label="red",version="1"}' in metrics

        first = items[0]
        label_page(url, first["sha256"], "green")
        settle(lambda: first["sha256"] not in {item["sha256"] for item in listed()}, "labelled item leaves")
        assert len(listed()) == len(ambiguous) - 1
    assert (feedback / "pending" / "green" / f"{first['sha256']}.png").read_bytes() == by_sha[first["sha256"]]
    assert not list((feedback / "review" / "images").glob(f"{first['sha256']}.*"))


def direct_probabilities_of(tmp_path: Path, images: list[bytes]) -> np.ndarray:
    """Version 1's probabilities, from the published copy."""
    return direct_probabilities(tmp_path / "models" / NAME / "1", images)


def label_page(url: str, sha256: str, label: str) -> None:
    """Open the page in headless Chromium, enter the token, load the review view, click ``label`` on the
    item of ``sha256``."""
    if not Path(CHROMIUM).exists():
        missing_tool(
            CHROMIUM,
            why="the review view of the page cannot be tested in a browser",
            how="install it with `apt-get install chromium` (make system-deps)",
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("text=version 1")
            page.fill("#token", TOKEN)
            page.click("#load-review")
            item = page.locator(f'.review-item[data-sha256="{sha256}"]')
            item.wait_for()
            assert page.locator(".review-item").first.get_attribute("data-sha256") == sha256
            width = item.locator("img").evaluate("img => img.complete ? img.naturalWidth : -1")
            assert width == 16  # the image came from the review queue
            item.locator(f'button[data-label="{label}"]').click()
            page.wait_for_selector("#status.ok >> text=queued")
            assert item.count() == 0
        finally:
            browser.close()


def test_shadow_candidate_answers_in_the_background_only(tmp_path: Path, models: tuple[Path, Path]) -> None:
    """Live 1 and candidate 2 (biased to green): every client answer is version 1's; the log carries
    version 2's answer for each, and their agreement is what a direct comparison of both models says."""
    from storage import versions

    base = str(tmp_path / "models")
    publish(models[0], base)
    publish(models[1], base)
    versions.write_live_pointer(base, NAME, 1, promoted_by="test")
    images = [mix(red, seed=200 + i) for i, red in enumerate(np.linspace(0.3, 0.9, 30))]
    live = direct_probabilities(models[0], images)
    candidate = direct_probabilities(models[1], images)
    agreeing = int(np.sum(live.argmax(axis=1) == candidate.argmax(axis=1)))
    assert 0 < agreeing < len(images)  # the comparison can tell agreement from disagreement

    port = free_port()
    env = serving_env(tmp_path, base, port, shadow_sample="1", review_max_items="0")
    process = start_process([sys.executable, "-m", "serving"], env, port)
    feedback = str(tmp_path / "feedback")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            settle(lambda: http.get("/info").json().get("candidate_version") == 2, "candidate 2 is loaded")
            for image, expected in zip(images, live, strict=True):
                response = http.post(f"/v1/models/{NAME}:predict", json={"instances": [b64(image)]})
                assert response.headers["X-Model-Version"] == "1"
                answer = response.json()["predictions"][0]["probabilities"]
                assert np.allclose(answer, expected, atol=1e-5)
            settle(lambda: len(list(read_predictions(feedback, NAME))) == len(images), "all logged")
            records = {record.sha256: record for record in read_predictions(feedback, NAME)}
            shadowed = [record.shadow for record in records.values()]
            assert all(s is not None and s.version == 2 for s in shadowed)
            assert sum(1 for s in shadowed if s is not None and s.agrees) == agreeing
            for image, probabilities in zip(images, candidate, strict=True):
                shadow = records[hashlib.sha256(image).hexdigest()].shadow
                assert shadow is not None and shadow.label == LABELS[int(probabilities.argmax())]
            assert "tfloop_shadow_total" in http.get("/metrics").text
    finally:
        stop(process)


# --- the review queue's store -------------------------------------------------------------------


def review_item(sha_seed: int, margin: float, at: float) -> ReviewItem:
    sha = hashlib.sha256(str(sha_seed).encode()).hexdigest()
    return ReviewItem(
        sha256=sha,
        prediction_id=f"id-{sha_seed}",
        model_name=NAME,
        model_version=1,
        top_k=[("red", 0.5 + margin / 2), ("green", 0.5 - margin / 2)],
        margin=margin,
        entropy=0.69,
        time=at,
        extension="png",
    )


@pytest.mark.parametrize("on_gcs", [False, True], ids=["local", "gcs"])
def test_review_queue_is_bounded_ordered_and_expires(
    tmp_path: Path, on_gcs: bool, request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue("gcs_bucket") + "/feedback" if on_gcs else str(tmp_path / "feedback")
    now = [1000.0]
    queue = ReviewQueue(root, max_items=3, ttl_s=100, clock=lambda: now[0])
    first = [review_item(i, margin, at=1000) for i, margin in enumerate([0.25, 0.05, 0.15])]
    assert queue.add([(item, f"image {i}".encode()) for i, item in enumerate(first)])["added"] == 3
    listed, queued = queue.items(limit=10)
    assert [item.margin for item in listed] == [0.05, 0.15, 0.25] and queued == 3

    sure = review_item(10, 0.3, at=1000)  # full, and surer than everything held: not taken
    unsure = review_item(11, 0.01, at=1000)  # takes the place of the surest (0.25)
    counts = queue.add([(sure, b"sure"), (unsure, b"unsure")])
    assert counts == {"added": 1, "evicted": 1, "expired": 0}
    assert [item.margin for item in queue.items(limit=10)[0]] == [0.01, 0.05, 0.15]
    assert queue.image(first[0].sha256) is None and queue.image(unsure.sha256) == (b"unsure", "png")

    assert queue.remove(first[1].sha256) and not queue.remove(first[1].sha256)
    now[0] = 1050.0
    late = review_item(12, 0.2, at=1050)
    queue.add([(late, b"late")])
    now[0] = 1101.0  # the first items are 101 s old: past the 100 s they may live
    assert [item.sha256 for item in queue.items(limit=10)[0]] == [late.sha256]
    assert queue.add([])["expired"] == 2
    assert storage.list_files(storage.join(root, "review", "images")) == [f"{late.sha256}.png"]
