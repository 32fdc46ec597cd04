"""Fast tests of the serving parts that need no model: settings, image validation, batching, TF Serving
request parsing, Prefect event format and sending."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from serving.batching import DynamicBatcher
from serving.errors import InvalidInput, PayloadTooLarge
from serving.events import FEEDBACK_EVENT, PrefectEventSender, feedback_event
from serving.images import check_image_header, validate_image
from serving.server import HeadJoiningTransport
from serving.settings import ServingSettings, available_cores
from serving.tfserving import InputSpec, format_outputs, parse_predict, to_array
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def encoded(fmt: str = "PNG", size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 100).save(buffer, format=fmt)
    return buffer.getvalue()


# --- settings -------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFLOOP_SERVE_VERSION_POLICY", "7")
    monkeypatch.setenv("TFLOOP_SERVE_MODEL_BASE", "gs://bucket/models")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("TFLOOP_SERVE_TOKEN", "")
    settings = ServingSettings()
    assert settings.pinned_version == 7
    assert settings.model_base == "gs://bucket/models"
    assert settings.prefect_api_url == "http://127.0.0.1:4200/api"
    assert settings.token is None
    assert ServingSettings(version_policy="latest").pinned_version is None


def test_production_settings_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # The names a Kubernetes Deployment sets (README "Serving"): they must keep working.
    for name, value in {
        "TFLOOP_SERVE_FEEDBACK_URI": "gs://bucket/feedback",
        "TFLOOP_SERVE_PREFECT_API_URL": "http://prefect:4200/api",
        "PREFECT_API_KEY": "pnu_secret",
        "TFLOOP_SERVE_TOKEN": "feedback-token",
        "TFLOOP_FEEDBACK_SECRET": "0123456789abcdef0123",
        "TFLOOP_SERVE_DRAIN_S": "7.5",
        "TFLOOP_SERVE_SHUTDOWN_TIMEOUT_S": "25",
    }.items():
        monkeypatch.setenv(name, value)
    settings = ServingSettings()
    assert settings.feedback_uri == "gs://bucket/feedback"
    assert settings.prefect_api_url == "http://prefect:4200/api"
    assert (
        settings.prefect_api_key is not None and settings.prefect_api_key.get_secret_value() == "pnu_secret"
    )
    assert settings.token is not None and settings.token.get_secret_value() == "feedback-token"
    assert settings.feedback_secret is not None
    assert (settings.drain_s, settings.shutdown_timeout_s) == (7.5, 25)


def test_batching_settings_reach_the_batcher(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from serving.services import build_services

    monkeypatch.setenv("TFLOOP_SERVE_BATCH_WORKERS", "3")
    batcher = build_services(ServingSettings(feedback_uri=str(tmp_path), max_batch_size=7)).batcher
    assert (batcher.workers, batcher.max_batch_size) == (3, 7)
    assert ServingSettings().batch_workers == 3 and ServingSettings.model_fields["batch_workers"].default == 2


def test_tensorflow_threads_default_to_the_cores_shared_by_the_batch_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("serving.settings.available_cores", lambda: 4)
    assert ServingSettings(batch_workers=2).tensorflow_threads() == (2, 4)
    assert ServingSettings(batch_workers=8).tensorflow_threads() == (1, 4)
    chosen = ServingSettings(tf_intra_op_threads=3, tf_inter_op_threads=5).tensorflow_threads()
    assert chosen == (3, 5)


def test_available_cores_honour_a_container_cpu_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert available_cores(cpu_max) == 2  # a 1.5-CPU limit
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == 16
    assert available_cores(tmp_path / "missing") == 16


def test_tensorflow_threads_are_sized_before_tensorflow_starts() -> None:
    # A fresh process (as `python -m serving`): the sizes take; once TensorFlow runs, others are refused.
    script = (
        "from serving.model import configure_tensorflow_threads as c\n"
        "assert c(intra_op=1, inter_op=3)\n"
        "import tensorflow as tf\n"
        "tf.constant(1) + 1\n"
        "assert (tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads()) == (1, 3)\n"
        "assert c(intra_op=2, inter_op=3) is False\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)


def test_settings_refuse_bad_policy() -> None:
    with pytest.raises(ValueError):
        ServingSettings(version_policy="newest")


# --- images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp")])
def test_validate_accepts_supported_formats(fmt: str, ext: str) -> None:
    info = validate_image(encoded(fmt), max_pixels=10_000)
    assert (info.extension, info.width, info.height) == (ext, 32, 32)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, not an image",
        encoded("PNG")[:60],
        encoded("JPEG")[:100],
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
    ],
)
def test_validate_refuses_non_images_and_truncated(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        validate_image(data, max_pixels=10_000)


def test_validate_refuses_pixel_bomb_before_decoding() -> None:
    bomb = encoded("PNG", size=(5000, 5000), mode="1")
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        validate_image(bomb, max_pixels=1_000_000)
    # Cut after its header, the bomb cannot be decoded: refused as too large, so the size came first.
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        validate_image(bomb[:100], max_pixels=1_000_000)


def test_header_check_refuses_bombs_and_non_images_but_leaves_decoding_to_the_model() -> None:
    bomb = encoded("PNG", size=(5000, 5000), mode="1")
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        check_image_header(bomb, max_pixels=1_000_000)
    with pytest.raises(InvalidInput, match="not a supported image"):
        check_image_header(b"plain text", max_pixels=10_000)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        noise, "JPEG"
    )
    truncated = noise.getvalue()[: len(noise.getvalue()) // 2]
    assert check_image_header(truncated, max_pixels=10_000).width == 64
    with pytest.raises(InvalidInput, match="truncated"):
        validate_image(truncated, max_pixels=10_000)


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "RGB", {"exif": b"Exif\0\0" + b"x" * 300}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGB", {}),
        ("PNG", "1", {}),
    ],
)
def test_header_size_is_read_as_pillow_reads_it(fmt: str, mode: str, options: dict) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (37, 211)).save(buffer, fmt, **options)
    info = check_image_header(buffer.getvalue(), max_pixels=100_000)
    assert (info.format, info.width, info.height) == (fmt.lower(), 37, 211)
    with pytest.raises(PayloadTooLarge, match="37x211"):
        check_image_header(buffer.getvalue(), max_pixels=37 * 211 - 1)


def test_header_check_of_a_jpeg_cut_before_its_frame_asks_pillow() -> None:
    with pytest.raises(InvalidInput, match="jpeg"):
        check_image_header(encoded("JPEG")[:12], max_pixels=10_000)


def test_validate_trusts_content_not_names() -> None:
    # A JPEG is a JPEG whatever the client calls it; a text file named .png is not an image.
    assert validate_image(encoded("JPEG"), max_pixels=10_000).format == "jpeg"


# --- batching -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_batcher(batcher: DynamicBatcher) -> AsyncIterator[DynamicBatcher]:
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


def test_batcher_coalesces_concurrent_requests() -> None:
    calls: list[list[int]] = []

    def predict(items):
        calls.append(list(items))
        time.sleep(0.01)
        return [item * 10 for item in items]

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(predict, max_batch_size=8, max_wait_s=0.02)
        async with running_batcher(batcher):
            return await asyncio.gather(*(batcher.submit(i) for i in range(20)))

    results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(20)]
    assert max(len(call) for call in calls) == 8  # all 20 are queued before the first batch forms
    assert len(calls) <= 4
    assert sorted(item for call in calls for item in call) == list(range(20))


def test_a_lone_request_is_not_held_for_the_max_wait() -> None:
    async def scenario() -> float:
        batcher = DynamicBatcher(lambda items: list(items), max_batch_size=32, max_wait_s=10)
        async with running_batcher(batcher):
            started = time.monotonic()
            await asyncio.wait_for(batcher.submit(1), timeout=30)
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 5  # far below the 10 s it would wait for company


def test_a_request_expecting_company_waits_for_it_but_not_past_the_max_wait() -> None:
    async def scenario() -> float:
        batcher = DynamicBatcher(
            lambda items: list(items), max_batch_size=32, max_wait_s=0.3, requests_in_flight=lambda: 9
        )
        async with running_batcher(batcher):
            started = time.monotonic()
            assert await asyncio.wait_for(batcher.submit(1), timeout=30) == 1  # answered, alone
            return time.monotonic() - started

    assert asyncio.run(scenario()) >= 0.25  # it did wait for the others it expected


def test_failed_batch_is_retried_item_by_item() -> None:
    sizes: list[int] = []

    def predict(items):
        sizes.append(len(items))
        if "bad" in items:
            raise ValueError("model cannot decode")
        return [item.upper() for item in items]

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(predict, max_batch_size=8, max_wait_s=0.05)
        async with running_batcher(batcher):
            return await asyncio.gather(
                *(batcher.submit(i) for i in ["a", "bad", "c"]), return_exceptions=True
            )

    results = asyncio.run(scenario())
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], ValueError)
    assert sizes[0] == 3 and sizes[1:] == [1, 1, 1]


def test_screen_fails_the_bad_items_and_reruns_the_rest_as_one_batch() -> None:
    sizes: list[int] = []

    def predict(items):
        sizes.append(len(items))
        if any(item.startswith("bad") for item in items):
            raise ValueError("model cannot decode")
        return [item.upper() for item in items]

    def screen(item: str) -> Exception | None:
        return InvalidInput(f"{item} is corrupt") if item.startswith("bad") else None

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(predict, max_batch_size=8, max_wait_s=0.05, screen=screen)
        async with running_batcher(batcher):
            items = ["a", "bad1", "c", "bad2", "e"]
            return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)

    results = asyncio.run(scenario())
    assert [results[0], results[2], results[4]] == ["A", "C", "E"]
    assert isinstance(results[1], InvalidInput) and "bad1 is corrupt" in str(results[1])
    assert isinstance(results[3], InvalidInput) and "bad2" in str(results[3])
    assert sizes == [5, 3]  # one failed call, one rerun of the three good items: no item-by-item retries


def test_screen_that_sees_nothing_wrong_falls_back_to_item_by_item() -> None:
    sizes: list[int] = []

    def predict(items):
        sizes.append(len(items))
        if "odd" in items:
            raise ValueError("only the model minds this one")
        return list(items)

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(predict, max_batch_size=8, max_wait_s=0.05, screen=lambda _item: None)
        async with running_batcher(batcher):
            return await asyncio.gather(
                *(batcher.submit(i) for i in ["a", "odd", "c"]), return_exceptions=True
            )

    results = asyncio.run(scenario())
    assert results[0] == "a" and results[2] == "c" and isinstance(results[1], ValueError)
    assert sizes == [3, 1, 1, 1]


def test_batches_never_mix_groups_and_keep_each_groups_order() -> None:
    # Items of two model versions ("a", "b") arrive interleaved: every call holds one version only, every
    # item is answered once, and within a version the order of arrival is kept (one worker: calls run in the
    # order the batches formed).
    calls: list[list[tuple[str, int]]] = []

    def predict(items):
        calls.append(list(items))
        time.sleep(0.01)
        return [(version, number * 10) for version, number in items]

    items = [("a" if i % 3 else "b", i) for i in range(30)]

    async def scenario() -> list[tuple[str, int]]:
        batcher = DynamicBatcher(
            predict, max_batch_size=8, max_wait_s=0.02, workers=1, group=lambda item: item[0]
        )
        async with running_batcher(batcher):
            return await asyncio.gather(*(batcher.submit(item) for item in items))

    results = asyncio.run(scenario())
    assert results == [(version, number * 10) for version, number in items]
    assert all(len({version for version, _ in call}) == 1 for call in calls)
    assert sorted(item for call in calls for item in call) == sorted(items)
    for version in "ab":
        seen = [number for call in calls for v, number in call if v == version]
        assert seen == sorted(seen)
    assert len(calls) < len(items)  # still batched


class SlowModel:
    """A batch function that takes 50 ms and records batch sizes and how many calls ran at once."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.running = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, items):
        with self._lock:
            self.sizes.append(len(items))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self._lock:
            self.running -= 1
        return list(items)


