"""Serving benchmark: requests/s and p50/p99 latency of the tfloop server at concurrency 1, 8 and 32,
beside the same SavedModel called in-process at its best batch size (the ceiling on this machine) and
beside a naive server that runs one model call per request, and TF Serving's gRPC API of the same server
process (``Predict`` with the image bytes, driven by an asyncio gRPC client in its own process) beside REST,
and beside a bare server: uvicorn around the server's own batcher and model with nothing else, what the HTTP
plumbing alone leaves of the ceiling. Writes its section of BENCHMARKS.md.

Usage: ``python benchmarks/serving.py [--seconds 8] [--rounds 7] [--model-base DIR --model-name NAME]``
(``make bench`` installs wrk first, the load generator it prefers; without it a Python client drives the
load and takes CPU from the server under test).
Without a model base it uses the demo model when one exists (``make demo`` leaves it in
``$TFLOOP_HOME/demo-run/models``; ``$TFLOOP_HOME/models`` is also tried), else it exports the demo
model's architecture (EfficientNetB0 at 48 px, the six demo labels, untrained: the time of a call does not
depend on the weights) into a temporary folder.

The ceiling is the in-process model one call at a time at its best batch size; stricter, also the 32 images
of concurrency 32 as concurrent calls, one batch per batch worker (how the server calls the model). Both use
the TensorFlow thread settings the server uses. The machine is shared and noisy, so the two targets are
measured as ratios within one time window: the concurrency-1 target alternates one in-process call and one
HTTP request, and the concurrency-32 target alternates in-process ceiling blocks and server blocks for
``--rounds`` rounds (medians reported).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import Request  # resolved from module globals by FastAPI (postponed annotations)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BEGIN, END = "<!-- BEGIN serving -->", "<!-- END serving -->"
CONCURRENCY = (1, 8, 32)
IN_FLIGHT = 32  # the top concurrency: at most this many images are ever in the server at once
BATCH_SIZES = (1, 8, 16, 32, 64)  # the in-process sweep
CEILING_BATCH_SIZES = (32, 64)  # where the best batch size lies (the sweep shows smaller ones are slower)
DEMO_IMAGE_SIZE = 48  # `tfloop demo --image-size` default


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_images(count: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


def find_or_export_model(args: argparse.Namespace, scratch: Path) -> tuple[str, str, str]:
    """(model base, model name, description)."""
    from storage import versions

    if args.model_base:
        return args.model_base, args.model_name, f"{args.model_name} from {args.model_base}"
    home = Path(os.environ.get("TFLOOP_HOME", ".tfloop"))
    for demo_base in (str(home / "demo-run" / "models"), str(home / "models")):  # `make demo`, `tfloop train`
        if Path(demo_base).is_dir() and versions.latest_version(demo_base, "tfloop-classifier") is not None:
            return demo_base, "tfloop-classifier", f"the demo model (tfloop-classifier from {demo_base})"
    from export.publish import publish_version
    from export.savedmodel import export_saved_model
    from training.demo_data import DEMO_CLASSES
    from training.fit import TrainConfig
    from training.models import build_model

    backbone = str(TrainConfig.model_fields["backbone"].default)
    model = build_model(backbone, len(DEMO_CLASSES), image_size=DEMO_IMAGE_SIZE, weights="none")
    export_saved_model(
        model,
        scratch / "export",
        labels=sorted(DEMO_CLASSES),
        model_name="tfloop-classifier",
        backbone=backbone,
    )
    publish_version(scratch / "export", base=str(scratch / "models"), model_name="tfloop-classifier")
    return (
        str(scratch / "models"),
        "tfloop-classifier",
        f"no demo model found (run `make demo` first for the trained one): the demo architecture, {backbone} "
        f"at {DEMO_IMAGE_SIZE} px with the {len(DEMO_CLASSES)} demo labels, untrained weights",
    )


class InProcess:
    """The SavedModel's ``serving_default`` called in this process, the way a server without HTTP would."""

    def __init__(self, version_dir: str, images: list[bytes]) -> None:
        import tensorflow as tf

        self._tf = tf
        self.images = images
        self.signature = tf.saved_model.load(version_dir).signatures["serving_default"]
        self._batches: dict[int, Any] = {}
        for batch_size in BATCH_SIZES:
            self.call(batch_size)

    def call(self, batch_size: int) -> None:
        batch = self._batches.get(batch_size)
        if batch is None:
            batch = self._tf.constant([self.images[i % len(self.images)] for i in range(batch_size)])
            self._batches[batch_size] = batch
        self.signature(image_bytes=batch)

    def single(self, index: int) -> float:
        """Seconds for one call on one image (converted from bytes like a server does)."""
        started = time.perf_counter()
        self.signature(image_bytes=self._tf.constant([self.images[index % len(self.images)]]))
        return time.perf_counter() - started

    def throughput(self, batch_size: int, *, streams: int = 1, seconds: float) -> float:
        """Images/s of ``streams`` threads, each calling the model on ``batch_size`` images for a while."""
        calls = [0] * streams
        deadline = time.perf_counter() + seconds

        def work(stream: int) -> None:
            while time.perf_counter() < deadline:
                self.call(batch_size)
                calls[stream] += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(calls) * batch_size / (time.perf_counter() - started)

    def ceilings(self, *, in_flight: int, streams: int, seconds: float) -> tuple[float, float]:
        """(one call at a time at its best batch size, ``in_flight`` images shared by ``streams`` concurrent
        calls): images/s, each measured for about ``seconds``."""
        share = seconds / (len(CEILING_BATCH_SIZES) + 1)
        return (
            max(self.throughput(size, seconds=share) for size in CEILING_BATCH_SIZES),
            self.throughput(in_flight // streams, streams=streams, seconds=share),
        )


def load(url: str, bodies: list[bytes], concurrency: int, seconds: float, scratch: Path) -> dict[str, float]:
    """Drive ``url`` with ``concurrency`` keep-alive connections for ``seconds``: wrk when it is installed
    (a C load generator: it leaves the shared cores to the server under test), else a Python client."""
    if shutil.which("wrk"):
        return wrk_load(url, bodies, concurrency, seconds, scratch)
    return asyncio.run(python_load(url, bodies, concurrency, seconds))


WRK_SCRIPT = """local bodies = {%s}
local next_body = 0
request = function()
  next_body = next_body %% #bodies + 1
  return wrk.format("POST", nil, {["content-type"] = "application/json"}, bodies[next_body])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("\\nRESULT %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, scratch: Path
) -> dict[str, float]:
    script = scratch / "bodies.lua"
    if not script.exists():
        script.write_text(
            WRK_SCRIPT % ",".join(f"[==[{body.decode()}]==]" for body in bodies), encoding="utf-8"
        )
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    requests, duration_us, errors, p50_us, p99_us = map(int, line.split()[1:])
    return {
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50_us / 1000,
        "p99_ms": p99_us / 1000,
        "errors": errors,
    }


async def python_load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """A minimal HTTP/1.1 client on asyncio streams with every request pre-encoded (used without wrk)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [
        (
            f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    latencies: list[float] = []
    errors = 0
    deadline = 0.0

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        return status

    async def worker(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            try:
                await exchange(reader, writer, requests[0])  # connect and warm up outside the timing
            except BaseException:
                await warmed.abort()  # the other workers and the timer fail instead of waiting forever
                raise
            await warmed.wait()
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                status = await exchange(reader, writer, requests[index % len(requests)])
                latencies.append(time.perf_counter() - started)
                errors += status != 200
                index += concurrency
        finally:
            writer.close()

    warmed = asyncio.Barrier(concurrency + 1)
    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await warmed.wait()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "errors": errors,
    }


def grpc_request(name: str, image: bytes) -> bytes:
    """A serialized TF Serving ``PredictRequest``: one image as ``image_bytes`` of ``serving_default``."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["image_bytes"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]
            ),
            string_val=[image],
        )
    )
    return request.SerializeToString()


PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"


async def grpc_load_async(
    target: str, requests: list[bytes], concurrency: int, seconds: float
) -> dict[str, float]:
    """``concurrency`` callers on one channel (as a TF Serving client shares one), pre-serialized requests."""
    import grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        predict = channel.unary_unary(PREDICT_METHOD)  # bytes in, bytes out: the client's CPU stays small
        await asyncio.gather(*(predict(requests[i % len(requests)], timeout=30) for i in range(concurrency)))
        deadline = time.perf_counter() + seconds

        async def caller(index: int) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await predict(requests[index % len(requests)], timeout=30)
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError:
                    errors += 1
                index += concurrency

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "errors": errors,
        "client_cores": cpu / elapsed,  # the load generator's share of the shared cores
    }


def grpc_load(target: str, requests: Path, concurrency: int, seconds: float) -> dict[str, float]:
    """gRPC load from a separate process (its own GIL and event loop); its JSON result."""
    command = [
        sys.executable,
        __file__,
        "--grpc-load",
        target,
        str(requests),
        str(concurrency),
        f"{seconds:g}",
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 120).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_grpc_load(target: str, requests_file: str, concurrency: str, seconds: str) -> None:
    requests = json.loads(Path(requests_file).read_text())
    bodies = [base64.b64decode(item) for item in requests]
    print(json.dumps(asyncio.run(grpc_load_async(target, bodies, int(concurrency), float(seconds)))))


def batch_stats(metrics_url: str) -> tuple[float, float]:
    """(model calls, images) so far, from the server's batch-size histogram."""
    import httpx

    text = httpx.get(metrics_url, timeout=10).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("tfloop_batch")
    }
    return values.get("tfloop_batch_size_count", 0.0), values.get("tfloop_batch_size_sum", 0.0)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited: {process.stderr.read().decode()[-2000:] if process.stderr else ''}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def run_naive_server(port: int, version_dir: str, name: str) -> None:
    """One model call per request: FastAPI runs the sync endpoint in its thread pool, no batching."""
    import tensorflow as tf
    import uvicorn
    from fastapi import FastAPI

    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(f"/v1/models/{name}:predict")
    async def predict(request: Request) -> dict[str, object]:
        body = await request.json()
        images = [base64.b64decode(item["b64"]) for item in body["instances"]]
        outputs = await asyncio.to_thread(lambda: signature(image_bytes=tf.constant(images)))
        return {"predictions": [{"scores": s.tolist()} for s in outputs["scores"].numpy()]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def run_bare_server(port: int) -> None:
    """The least an HTTP server around the model does: uvicorn with serving's protocol and a bare ASGI
    callable that reads the JSON body, decodes the one image and awaits its answer from the server's own
    model manager and dynamic batcher (``build_services``, the same settings); no FastAPI, checks, metrics,
    prediction log or error handling. What it serves is what the HTTP plumbing leaves of the ceiling."""
    import uvicorn

    from serving.model import ImageJob
    from serving.server import head_joining_protocol
    from serving.services import build_services
    from serving.settings import ServingSettings

    services = build_services(ServingSettings())

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await services.batcher.start()
            await asyncio.to_thread(services.manager.refresh)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await services.batcher.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/healthz":
            answer = b"ok"
        else:
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            image = base64.b64decode(json.loads(b"".join(chunks))["instances"][0]["b64"])
            services.in_flight.enter()
            try:
                prediction = await services.batcher.submit(ImageJob(services.manager.require(), image))
            finally:
                services.in_flight.leave()
            answer = json.dumps({"predictions": [prediction.outputs()]}).encode()
        headers = [(b"content-length", b"%d" % len(answer)), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http=head_joining_protocol())


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], ready_url: str) -> Iterator[None]:
    """A server process, from ready until the block ends."""
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(ready_url, process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def levels(url: str, bodies: list[bytes], seconds: float, scratch: Path) -> dict[int, dict[str, float]]:
    results = {}
    for concurrency in CONCURRENCY:
        load(url, bodies, concurrency, 1, scratch)  # warm connections and batches
        results[concurrency] = load(url, bodies, concurrency, seconds, scratch)
        print(f"  concurrency {concurrency}: {results[concurrency]}", file=sys.stderr)
    return results


def grpc_levels(target: str, requests: Path, seconds: float) -> dict[int, dict[str, float]]:
    results = {}
    for concurrency in CONCURRENCY:
        grpc_load(target, requests, concurrency, 1)  # warm the channel and batches
        results[concurrency] = grpc_load(target, requests, concurrency, seconds)
        print(f"  gRPC concurrency {concurrency}: {results[concurrency]}", file=sys.stderr)
    return results


def interleaved_grpc_single(target: str, requests: list[bytes], model: InProcess, count: int) -> float:
    """p50 seconds of a gRPC Predict at concurrency 1, taken in turn with in-process calls (whose p50
    :func:`interleaved_single` reports)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        predict = channel.unary_unary(PREDICT_METHOD)
        for index in range(10):
            predict(requests[index % len(requests)], timeout=30)
        served = []
        for index in range(count):
            model.single(index)
            started = time.perf_counter()
            predict(requests[index % len(requests)], timeout=30)
            served.append(time.perf_counter() - started)
    return statistics.median(served)


def interleaved_single(url: str, bodies: list[bytes], model: InProcess, count: int) -> tuple[float, float]:
    """p50 seconds of (in-process call, HTTP request at concurrency 1), taken turn about so both see the
    same machine: a noisy neighbour slows both alike."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    headers = {"content-type": "application/json"}

    def request(index: int) -> float:
        started = time.perf_counter()
        connection.request("POST", parts.path, body=bodies[index % len(bodies)], headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
        return time.perf_counter() - started

    for index in range(10):
        request(index)
        model.single(index)
    served, direct = [], []
    for index in range(count):
        direct.append(model.single(index))
        served.append(request(index))
    connection.close()
    return statistics.median(direct), statistics.median(served)


def alternate(
    measure_ceiling: Callable[[], tuple[float, float]],
    measure_server: Callable[[], tuple[float, float, float, float]],
    rounds: int,
) -> list[tuple[tuple[float, float], tuple[float, float, float, float]]]:
    """(ceilings, (server req/s, mean batch, gRPC req/s, bare server req/s)) pairs, measured in turn
    ``rounds`` times."""
    pairs = []
    for round_index in range(rounds):
        pair = (measure_ceiling(), measure_server())
        print(f"  round {round_index + 1}: ceilings {pair[0]}, server {pair[1]}", file=sys.stderr)
        pairs.append(pair)
    return pairs


def prediction_log_rounds(
    env: dict[str, str], predict_url: str, bodies: list[bytes], args: argparse.Namespace, scratch: Path
) -> list[tuple[float, float]]:
    """(req/s with the prediction log on, req/s with it off) at concurrency 32, per round: two servers
    side by side, the same settings but for the log (and the review queue and shadow it feeds), driven in
    turn (on-off, then off-on, so that neither always goes first). The difference sought (3%) is smaller
    than the shared machine's drift over a minute, so the rounds are many: adjacent blocks see the same
    machine. The log's cost comes in bursts (a flush every ``prediction_log_flush_s``) that only some
    blocks contain, so the headline is the ratio of the total requests served, not a median that would
    leave the flush blocks out."""
    off_port = free_port()
    off_env = {
        **env,
        "TFLOOP_SERVE_PORT": str(off_port),
        "TFLOOP_SERVE_GRPC_PORT": "0",
        "TFLOOP_SERVE_FEEDBACK_URI": str(scratch / "feedback-off"),
        "TFLOOP_SERVE_PREDICTION_LOG": "false",
        "TFLOOP_SERVE_REVIEW_MAX_ITEMS": "0",
        "TFLOOP_SERVE_SHADOW_SAMPLE": "0",
    }
    on_env = {**env, "TFLOOP_SERVE_PORT": str(free_port()), "TFLOOP_SERVE_GRPC_PORT": "0"}
    on_url = predict_url.replace(env["TFLOOP_SERVE_PORT"], on_env["TFLOOP_SERVE_PORT"], 1)
    off_url = predict_url.replace(env["TFLOOP_SERVE_PORT"], str(off_port), 1)
    print("prediction log on vs off ...", file=sys.stderr)
    pairs = []
    with (
        running([sys.executable, "-m", "serving"], on_env, on_url.split("/v1/")[0] + "/readyz"),
        running([sys.executable, "-m", "serving"], off_env, off_url.split("/v1/")[0] + "/readyz"),
    ):
        for url in (on_url, off_url):  # warm both up
            load(url, bodies, IN_FLIGHT, 1.0, scratch)
        for round_index in range(args.log_rounds):
            order = (on_url, off_url) if round_index % 2 == 0 else (off_url, on_url)
            rps = {url: load(url, bodies, IN_FLIGHT, args.log_seconds, scratch)["rps"] for url in order}
            pairs.append((rps[on_url], rps[off_url]))
            print(f"  round {round_index + 1}: on {rps[on_url]:.1f}, off {rps[off_url]:.1f}", file=sys.stderr)
    return pairs


def write_section(text: str) -> None:
    path = REPO / "BENCHMARKS.md"
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in current and END in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        current = head + section + tail
    else:
        current = current.rstrip() + "\n\n" + section + "\n"
    path.write_text(current, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base")
    parser.add_argument("--model-name", default="tfloop-classifier")
    parser.add_argument("--seconds", type=float, default=8, help="Seconds of load per concurrency level.")
    parser.add_argument("--singles", type=int, default=300, help="Request pairs of the concurrency-1 target.")
    parser.add_argument("--rounds", type=int, default=7, help="Alternating ceiling/server rounds at c=32.")
    parser.add_argument(
        "--round-seconds", type=float, default=4, help="Seconds of each server block (and of both ceilings)."
    )
    parser.add_argument(
        "--log-rounds", type=int, default=16, help="Alternating prediction log on/off rounds at c=32."
    )
    parser.add_argument(
        "--log-seconds", type=int, default=3, help="Whole seconds of each block of the log on/off rounds."
    )
    parser.add_argument(
        "--naive-server", nargs=3, metavar=("PORT", "VERSION_DIR", "NAME"), help=argparse.SUPPRESS
    )
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpc_load:
        run_grpc_load(*args.grpc_load)
        return
    from serving.model import configure_tensorflow_threads
    from serving.settings import ServingSettings
    from storage import versions

    # The server's settings (its defaults, or TFLOOP_SERVE_* from the environment it inherits); the
    # in-process ceiling and the naive server get TensorFlow's threads as the server sizes them.
    served_settings = ServingSettings()
    threads = served_settings.tensorflow_threads()
    if not configure_tensorflow_threads(intra_op=threads[0], inter_op=threads[1]):
        raise SystemExit("TensorFlow started before its threads could be sized")
    if args.naive_server:
        port, version_dir, name = args.naive_server
        run_naive_server(int(port), version_dir, name)
        return
    if args.bare_server:
        run_bare_server(args.bare_server)
        return

    workers = served_settings.batch_workers
    generator = (
        "wrk (C, one thread)"
        if shutil.which("wrk")
        else "a Python asyncio client (install wrk for a cheaper one: `make system-deps`)"
    )
    with tempfile.TemporaryDirectory(prefix="tfloop-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        base, name, description = find_or_export_model(args, scratch)
        version = versions.latest_version(base, name)
        version_dir = versions.version_uri(base, name, version)
        size = json.loads((Path(version_dir) / "tfloop.json").read_text())["image_size"]
        images = sample_images(32, size)
        bodies = [json.dumps({"instances": [{"b64": base64.b64encode(i).decode()}]}).encode() for i in images]
        print("in-process ...", file=sys.stderr)
        model = InProcess(version_dir, images)
        sweep = {b: model.throughput(b, seconds=2) for b in BATCH_SIZES}
        print(f"  one call at a time: {sweep}", file=sys.stderr)

        port, grpc_port = free_port(), free_port()
        grpc_target = f"127.0.0.1:{grpc_port}"
        grpc_requests = [grpc_request(name, image) for image in images]
        grpc_file = scratch / "grpc-requests.json"
        grpc_file.write_text(json.dumps([base64.b64encode(r).decode() for r in grpc_requests]))
        env = {
            **os.environ,
            "TFLOOP_SERVE_MODEL_BASE": base,
            "TFLOOP_SERVE_MODEL_NAME": name,
            "TFLOOP_SERVE_FEEDBACK_URI": str(scratch / "feedback"),
            "TFLOOP_SERVE_PORT": str(port),
            "TFLOOP_SERVE_GRPC_PORT": str(grpc_port),
            "TFLOOP_SERVE_HOST": "127.0.0.1",
            "TFLOOP_SERVE_LOG_LEVEL": "warning",
        }
        predict_url = f"http://127.0.0.1:{port}/v1/models/{name}:predict"
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        print("tfloop server ...", file=sys.stderr)
        bare_port = free_port()
        bare_url = f"http://127.0.0.1:{bare_port}/v1/models/{name}:predict"
        bare_env = {**env, "TFLOOP_SERVE_PORT": str(bare_port), "TFLOOP_SERVE_GRPC_PORT": "0"}
        with (
            running([sys.executable, "-m", "serving"], env, f"http://127.0.0.1:{port}/readyz"),
            running(
                [sys.executable, __file__, "--bare-server", str(bare_port)],
                bare_env,
                f"http://127.0.0.1:{bare_port}/healthz",
            ),
        ):
            load(bare_url, bodies, IN_FLIGHT, 1, scratch)  # warm its connections and batches
            served = levels(predict_url, bodies, args.seconds, scratch)
            served_grpc = grpc_levels(grpc_target, grpc_file, args.seconds)
            direct_single, served_single = interleaved_single(predict_url, bodies, model, args.singles)
            grpc_single = interleaved_grpc_single(grpc_target, grpc_requests, model, args.singles)

            turns = itertools.count()

            def server_block() -> tuple[float, float, float, float]:
                """tfloop over REST, over gRPC, and the bare server, in an order that turns by one each
                round, so that none always runs first after the ceiling on a drifting machine."""
                readings: dict[str, float] = {}

                def rest() -> None:
                    calls, images_before = batch_stats(metrics_url)
                    served_block = load(predict_url, bodies, IN_FLIGHT, args.round_seconds, scratch)
                    readings["rest"] = served_block["rps"]
                    calls_after, images_after = batch_stats(metrics_url)
                    readings["batch"] = (images_after - images_before) / max(1.0, calls_after - calls)

                def grpc() -> None:
                    readings["grpc"] = grpc_load(grpc_target, grpc_file, IN_FLIGHT, args.round_seconds)["rps"]

                def bare() -> None:
                    readings["bare"] = load(bare_url, bodies, IN_FLIGHT, args.round_seconds, scratch)["rps"]

                blocks = [rest, grpc, bare]
                shift = next(turns) % len(blocks)
                for block in blocks[shift:] + blocks[:shift]:
                    block()
                return readings["rest"], readings["batch"], readings["grpc"], readings["bare"]

            rounds = alternate(
                lambda: model.ceilings(in_flight=IN_FLIGHT, streams=workers, seconds=args.round_seconds),
                server_block,
                args.rounds,
            )
        log_rounds = prediction_log_rounds(env, predict_url, bodies, args, scratch)
        naive_port = free_port()
        print("naive server ...", file=sys.stderr)
        naive_url = f"http://127.0.0.1:{naive_port}/v1/models/{name}:predict"
        with running(
            [sys.executable, __file__, "--naive-server", str(naive_port), version_dir, name],
            dict(os.environ),
            f"http://127.0.0.1:{naive_port}/healthz",
        ):
            naive = levels(naive_url, bodies, args.seconds, scratch)

    write_section(
        report(
            args=args,
            description=description,
            name=name,
            generator=generator,
            workers=workers,
            server_summary=(
                f"batches of up to {served_settings.max_batch_size}, {served_settings.max_batch_wait_ms:g} "
                f"ms longest wait, {workers} batch workers, TensorFlow intra-op threads {threads[0]} and "
                f"inter-op threads {threads[1]}"
            ),
            sweep=sweep,
            served=served,
            served_grpc=served_grpc,
            naive=naive,
            rounds=rounds,
            log_rounds=log_rounds,
            single=(direct_single, served_single),
            grpc_single=grpc_single,
        )
    )


def report(
    *,
    args: argparse.Namespace,
    description: str,
    name: str,
    generator: str,
    workers: int,
    server_summary: str,
    sweep: dict[int, float],
    served: dict[int, dict[str, float]],
    served_grpc: dict[int, dict[str, float]],
    naive: dict[int, dict[str, float]],
    rounds: list[tuple[tuple[float, float], tuple[float, float, float, float]]],
    log_rounds: list[tuple[float, float]],
    single: tuple[float, float],
    grpc_single: float,
) -> str:
    ratio_one = statistics.median(server / ceilings[0] for ceilings, (server, *_) in rounds)
    ratio_best = statistics.median(server / max(ceilings) for ceilings, (server, *_) in rounds)
    ceiling_one = statistics.median(ceilings[0] for ceilings, _ in rounds)
    ceiling_many = statistics.median(ceilings[1] for ceilings, _ in rounds)
    server_32 = statistics.median(server for _, (server, *_) in rounds)
    grpc_ratio = statistics.median(grpc / max(ceilings) for ceilings, (_, _, grpc, _) in rounds)
    grpc_32 = statistics.median(grpc for _, (_, _, grpc, _) in rounds)
    bare_ratio = statistics.median(bare / max(ceilings) for ceilings, (*_, bare) in rounds)
    of_bare = statistics.median(server / bare for _, (server, _, _, bare) in rounds)
    log_ratios = [on / off for on, off in log_rounds]
    log_ratio = sum(on for on, _ in log_rounds) / sum(off for _, off in log_rounds)
    log_q1, _, log_q3 = statistics.quantiles(log_ratios, n=4) if len(log_ratios) > 1 else (log_ratio,) * 3
    log_rows = "\n".join(
        f"| {i + 1} | {on:.1f} | {off:.1f} | {on / off:.2f} |" for i, (on, off) in enumerate(log_rounds)
    )
    p50_gap = (single[1] - single[0]) * 1000
    grpc_gap = (grpc_single - single[0]) * 1000
    grpc_rows = "\n".join(
        f"| {c} | {g['rps']:.1f} | {g['p50_ms']:.1f} | {g['p99_ms']:.1f} | {g['errors']:.0f} | "
        f"{g['client_cores']:.2f} |"
        for c, g in served_grpc.items()
    )
    ahead = all(served[c]["rps"] > naive[c]["rps"] for c in (8, 32))
    rows = "\n".join(
        f"| {c} | {served[c]['rps']:.1f} | {served[c]['p50_ms']:.1f} | {served[c]['p99_ms']:.1f} | "
        f"{naive[c]['rps']:.1f} | {naive[c]['p50_ms']:.1f} | {naive[c]['p99_ms']:.1f} | "
        f"{served[c]['errors'] + naive[c]['errors']:.0f} |"
        for c in CONCURRENCY
    )
    split = f"{workers} x {IN_FLIGHT // workers}"
    round_rows = "\n".join(
        f"| {i + 1} | {one:.1f} | {many:.1f} | {server:.1f} | {batch:.1f} | {server / one:.2f} | "
        f"{server / max(one, many):.2f} | {grpc:.1f} | {grpc / max(one, many):.2f} | {bare:.1f} | "
        f"{bare / max(one, many):.2f} |"
        for i, ((one, many), (server, batch, grpc, bare)) in enumerate(rounds)
    )
    round_header = (
        f"| round | ceiling, one call (img/s) | ceiling, {split} (img/s) "
        f"| server c={IN_FLIGHT} (req/s) | mean batch | ratio to one call | ratio to the faster "
        f"| gRPC c={IN_FLIGHT} (req/s) | gRPC ratio to the faster | bare c={IN_FLIGHT} (req/s) "
        f"| bare ratio to the faster |"
    )
    home = f"TFLOOP_HOME={os.environ['TFLOOP_HOME']} " if os.environ.get("TFLOOP_HOME") else ""
    command = home + " ".join(["python benchmarks/serving.py", *sys.argv[1:]])
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    best = max(sweep, key=sweep.__getitem__)
    small, large = CEILING_BATCH_SIZES
    return f"""## Serving (`benchmarks/serving.py`)

Command: `{command}` ({time.strftime("%Y-%m-%d %H:%M")}, {platform.machine()}, {os.cpu_count()} CPUs shared
with other work, load average {load_average} at the end of the run; TensorFlow CPU).
Model: {description}. Each request is one JPEG as
`POST /v1/models/{name}:predict` with `{{"instances": [{{"b64": ...}}]}}`; {args.seconds:g} s of load per
level.
Load generator: {generator}, on the same cores as the server. The server runs with its settings
({server_summary}); the in-process model and the naive server use the same TensorFlow threads.

In-process SavedModel (`serving_default`, images/s by batch size, one call at a time):
{", ".join(f"{b}: {t:.0f}" for b, t in sweep.items())} (best: batch {best}).

| concurrency | tfloop req/s | p50 ms | p99 ms | naive req/s | naive p50 ms | naive p99 ms | errors |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Concurrency {IN_FLIGHT} against the ceiling, in {args.rounds} alternating rounds ({args.round_seconds:g} s per
block). The ceiling is the faster of two in-process readings, taken in each round: the same {IN_FLIGHT}
images in flight as {split} concurrent calls (how the server's {workers} workers call the model under this
load), and one call at a time at its best batch size (the faster of batch {small} and {large}). The
headline ratio is against that faster ceiling; the ratio to one call alone is shown beside it.

{round_header}
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{round_rows}

The bare server (last two columns; `--bare-server` of this script) is the least an HTTP server around the
model does: uvicorn with serving's protocol, a bare ASGI callable that decodes the one image and awaits it
from the server's own model manager and dynamic batcher, with the same settings, and nothing else (no
FastAPI, checks, metrics, prediction log or error handling). It runs beside the tfloop server, driven the
same way in the same rounds (the three server blocks of a round take turns at going first): what it
reaches is what the HTTP plumbing and the load generator leave of the ceiling on this machine,
**{bare_ratio:.2f}**, and tfloop serves **{of_bare:.2f}** of what it serves.

gRPC (`tensorflow.serving.PredictionService/Predict`, one JPEG as `image_bytes` of `serving_default`, the
same server process and batcher), driven by an asyncio gRPC client in its own process, all callers on one
channel (last column: the client's CPU seconds per second, its share of the shared cores):

| concurrency | gRPC req/s | p50 ms | p99 ms | errors | client CPU (cores) |
| --- | --- | --- | --- | --- | --- |
{grpc_rows}

The prediction log (on by default, and on in every server reading above: each prediction's hash,
version, top-k, margin, size and format go to an in-memory list, written out as one batch every few
seconds by a background thread, with the review queue's low-confidence images) against the same server
with the log, the review queue and shadow predictions off; two servers side by side, driven in turn at
concurrency {IN_FLIGHT} in {args.log_rounds} rounds of {args.log_seconds:g} s blocks, the order alternating
by round (many rounds, because the machine drifts by more than the 3% sought within a minute, and
adjacent blocks see the same machine). The headline is the requests served with the log on over those
served with it off, all rounds together: the log's cost comes in bursts (one flush every few seconds)
that only some blocks contain, and a median of the rounds would leave them out. On / off:
**{log_ratio:.3f}**; per round, the middle half lies from {log_q1:.3f} to {log_q3:.3f}.

| round | log on (req/s) | log off (req/s) | on / off |
| --- | --- | --- | --- |
{log_rows}

Concurrency 1, one in-process call and one HTTP request taken in turn ({args.singles} of each): p50
{single[0] * 1000:.1f} ms in-process, {single[1] * 1000:.1f} ms through the server; the same with gRPC
Predict calls: {grpc_single * 1000:.1f} ms.

Targets:
- concurrency {IN_FLIGHT} at >= 0.85 of the ceiling (median of the rounds): **{ratio_best:.2f}**
  ({"met" if ratio_best >= 0.85 else "MISSED"}) against the faster of {split} concurrent calls and one call
  ({server_32:.0f} req/s against {ceiling_many:.0f} img/s); {ratio_one:.2f} against one call at a time alone
  ({ceiling_one:.0f} img/s), the looser reading;
- p50 at concurrency 1 within 5 ms of an in-process single call: **{p50_gap:+.1f} ms**
  ({"met" if p50_gap <= 5 else "MISSED"});
- ahead of the naive server at concurrency 8 and 32: **{"yes" if ahead else "NO"}**;
- gRPC at concurrency {IN_FLIGHT} at >= 0.9 of the faster ceiling: **{grpc_ratio:.2f}**
  ({"met" if grpc_ratio >= 0.9 else "MISSED"}; {grpc_32:.0f} req/s);
- gRPC p50 at concurrency 1 within 2 ms of an in-process single call: **{grpc_gap:+.1f} ms**
  ({"met" if grpc_gap <= 2 else "MISSED"});
- the prediction log costs at most 3% at concurrency {IN_FLIGHT} (on / off, all rounds together):
  **{log_ratio:.3f}** ({"met" if log_ratio >= 0.97 else "MISSED"}; middle half of the rounds {log_q1:.3f} to
  {log_q3:.3f}).
"""


if __name__ == "__main__":
    main()
