"""Serving in production topology: several real ``python -m serving`` processes on one model base and one
feedback queue (a local folder, and a bucket on the GCS emulator), requests spread round-robin with no
session affinity. Feedback on any replica, a replica killed mid-burst, promotion through ``live.json``
moving every replica, publishing moving none, pinned and labelled routes; and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import storage
from storage import versions
from storage.layout import PENDING, RECORDS
from tests import test_serving
from tests.conftest import free_port
from tests.test_serving import LABELS, NAME, image_bytes, publish

exported_model = test_serving.exported_model  # the tiny exported model (a session fixture)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
TOKEN = "replica-feedback-token"
SECRET = "replicas-share-this-secret-0123456789"
POLL_S = 0.3
MOVE_WITHIN_S = 90  # generous: a replica loads (and on GCS downloads) a version in a few seconds


@dataclass
class Replica:
    """One serving process on loopback."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@dataclass
class Cluster:
    """Replicas on one model base and one feedback queue; ``next()`` spreads requests round-robin."""

    backend: str
    base: str
    queue: str
    scratch: Path
    replicas: list[Replica]
    _turn: Iterator[int] = field(init=False)

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(range(len(self.replicas)))

    def next(self) -> Replica:
        return self.replicas[next(self._turn)]

    def live(self) -> list[Replica]:
        return [replica for replica in self.replicas if replica.process.poll() is None]