def test_two_workers_run_two_batches_at_once() -> None:
    async def scenario(model: SlowModel, workers: int) -> list[int]:
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.01, workers=workers)
        async with running_batcher(batcher):
            return await asyncio.gather(*(batcher.submit(i) for i in range(16)))

    one, two = SlowModel(), SlowModel()
    assert asyncio.run(scenario(one, 1)) == list(range(16)) and one.most == 1
    assert asyncio.run(scenario(two, 2)) == list(range(16)) and two.most == 2


def test_requests_already_in_a_running_batch_do_not_hold_the_next_one_back() -> None:
    # Two requests in flight: the first is in a running batch, so the second cannot expect company and must
    # not sit out the (long) max wait.
    def predict(items):
        time.sleep(0.2)
        return list(items)

    async def scenario() -> float:
        batcher = DynamicBatcher(
            predict, max_batch_size=8, max_wait_s=10, workers=2, requests_in_flight=lambda: 2
        )
        async with running_batcher(batcher):
            first = asyncio.create_task(batcher.submit(1))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await asyncio.wait_for(batcher.submit(2), timeout=30)
            waited = time.monotonic() - started
            await first
            return waited

    assert asyncio.run(scenario()) < 5  # far below the 10 s max wait


def batch_sizes_of_a_burst_then_a_trickle(count: int, gap_s: float, **options: object) -> list[int]:
    """Sizes of the model calls for ``count`` items at once, then ``count`` more arriving ``gap_s`` apart."""
    sizes: list[int] = []

    def predict(items):
        sizes.append(len(items))
        return list(items)

    async def scenario() -> None:
        # A long max wait: each batch closes when it is as large as it should be, not when the wait ends.
        batcher = DynamicBatcher(predict, max_batch_size=8, max_wait_s=5, **options)
        async with running_batcher(batcher):
            await asyncio.gather(*(batcher.submit(i) for i in range(count)))

            async def later(i: int) -> int:
                await asyncio.sleep(gap_s * i)
                return await batcher.submit(i)

            await asyncio.gather(*(later(i) for i in range(count)))

    asyncio.run(scenario())
    return sizes


