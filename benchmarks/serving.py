"""Serving benchmark: requests/s and p50/p99 latency of the tfloop server at concurrency 1, 8 and 32,
beside the same SavedModel called in-process at its best batch size (the ceiling on this machine) and
beside a naive server that runs one model call per request. Writes its section of BENCHMARKS.md.

Usage: ``python benchmarks/serving.py [--requests 600] [--rounds 3] [--model-base DIR --model-name NAME]``.
Without a model base it uses the demo model when one exists (``make demo`` leaves it in
``$TFLOOP_HOME/demo-run/models``; ``$TFLOOP_HOME/models`` is also tried), else it exports the demo
model's architecture (EfficientNetB0 at 48 px, the six demo labels, untrained: the time of a call does not
depend on the weights) into a temporary folder.

The machine is shared and noisy, so the two targets are measured as ratios within one time window: the
concurrency-1 target alternates one in-process call and one HTTP request, and the concurrency-32 target
alternates in-process ceiling blocks and server blocks for ``--rounds`` rounds (medians reported).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
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
BATCH_SIZES = (1, 8, 16, 32, 64)
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

    def throughput(self, batch_size: int, *, streams: int = 1, images: int = 384) -> float:
        """Images/s with ``streams`` threads each calling the model on ``batch_size`` images in a loop."""
        calls = max(2, images // (batch_size * streams))

        def work() -> None:
            for _ in range(calls):
                self.call(batch_size)

        threads = [threading.Thread(target=work) for _ in range(streams)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return calls * batch_size * streams / (time.perf_counter() - started)

    def sweep(self, *, streams: int) -> dict[int, float]:
        return {batch_size: self.throughput(batch_size, streams=streams) for batch_size in BATCH_SIZES}


async def load(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict[str, float]:
    """Drive ``url`` with ``concurrency`` keep-alive connections, ``total`` requests in all.

    A minimal HTTP/1.1 client on asyncio streams with every request pre-encoded: the load generator shares
    the machine's cores with the server, so the cheaper each request is to send, the more of the CPU the
    server under test gets (the same client drives the naive server).
    """
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
    counter = iter(range(total))

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

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            try:
                await exchange(reader, writer, requests[0])  # connect and warm up outside the timing
            except BaseException:
                await warmed.abort()  # the other workers and the timer fail instead of waiting forever
                raise
            await warmed.wait()
            for index in counter:
                started = time.perf_counter()
                status = await exchange(reader, writer, requests[index % len(requests)])
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            writer.close()

    warmed = asyncio.Barrier(concurrency + 1)
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await warmed.wait()
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "errors": errors,
    }


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


def levels(url: str, bodies: list[bytes], total: int) -> dict[int, dict[str, float]]:
    results = {}
    for concurrency in CONCURRENCY:
        asyncio.run(
            load(url, bodies, concurrency, min(total, 4 * concurrency))
        )  # warm connections and batches
        results[concurrency] = asyncio.run(load(url, bodies, concurrency, total))
        print(f"  concurrency {concurrency}: {results[concurrency]}", file=sys.stderr)
    return results


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
    measure_ceiling: Callable[[], tuple[float, float]], measure_server: Callable[[], float], rounds: int
) -> list[tuple[tuple[float, float], float]]:
    """(ceiling, server) pairs, measured in turn ``rounds`` times."""
    pairs = []
    for round_index in range(rounds):
        pair = (measure_ceiling(), measure_server())
        print(f"  round {round_index + 1}: ceilings {pair[0]}, server {pair[1]:.1f}", file=sys.stderr)
        pairs.append(pair)
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
    parser.add_argument("--requests", type=int, default=600, help="Requests per concurrency level.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating ceiling/server rounds at c=32.")
    parser.add_argument(
        "--naive-server", nargs=3, metavar=("PORT", "VERSION_DIR", "NAME"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.naive_server:
        port, version_dir, name = args.naive_server
        run_naive_server(int(port), version_dir, name)
        return

    from serving.settings import ServingSettings
    from storage import versions

    workers = int(ServingSettings.model_fields["batch_workers"].default)
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
        sweep_one = model.sweep(streams=1)
        sweep_many = model.sweep(streams=workers)
        best_one = max(sweep_one, key=sweep_one.__getitem__)
        best_many = max(sweep_many, key=sweep_many.__getitem__)
        print(f"  one call at a time: {sweep_one}\n  {workers} at a time: {sweep_many}", file=sys.stderr)

        port = free_port()
        env = {
            **os.environ,
            "TFLOOP_SERVE_MODEL_BASE": base,
            "TFLOOP_SERVE_MODEL_NAME": name,
            "TFLOOP_SERVE_FEEDBACK_URI": str(scratch / "feedback"),
            "TFLOOP_SERVE_PORT": str(port),
            "TFLOOP_SERVE_HOST": "127.0.0.1",
            "TFLOOP_SERVE_LOG_LEVEL": "warning",
        }
        predict_url = f"http://127.0.0.1:{port}/v1/models/{name}:predict"
        print("tfloop server ...", file=sys.stderr)
        with running([sys.executable, "-m", "serving"], env, f"http://127.0.0.1:{port}/readyz"):
            served = levels(predict_url, bodies, args.requests)
            direct_single, served_single = interleaved_single(predict_url, bodies, model, args.requests)
            rounds = alternate(
                lambda: (model.throughput(best_one), model.throughput(best_many, streams=workers)),
                lambda: asyncio.run(load(predict_url, bodies, 32, args.requests))["rps"],
                args.rounds,
            )
        naive_port = free_port()
        print("naive server ...", file=sys.stderr)
        naive_url = f"http://127.0.0.1:{naive_port}/v1/models/{name}:predict"
        with running(
            [sys.executable, __file__, "--naive-server", str(naive_port), version_dir, name],
            dict(os.environ),
            f"http://127.0.0.1:{naive_port}/healthz",
        ):
            naive = levels(naive_url, bodies, args.requests)

    ratio_one = statistics.median(server / ceilings[0] for ceilings, server in rounds)
    ratio_many = statistics.median(server / ceilings[1] for ceilings, server in rounds)
    ceiling_one = statistics.median(ceilings[0] for ceilings, _ in rounds)
    ceiling_many = statistics.median(ceilings[1] for ceilings, _ in rounds)
    server_32 = statistics.median(server for _, server in rounds)
    p50_gap = (served_single - direct_single) * 1000
    ahead = all(served[c]["rps"] > naive[c]["rps"] for c in (8, 32))
    rows = "\n".join(
        f"| {c} | {served[c]['rps']:.1f} | {served[c]['p50_ms']:.1f} | {served[c]['p99_ms']:.1f} | "
        f"{naive[c]['rps']:.1f} | {naive[c]['p50_ms']:.1f} | {naive[c]['p99_ms']:.1f} | "
        f"{served[c]['errors'] + naive[c]['errors']:.0f} |"
        for c in CONCURRENCY
    )
    round_rows = "\n".join(
        f"| {i + 1} | {one:.1f} | {many:.1f} | {server:.1f} | {server / one:.2f} | {server / many:.2f} |"
        for i, ((one, many), server) in enumerate(rounds)
    )
    round_header = (
        f"| round | ceiling, 1 call (img/s) | ceiling, {workers} calls (img/s) | server c=32 (req/s) "
        f"| ratio, 1 call | ratio, {workers} calls |"
    )
    home = f"TFLOOP_HOME={os.environ['TFLOOP_HOME']} " if os.environ.get("TFLOOP_HOME") else ""
    command = home + " ".join(["python benchmarks/serving.py", *sys.argv[1:]])
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = f"""## Serving (`benchmarks/serving.py`)