def serving_env(**values: str) -> dict[str, str]:
    """This environment without serving settings of its own, plus ``values`` as TFLOOP_SERVE_*."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TFLOOP_SERVE_") and key not in {"TFLOOP_FEEDBACK_SECRET", "PREFECT_API_URL"}
    }
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update({f"TFLOOP_SERVE_{key.upper()}": value for key, value in values.items()})
    env.setdefault("TFLOOP_SERVE_GRPC_PORT", "0")  # replicas side by side: REST only
    return env


def start_replica(env: dict[str, str], port: int, log: Path) -> Replica:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving"], env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT
        )
    return Replica(f"http://127.0.0.1:{port}", process, log)


def wait_ready(replica: Replica, *, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=replica.url, timeout=5) as http:
        while time.monotonic() < deadline:
            if replica.process.poll() is not None:
                raise AssertionError(f"replica exited {replica.process.returncode}:\n{replica.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get("/readyz").status_code == 200:
                    return
            time.sleep(0.2)
    raise AssertionError(f"replica {replica.url} not ready within {timeout}s:\n{replica.log_tail()}")


def stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()


@pytest.fixture(scope="module", params=[("local", 2), ("gcs", 2)], ids=["local", "gcs"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, exported_model: Path
) -> Iterator[Cluster]:
    """Replicas serving version 1, made live by ``live.json`` (so publishing only adds a candidate)."""
    backend, count = request.param
    scratch = tmp_path_factory.mktemp(f"replicas-{backend}")
    if backend == "gcs":
        request.getfixturevalue("gcs_emulator_host")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        bucket = f"tfloop-replicas-{free_port()}"
        gcs.Client(project="tfloop-test", credentials=AnonymousCredentials()).create_bucket(bucket)
        base, queue = f"gs://{bucket}/models", f"gs://{bucket}/feedback"
    else:
        base, queue = str(scratch / "models"), str(scratch / "feedback")
    assert publish(exported_model, base) == 1
    versions.write_live_pointer(base, NAME, 1, promoted_by="test")
    replicas = []
    for index in range(count):
        port = free_port()
        env = serving_env(
            model_base=base,
            model_name=NAME,
            feedback_uri=queue,
            cache_dir=str(scratch / f"cache-{index}"),
            host="127.0.0.1",
            port=str(port),
            poll_interval_s=str(POLL_S),
            max_batch_size="8",
            batch_workers="1",
            drain_s="0",
            token=TOKEN,  # a gs:// queue is production mode: /feedback takes a token
            feedback_burst="100",
        )
        env["TFLOOP_FEEDBACK_SECRET"] = SECRET
        replicas.append(start_replica(env, port, scratch / f"replica-{index}.log"))
    try:
        for replica in replicas:
            wait_ready(replica)
        yield Cluster(backend, base, queue, scratch, replicas)
    finally:
        for replica in replicas:
            stop(replica)


def classify(replica: Replica, data: bytes) -> httpx.Response:
    return httpx.post(f"{replica.url}/classify", files={"file": ("x.png", data, "image/png")}, timeout=60)


def feedback(
    replica: Replica, label: str, *, prediction_id: str | None, data: bytes | None
) -> httpx.Response:
    form = {"label": label, **({"prediction_id": prediction_id} if prediction_id else {})}
    files = {"file": ("x.png", data, "image/png")} if data is not None else None
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.post(f"{replica.url}/feedback", data=form, files=files, headers=headers, timeout=60)


def predict(replica: Replica, route: str = "") -> httpx.Response:
    body = {"instances": [{"b64": base64.b64encode(image_bytes(1)).decode()}]}
    return httpx.post(f"{replica.url}/v1/models/{NAME}{route}:predict", json=body, timeout=60)


def answered_by(replica: Replica, route: str = "") -> int:
    """The version that answered a prediction (its X-Model-Version), which must succeed."""
    response = predict(replica, route)
    assert response.status_code == 200, (route, response.status_code, response.text, replica.log_tail())
    return int(response.headers["X-Model-Version"])


def record(queue: str, feedback_id: str) -> dict:
    return json.loads(storage.read_text(storage.join(queue, RECORDS, f"{feedback_id}.json")))


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = MOVE_WITHIN_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


# --- feedback on any replica ----------------------------------------------------------------------


def test_a_classification_is_corrected_on_another_replica(cluster: Cluster) -> None:
    first, second = cluster.replicas[0], cluster.replicas[1]
    data = image_bytes(300)
    answer = classify(first, data)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"
    token = answer.json()["prediction_id"]

    only_id = feedback(second, "dog", prediction_id=token, data=None)  # the second never saw the image
    assert only_id.status_code == 422 and "send the image with the prediction_id" in only_id.json()["error"]
    other_image = feedback(second, "dog", prediction_id=token, data=image_bytes(301))
    assert other_image.status_code == 400 and "not the one" in other_image.json()["error"]
    accepted = feedback(second, "dog", prediction_id=token, data=data)
    assert accepted.status_code == 202, accepted.text
    stored = record(cluster.queue, accepted.json()["feedback_id"])
    assert stored["model_name"] == NAME and stored["model_version"] == 1
    predicted = answer.json()["top_k"]
    assert [entry["label"] for entry in stored["predicted"]] == [entry["label"] for entry in predicted]
    assert [entry["score"] for entry in stored["predicted"]] == pytest.approx(
        [entry["score"] for entry in predicted], abs=1e-6
    )
    assert stored["prediction_id"] == token
    sha = hashlib.sha256(data).hexdigest()
    assert storage.read_bytes(storage.join(cluster.queue, PENDING, "dog", f"{sha}.png")) == data

    again = feedback(first, "dog", prediction_id=token, data=None)  # the classifying replica kept it
    assert again.status_code == 202 and again.json()["duplicate"]
    assert again.json()["feedback_id"] == accepted.json()["feedback_id"]


def test_round_robin_classify_and_correct_without_affinity(cluster: Cluster) -> None:
    # Each image is classified by one replica and corrected on the next: every correction is accepted,
    # where a memory of predictions per process would refuse most of them.
    images = [image_bytes(400 + i) for i in range(3 * len(cluster.replicas))]
    answers = [classify(cluster.next(), data) for data in images]
    assert [a.status_code for a in answers] == [200] * len(images)
    cluster.next()  # shift by one: the correction goes to another replica than the classification
    corrections = [
        feedback(cluster.next(), LABELS[i % 3], prediction_id=a.json()["prediction_id"], data=data)
        for i, (a, data) in enumerate(zip(answers, images, strict=True))
    ]
    assert [c.status_code for c in corrections] == [202] * len(images), [c.text for c in corrections]
    for correction in corrections:
        assert record(cluster.queue, correction.json()["feedback_id"])["model_version"] == 1


# --- versions -------------------------------------------------------------------------------------


def test_publishing_moves_no_replica_and_promotion_moves_every_one(
    cluster: Cluster, exported_model: Path
) -> None:
    token = classify(cluster.replicas[0], image_bytes(500)).json()["prediction_id"]  # made by version 1
    assert publish(exported_model, cluster.base) == 2

    def candidate_loaded(replica: Replica) -> bool:
        assert answered_by(replica) == 1  # unpinned answers stay on live
        status = httpx.get(f"{replica.url}/v1/models/{NAME}/versions/2")  # LOADING, then AVAILABLE
        return status.status_code == 200 and status.json()["model_version_status"][0]["state"] == "AVAILABLE"

    for replica in cluster.replicas:
        wait_until(lambda r=replica: candidate_loaded(r), what=f"{replica.url} loads candidate 2")
    for replica in cluster.replicas:
        assert answered_by(replica) == 1
        assert (
            httpx.post(f"{replica.url}/classify", files={"file": ("x.png", image_bytes(2))}).json()[
                "model_version"
            ]
            == 1
        )
        assert answered_by(replica, "/versions/2") == 2
        assert answered_by(replica, "/labels/candidate") == 2
        assert answered_by(replica, "/labels/live") == 1
        assert answered_by(replica, "/versions/1") == 1
        status = httpx.get(f"{replica.url}/v1/models/{NAME}").json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("1", "AVAILABLE")]
        label_status = httpx.get(f"{replica.url}/v1/models/{NAME}/labels/candidate").json()
        assert label_status["model_version_status"][0]["version"] == "2"
        metadata = httpx.get(f"{replica.url}/v1/models/{NAME}/labels/candidate/metadata").json()
        assert metadata["model_spec"]["version"] == "2"
        for missing in ("/versions/7", "/labels/nope"):
            refused = predict(replica, missing)
            assert refused.status_code == 404 and list(refused.json()) == ["error"]
            assert "X-Model-Version" not in refused.headers
        assert httpx.get(f"{replica.url}/v1/models/{NAME}/versions/7/metadata").status_code == 404

    versions.write_live_pointer(cluster.base, NAME, 2, promoted_by="test")
    for replica in cluster.replicas:
        wait_until(lambda r=replica: answered_by(r) == 2, what=f"{replica.url} moves to 2")
    for replica in cluster.replicas:
        wait_until(
            lambda r=replica: predict(r, "/versions/1").status_code == 404, what=f"{replica.url} unloads 1"
        )
        assert httpx.get(f"{replica.url}/readyz").json()["model_version"] == 2
        assert predict(replica, "/labels/candidate").status_code == 404  # nothing above live any more
    if cluster.backend == "gcs":  # downloads of unloaded versions leave the replicas' caches
        caches = sorted(cluster.scratch.glob(f"cache-*/{NAME}/*"))
        assert [(c.parent.parent.name, c.name) for c in caches] == [
            (f"cache-{i}", "2") for i in range(len(cluster.replicas))
        ]

    # A correction of version 1's prediction, on a replica that no longer has version 1 loaded.
    data = image_bytes(500)
    late = feedback(cluster.replicas[-1], "fish", prediction_id=token, data=data)
    assert late.status_code == 202, late.text
    assert record(cluster.queue, late.json()["feedback_id"])["model_version"] == 1


# --- a replica dies mid-burst (keep this last: it kills one) ---------------------------------------


def test_every_acknowledged_feedback_survives_a_replica_killed_mid_burst(cluster: Cluster) -> None:
    victim = cluster.replicas[-1]
    count = 20 * len(cluster.replicas)
    images = [image_bytes(1000 + i, size=8) for i in range(count)]
    outcomes: list[tuple[int, int | None, str | None]] = []  # (replica index, status or None, feedback id)
    killed = asyncio.Event()

    async def post(http: httpx.AsyncClient, index: int) -> None:
        target = index % len(cluster.replicas)
        replica = cluster.replicas[target]
        try:
            response = await http.post(
                f"{replica.url}/feedback",
                data={"label": LABELS[index % 3]},
                files={"file": (f"{index}.png", images[index], "image/png")},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        except httpx.HTTPError:
            outcomes.append((target, None, None))
            return
        feedback_id = response.json().get("feedback_id") if response.is_success else None
        outcomes.append((target, response.status_code, feedback_id))

    async def kill_after(done: int) -> None:
        while len(outcomes) < done:
            await asyncio.sleep(0.005)
        victim.process.send_signal(signal.SIGKILL)
        killed.set()

    async def burst() -> None:
        limits = httpx.Limits(max_connections=24)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            killer = asyncio.create_task(kill_after(count // 3))
            first = [asyncio.create_task(post(http, i)) for i in range(count // 2)]
            await killed.wait()
            rest = [asyncio.create_task(post(http, i)) for i in range(count // 2, count)]
            await asyncio.gather(*first, *rest, killer)

    asyncio.run(burst())
    victim.process.wait()
    victim_index = len(cluster.replicas) - 1
    acknowledged = [
        (target, fid) for target, status, fid in outcomes if status is not None and 200 <= status < 300
    ]
    assert all(status == 202 for target, status, _ in outcomes if target != victim_index)  # survivors: all
    assert any(status is None for target, status, _ in outcomes if target == victim_index)  # killed mid-burst
    assert len(acknowledged) >= count - count // len(cluster.replicas)
    for _, feedback_id in acknowledged:
        stored = record(cluster.queue, feedback_id)
        assert storage.exists(storage.join(cluster.queue, stored["image"]))


# --- SIGTERM drain ---------------------------------------------------------------------------------


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "tfloopboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_sigterm_drains_then_exits_zero(tmp_path: Path, exported_model: Path) -> None:
    base = str(tmp_path / "models")
    publish(exported_model, base)
    port = free_port()
    env = serving_env(
        model_base=base,
        model_name=NAME,
        feedback_uri=str(tmp_path / "feedback"),
        host="127.0.0.1",
        port=str(port),
        drain_s="5",
        shutdown_timeout_s="15",
    )
    replica = start_replica(env, port, tmp_path / "serving.log")
    try:
        wait_ready(replica)
        # A request in flight when SIGTERM arrives: its headers and half its body are sent now, the rest
        # only after the server stopped accepting connections.
        body, content_type = multipart(image_bytes(7))
        head = (
            f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(head + body[: len(body) // 2])
        statuses: list[int] = []
        stop_clients = threading.Event()

        def client() -> None:  # keep-alive traffic from before SIGTERM into the drain
            with httpx.Client(base_url=replica.url, timeout=30) as http:
                while not stop_clients.is_set():
                    statuses.append(classify_status(http))

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        wait_until(lambda: len(statuses) >= 6, what="traffic flows", timeout=30)
        replica.process.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=replica.url, timeout=5) as http:
            wait_until(lambda: http.get("/readyz").status_code == 503, what="readyz turns 503", timeout=5)
            assert "draining" in http.get("/readyz").json()["error"]
            assert http.get("/healthz").status_code == 200
        with httpx.Client(base_url=replica.url, timeout=30) as fresh:  # a new connection during the drain
            assert classify_status(fresh) == 200
        stop_clients.set()
        for thread in clients:
            thread.join()
        assert statuses and set(statuses) == {200}

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_until(refused, what="the listener closes after the drain", timeout=15)
        assert replica.process.poll() is None  # still finishing the request in flight
        slow.sendall(body[len(body) // 2 :])
        status, answer = read_response(slow)
        slow.close()
        assert status == 200 and json.loads(answer)["model_version"] == 1
        assert replica.process.wait(timeout=30) == 0
    finally:
        if replica.process.poll() is None:
            replica.process.kill()
            replica.process.wait()
    assert "Traceback" not in replica.log.read_text(errors="replace")


def classify_status(http: httpx.Client) -> int:
    return http.post("/classify", files={"file": ("x.png", image_bytes(8), "image/png")}).status_code
