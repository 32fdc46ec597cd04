"""Serving benchmark: requests/s and p50/p99 latency of the tfloop server at concurrency 1, 8 and 32,
beside the same SavedModel called in-process at its best batch size (the ceiling on this machine) and
beside a naive server that runs one model call per request. Writes its section of BENCHMARKS.md.

Usage: ``python benchmarks/serving.py [--requests 300] [--model-base DIR --model-name NAME]``. Without a
model base it uses the demo model (``$TFLOOP_HOME/models/tfloop-classifier``) when one exists, else it
exports a small MobileNetV2 (alpha 0.35, 96 px, weights=None) into a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import Request  # resolved from module globals by FastAPI (postponed annotations)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BEGIN, END = "<!-- BEGIN serving -->", "<!-- END serving -->"
CONCURRENCY = (1, 8, 32)


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
    demo_base = str(home / "models")
    if versions.latest_version(demo_base, "tfloop-classifier") is not None:
        return demo_base, "tfloop-classifier", "the demo model (tfloop-classifier)"
    import keras

    from export.publish import publish_version
    from export.savedmodel import export_saved_model

    backbone = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
    )
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    outputs = keras.layers.Dense(5, activation="softmax")(backbone(x))
    labels = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    export_saved_model(keras.Model(inputs, outputs), scratch / "export", labels=labels, model_name="bench")
    publish_version(scratch / "export", base=str(scratch / "models"), model_name="bench")
    return (
        str(scratch / "models"),
        "bench",
        "no demo model found: MobileNetV2 alpha 0.35, weights=None, 96 px, 5 labels",
    )


def in_process(version_dir: str, images: list[bytes]) -> dict[str, object]:
    import tensorflow as tf

    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    single = tf.constant(images[:1])
    for _ in range(5):
        signature(image_bytes=single)
    latencies = []
    for i in range(100):
        started = time.perf_counter()
        signature(image_bytes=tf.constant([images[i % len(images)]]))
        latencies.append(time.perf_counter() - started)
    throughput = {}
    for batch_size in (1, 8, 16, 32, 64):
        batch = tf.constant([images[i % len(images)] for i in range(batch_size)])
        signature(image_bytes=batch)
        calls = max(3, 256 // batch_size)
        started = time.perf_counter()
        for _ in range(calls):
            signature(image_bytes=batch)
        throughput[batch_size] = calls * batch_size / (time.perf_counter() - started)
    best = max(throughput, key=throughput.__getitem__)
    return {
        "single_p50_ms": statistics.median(latencies) * 1000,
        "throughput": throughput,
        "best_batch": best,
        "ceiling": throughput[best],
    }


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


def serve_and_measure(
    command: list[str],
    env: dict[str, str],
    port: int,
    ready_path: str,
    url: str,
    bodies: list[bytes],
    total: int,
) -> dict[int, dict[str, float]]:
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}{ready_path}", process)
        results = {}
        for concurrency in CONCURRENCY:
            results[concurrency] = asyncio.run(load(url, bodies, concurrency, total))
            print(f"  concurrency {concurrency}: {results[concurrency]}", file=sys.stderr)
        return results
    finally:
        process.terminate()
        process.wait(timeout=30)


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
    parser.add_argument("--requests", type=int, default=300, help="Requests per concurrency level.")
    parser.add_argument(
        "--naive-server", nargs=3, metavar=("PORT", "VERSION_DIR", "NAME"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.naive_server:
        port, version_dir, name = args.naive_server
        run_naive_server(int(port), version_dir, name)
        return

    from storage import versions

    with tempfile.TemporaryDirectory(prefix="tfloop-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        base, name, description = find_or_export_model(args, scratch)
        version = versions.latest_version(base, name)
        version_dir = versions.version_uri(base, name, version)
        size = json.loads((Path(version_dir) / "tfloop.json").read_text())["image_size"]
        images = sample_images(32, size)
        bodies = [json.dumps({"instances": [{"b64": base64.b64encode(i).decode()}]}).encode() for i in images]
        print("in-process ...", file=sys.stderr)
        ceiling = in_process(version_dir, images)
        print(f"  {ceiling}", file=sys.stderr)

        port = free_port()
        env = {
            **os.environ,
            "TFLOOP_SERVE_MODEL_BASE": base,
            "TFLOOP_SERVE_MODEL_NAME": name,
            "TFLOOP_SERVE_FEEDBACK_URI": str(scratch / "feedback"),
            "TFLOOP_SERVE_PORT": str(port),
            "TFLOOP_SERVE_HOST": "127.0.0.1",
            "TFLOOP_SERVE_LOG_LEVEL": "warning",
            "TFLOOP_SERVE_MAX_BATCH_SIZE": str(max(32, int(ceiling["best_batch"]))),
        }
        predict_url = f"http://127.0.0.1:{port}/v1/models/{name}:predict"
        print("tfloop server ...", file=sys.stderr)
        served = serve_and_measure(
            [sys.executable, "-m", "serving"], env, port, "/readyz", predict_url, bodies, args.requests
        )
        naive_port = free_port()
        print("naive server ...", file=sys.stderr)
        naive = serve_and_measure(
            [sys.executable, __file__, "--naive-server", str(naive_port), version_dir, name],
            dict(os.environ),
            naive_port,
            "/healthz",
            f"http://127.0.0.1:{naive_port}/v1/models/{name}:predict",
            bodies,
            args.requests,
        )

    best = float(ceiling["ceiling"])  # type: ignore[arg-type]
    single = float(ceiling["single_p50_ms"])  # type: ignore[arg-type]
    ratio = served[32]["rps"] / best
    at_32 = float(ceiling["throughput"][32])  # type: ignore[index]
    p50_gap = served[1]["p50_ms"] - single
    ahead = all(served[c]["rps"] > naive[c]["rps"] for c in (8, 32))
    rows = "\n".join(
        f"| {c} | {served[c]['rps']:.1f} | {served[c]['p50_ms']:.1f} | {served[c]['p99_ms']:.1f} | "
        f"{naive[c]['rps']:.1f} | {naive[c]['p50_ms']:.1f} | {naive[c]['p99_ms']:.1f} | "
        f"{served[c]['errors'] + naive[c]['errors']:.0f} |"
        for c in CONCURRENCY
    )
    batches = ", ".join(f"{b}: {t:.1f}" for b, t in ceiling["throughput"].items())  # type: ignore[attr-defined]
    command = " ".join(["python benchmarks/serving.py", *sys.argv[1:]])
    load_average = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = f"""## Serving (`benchmarks/serving.py`)