Command: `{command}` ({time.strftime("%Y-%m-%d %H:%M")}, {platform.machine()}, {os.cpu_count()} CPUs shared
with other work, load average {load_average} at the end of the run; TensorFlow CPU).
Model: {description}. Each request is one JPEG as
`POST /v1/models/{name}:predict` with `{{"instances": [{{"b64": ...}}]}}`; {args.requests} requests per level.
The load generator (keep-alive HTTP/1.1 on asyncio streams, pre-encoded requests) runs on the same two cores
as the server. The server runs with its defaults (batches of up to 32, 5 ms wait, {workers} batch workers).

In-process SavedModel (`serving_default`, images/s by batch size), one call at a time:
{", ".join(f"{b}: {t:.0f}" for b, t in sweep_one.items())}; {workers} calls at a time (as the server's batch
workers call it): {", ".join(f"{b}: {t:.0f}" for b, t in sweep_many.items())}.

| concurrency | tfloop req/s | p50 ms | p99 ms | naive req/s | naive p50 ms | naive p99 ms | errors |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Concurrency 32 against the ceiling, in {args.rounds} alternating rounds ({args.requests} requests per server
block): the ceiling is the in-process model at its best batch size, one call at a time (batch {best_one}, the
issue's definition) and {workers} calls at a time (batch {best_many}, how the server calls it).

{round_header}
| --- | --- | --- | --- | --- | --- |
{round_rows}

Concurrency 1, one in-process call and one HTTP request taken in turn ({args.requests} of each): p50
{direct_single * 1000:.1f} ms in-process, {served_single * 1000:.1f} ms through the server.

Targets:
- concurrency 32 at >= 0.85 of the ceiling (median of the rounds): **{ratio_one:.2f}**
  ({"met" if ratio_one >= 0.85 else "MISSED"}) against one call at a time ({server_32:.0f} req/s against
  {ceiling_one:.0f} img/s); **{ratio_many:.2f}** ({"met" if ratio_many >= 0.85 else "MISSED"}) against
  {workers} calls at a time ({ceiling_many:.0f} img/s), the stricter reading;
- p50 at concurrency 1 within 5 ms of an in-process single call: **{p50_gap:+.1f} ms**
  ({"met" if p50_gap <= 5 else "MISSED"});
- ahead of the naive server at concurrency 8 and 32: **{"yes" if ahead else "NO"}**.
"""
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