def test_a_batch_waits_for_as_many_as_the_last_one_held() -> None:
    # Under load the clients of a finished batch come back one by one, before the server has counted them
    # as in flight: the next batch waits (within the max wait) until it is as large as the last one.
    assert batch_sizes_of_a_burst_then_a_trickle(6, 0.01, requests_in_flight=lambda: 1) == [6, 6]


def test_one_batch_forms_at_a_time_across_workers() -> None:
    # Two idle workers must not split arriving requests into two half batches.
    assert batch_sizes_of_a_burst_then_a_trickle(8, 0.005, workers=2) == [8, 8]


def test_workers_share_the_recent_peak_of_requests() -> None:
    # Eight requests in progress at the peak, two workers: two batches of four run side by side, so one
    # batch's answers go out while the other computes.
    model = SlowModel()

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(
            model,
            max_batch_size=32,
            max_wait_s=0.5,
            workers=2,
            requests_in_flight=lambda: 8,
            peak_in_flight=lambda: 8,
        )
        async with running_batcher(batcher):
            return await asyncio.gather(*(batcher.submit(i) for i in range(8)))

    assert asyncio.run(scenario()) == list(range(8))
    assert model.sizes == [4, 4] and model.most == 2


def test_in_flight_peak_outlives_dips_for_its_window() -> None:
    from serving.services import InFlight

    gauge = InFlight(window_s=1.0)
    for _ in range(5):
        gauge.enter()
    for _ in range(4):
        gauge.leave()
    assert gauge.count == 1 and gauge.recent_peak() == 5  # answers went out; their clients come back
    time.sleep(1.1)
    assert gauge.recent_peak() == 1  # the load is gone