Command: `{command}` ({time.strftime("%Y-%m-%d %H:%M")}, {platform.machine()}, {os.cpu_count()} CPUs shared
with other work, load average {load_average} at the end of the run; TensorFlow CPU).
Model: {description}. Each request is one JPEG as
`POST /v1/models/{name}:predict` with `{{"instances": [{{"b64": ...}}]}}`; {args.requests} requests per level,
the load generator (keep-alive HTTP/1.1 on asyncio streams, pre-encoded requests) runs on the same machine.

In-process SavedModel (`serving_default`, images/s by batch size): {batches}.
Ceiling: {best:.1f} images/s at batch {ceiling["best_batch"]}; single call p50 {single:.1f} ms.
With 32 clients sending one image each, no batch can hold more than 32 images: in-process at batch 32 runs
{at_32:.1f} images/s, and concurrency 32 reaches {served[32]["rps"] / at_32:.2f} of that.

| concurrency | tfloop req/s | p50 ms | p99 ms | naive req/s | naive p50 ms | naive p99 ms | errors |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Targets: concurrency 32 at >= 0.85 of the ceiling: **{ratio:.2f}** ({"met" if ratio >= 0.85 else "MISSED"});
p50 at concurrency 1 within 5 ms of an in-process single call: **{p50_gap:+.1f} ms**
({"met" if p50_gap <= 5 else "MISSED"}); ahead of the naive server at concurrency 8 and 32:
**{"yes" if ahead else "NO"}**.
"""
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