def test_event_loop_stays_responsive_during_a_slow_batch() -> None:
    # The batch function blocks until the event loop has run other code: it returns True only if the loop
    # kept running while the batch did (a batch run on the loop's thread would wait in vain).
    loop_ran, batch_started = threading.Event(), threading.Event()

    def predict(items):
        batch_started.set()
        return [loop_ran.wait(timeout=10) for _ in items]

    async def scenario() -> bool:
        batcher = DynamicBatcher(predict, max_batch_size=4, max_wait_s=0)
        async with running_batcher(batcher):
            task = asyncio.create_task(batcher.submit(1))
            while not batch_started.is_set():
                await asyncio.sleep(0.01)
            loop_ran.set()
            return await task

    assert asyncio.run(scenario()) is True


# --- TF Serving request parsing -------------------------------------------------------------------

BYTES = {"image_bytes": InputSpec(is_string=True, numpy_dtype=object, shape=(None,))}


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def test_parse_row_and_columnar_forms() -> None:
    row = parse_predict({"instances": [b64(b"x"), {"image_bytes": b64(b"y")}]}, BYTES, max_instances=8)
    assert row.format == "row" and row.columns["image_bytes"] == [b64(b"x"), b64(b"y")]
    col = parse_predict({"inputs": {"image_bytes": [b64(b"x")]}}, BYTES, max_instances=8)
    assert col.format == "columnar" and col.batch_size == 1
    bare = parse_predict({"inputs": [b64(b"x"), b64(b"z")]}, BYTES, max_instances=8)
    assert bare.batch_size == 2


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"instances": [], "inputs": []},
        {"instances": []},
        {"instances": "x"},
        {"instances": [{"other": 1}]},
        {"inputs": {"wrong": [1]}},
        {"inputs": {"image_bytes": "notalist"}},
    ],
)
def test_parse_refuses_malformed_bodies(body: dict) -> None:
    with pytest.raises(InvalidInput):
        parse_predict(body, BYTES, max_instances=8)


def test_parse_limits_instances() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_predict({"instances": [b64(b"x")] * 9}, BYTES, max_instances=8)


def test_numeric_inputs_are_shape_checked() -> None:
    spec = InputSpec(is_string=False, numpy_dtype=np.float32, shape=(None, 2, 2, 3))
    assert to_array(np.zeros((3, 2, 2, 3)).tolist(), spec, name="images").shape == (3, 2, 2, 3)
    for bad in (np.zeros((1, 3, 2, 3)).tolist(), [[1, 2], [3]], [["a"]], [[[[float("nan")] * 3] * 2] * 2]):
        with pytest.raises(InvalidInput):
            to_array(bad, spec, name="images")


def test_format_outputs_like_tf_serving() -> None:
    outputs = {"scores": np.array([[0.9], [0.2]]), "classes": np.array([["a"], ["b"]], dtype=object)}
    assert format_outputs(outputs, "row") == {
        "predictions": [{"classes": ["a"], "scores": [0.9]}, {"classes": ["b"], "scores": [0.2]}]
    }
    assert format_outputs(outputs, "columnar") == {
        "outputs": {"classes": [["a"], ["b"]], "scores": [[0.9], [0.2]]}
    }
    assert format_outputs({"y": np.array([1, 2])}, "row") == {"predictions": [1, 2]}


# --- Prefect events -------------------------------------------------------------------------------


def test_feedback_event_is_a_valid_prefect_event() -> None:
    from prefect.server.events.schemas.events import Event

    event = feedback_event(model_name="flowers", label="tulip", payload={"feedback_id": "abc"})
    parsed = Event.model_validate(event)
    assert parsed.event == FEEDBACK_EVENT
    assert parsed.resource.id == "tfloop.model.flowers"
    assert parsed.resource["tfloop.label"] == "tulip"
    assert parsed.resource["tfloop.model"] == "flowers"


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, object]]] = []
    authorization: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, json.loads(body)))
        type(self).authorization.append(self.headers.get("Authorization"))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_event_sender_posts_to_prefect_events_endpoint_and_survives_outage() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    outcomes: list[bool] = []

    _Receiver.authorization = []

    async def scenario(url: str, api_key: str | None = None) -> None:
        key = SecretStr(api_key) if api_key else None
        sender = PrefectEventSender(url, timeout_s=2, api_key=key, on_result=outcomes.append)
        await sender.start()
        sender.emit(feedback_event(model_name="m", label="a", payload={}))
        await sender.stop()

    try:
        asyncio.run(scenario(f"http://127.0.0.1:{server.server_port}/api"))
        asyncio.run(scenario(f"http://127.0.0.1:{server.server_port}/api", api_key="pnu_key"))
    finally:
        server.shutdown()
        server.server_close()
    assert outcomes == [True, True]
    assert _Receiver.authorization == [None, "Bearer pnu_key"]
    (path, events), _ = _Receiver.received
    assert path == "/api/events" and events[0]["event"] == FEEDBACK_EVENT
    asyncio.run(scenario(f"http://127.0.0.1:{free_port()}/api"))  # nothing listens: logged, counted
    assert outcomes == [True, True, False]


def test_sequential_traffic_is_not_delayed_by_the_batch_wait() -> None:
    async def scenario() -> float:
        batcher = DynamicBatcher(lambda items: list(items), max_batch_size=32, max_wait_s=10)
        async with running_batcher(batcher):
            started = time.monotonic()
            for i in range(5):
                await asyncio.wait_for(batcher.submit(i), timeout=30)
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 5  # one max wait of 10 s would be twice that


def test_no_item_is_lost_when_arrivals_race_the_batch_deadline() -> None:
    # asyncio.wait_for(queue.get(), timeout) can drop an item on Python 3.11 when both happen at once.
    import random

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(lambda items: list(items), max_batch_size=4, max_wait_s=0.0005)
        await batcher.start()
        rng = random.Random(0)

        async def client(i: int) -> int:
            await asyncio.sleep(rng.random() * 0.2)
            return await batcher.submit(i)

        try:
            return await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(1500))), timeout=30)
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == list(range(1500))


def test_stop_ends_workers_waiting_for_items() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(
            lambda items: list(items), max_batch_size=4, max_wait_s=10, requests_in_flight=lambda: 9
        )
        await batcher.start()
        task = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # the worker now waits for more items to join
        await asyncio.wait_for(batcher.stop(), timeout=2)
        assert task.cancelled() or task.done()

    asyncio.run(scenario())


def test_an_item_arriving_as_the_batch_wait_ends_is_never_lost() -> None:
    """The item's arrival and the end of the wait for it fall in one turn of the event loop (the loop is
    blocked past both), in either order: every item is handed to the forming batch or still queued."""

    async def race() -> tuple[int, int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(
            lambda items: items, max_batch_size=8, max_wait_s=0.0
        )
        await batcher.start()
        await batcher.stop()  # no worker takes items: count where each one went
        queue = batcher._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        handed = left = 0
        for item in range(200):
            waiting = asyncio.create_task(batcher._get_within(0.001))
            await asyncio.sleep(0)  # the wait has begun
            loop.call_later(0.0005 if item % 2 else 0.0015, queue.put_nowait, item)
            time.sleep(0.003)  # both the arrival and the timeout are due when the loop turns again
            got = await waiting
            await asyncio.sleep(0.002)
            if got is not None:
                assert got == item and queue.empty()
                handed += 1
            else:
                assert queue.get_nowait() == item
                left += 1
        return handed, left

    handed, left = asyncio.run(race())
    assert handed + left == 200 and left > 0


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what was written to it, and whether it was closed, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[bytes | str] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.events.append(bytes(data))

    def close(self) -> None:
        self.events.append("closed")

    def is_closing(self) -> bool:
        return "closed" in self.events


def test_a_response_head_leaves_with_its_body_in_one_write() -> None:
    async def scenario() -> None:
        raw = RecordingTransport()
        transport = HeadJoiningTransport(raw, asyncio.get_running_loop())
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"

        transport.write(head)
        transport.write(b"{}")
        assert raw.events == [head + b"{}"]

        transport.write(head)  # a streamed response: its head goes out at the end of the loop turn
        assert raw.events == [head + b"{}"]
        await asyncio.sleep(0)
        assert raw.events == [head + b"{}", head]
        transport.write(b"chunk")
        assert raw.events[-1] == b"chunk"

        transport.write(head)  # closing sends what is held first
        transport.close()
        assert raw.events[-2:] == [head, "closed"]
        assert transport.is_closing()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
        assert raw.events.count(head) == 2

    asyncio.run(scenario())


def test_observing_many_values_at_once_counts_as_observing_each() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from serving.metrics import observe_all

    values = [0.05, 0.1, 0.1000001, 0.5, 0.95, 1.0, 3.0, 0, 7, float("nan"), 0.99]
    expositions = []
    for together in (False, True):
        registry = CollectorRegistry()
        plain = Histogram("plain", "h", buckets=(0.1, 0.5, 1.0), registry=registry)
        labelled = Histogram("labelled", "h", ["version"], buckets=(0.1, 0.5, 1.0), registry=registry)
        for histogram in (plain, labelled.labels("7")):
            if together:
                observe_all(histogram, values)
                observe_all(histogram, [])
            else:
                for value in values:
                    histogram.observe(value)
        text = generate_latest(registry).decode()
        expositions.append("\n".join(line for line in text.splitlines() if "_created" not in line))
    assert expositions[0] == expositions[1]
    assert 'plain_bucket{le="0.1"} 3.0' in expositions[1] and "plain_count 10.0" in expositions[1]
