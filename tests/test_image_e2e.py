"""End to end: build Dockerfile.serve with buildah on a local Debian base, serve from it, push, read back.

No Docker engine and no pullable base image here: the base comes from scripts/make-base-image.sh (debootstrap,
cached under ~/.cache/tfloop, override with TFLOOP_CACHE), the build is buildah's, the server is the image's
own entrypoint started with `buildah run` on a loopback port, and the registry is Debian's docker-registry on
loopback. A missing tool fails the run in CI and skips loudly elsewhere (tests/tools.py), never silently.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.tools import missing_tool

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TFLOOP_CACHE", Path.home() / ".cache" / "tfloop"))
MODEL_NAME = "tiny"
RED, BLUE = (230, 20, 20), (20, 20, 230)
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _buildah(store: dict[str, str], *args: str, check: bool = True, timeout: float = 600) -> str:
    command = ["buildah", *store_options(store), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return done.stdout


def store_options(store: dict[str, str]) -> list[str]:
    return ["--storage-driver", store["driver"], "--root", store["root"], "--runroot", store["runroot"]]


@pytest.fixture(scope="module")
def store_and_bases() -> tuple[dict[str, str], str, str]:
    """A buildah store kept between runs (overlay where it works, else vfs) holding the local bases."""
    if shutil.which("buildah") is None:
        missing_tool("buildah", why="the serving image cannot be built", how="run `make system-deps`")
    if not Path("/etc/containers/policy.json").is_file():
        missing_tool(
            "/etc/containers/policy.json", why="buildah refuses to build", how="`make system-deps` writes it"
        )
    if os.geteuid() != 0:
        missing_tool("root", why="buildah's chroot isolation and debootstrap need it", how="run as root")
    failures = []
    for driver in ("overlay", "vfs"):
        store = {
            "driver": driver,
            "root": str(CACHE / "containers" / driver),
            "runroot": f"/tmp/tfloop-buildah-run-{driver}",
        }
        env = {**os.environ, "BUILDAH_ARGS": " ".join(store_options(store)), "TFLOOP_CACHE": str(CACHE)}
        made = subprocess.run(
            ["bash", str(REPO / "scripts" / "make-base-image.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        if made.returncode == 2:
            missing_tool(
                "a local base image",
                why=made.stderr.strip().splitlines()[-1],
                how="install debootstrap (`make system-deps`)",
            )
        if made.returncode == 0:
            base, builder = made.stdout.strip().splitlines()[-1].split()
            probe = _buildah(store, "from", base, check=False).strip()
            ran = subprocess.run(
                ["buildah", *store_options(store), "run", "--isolation", "chroot", probe, "--", "true"],
                capture_output=True,
                text=True,
                check=False,
            )
            _buildah(store, "rm", probe, check=False)
            if ran.returncode == 0:
                return store, base, builder
            failures.append(f"{driver}: buildah run failed: {ran.stderr.strip()[-300:]}")
        else:
            failures.append(f"{driver}: {made.stderr.strip()[-500:]}")
    raise AssertionError("no buildah storage driver works here:\n" + "\n".join(failures))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """Debian's docker-registry serving on a loopback port; yields HOST:PORT."""
    if shutil.which("docker-registry") is None:
        missing_tool("docker-registry", why="the push cannot be tested", how="run `make system-deps`")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "log:\n  level: warn\n"
    )
    log = (tmp_path / "registry.log").open("w")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://{address}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"docker-registry did not start: {(tmp_path / 'registry.log').read_text()}")
        yield address
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def exported_model(tmp_path: Path) -> tuple[str, str, str]:
    """A tiny real classifier (mean red vs mean blue) exported as version 1; returns (base, run_id, uri)."""
    import keras
    import numpy as np
    from mlflow.tracking import MlflowClient

    from export.savedmodel import export_saved_model
    from storage import copy_tree, join, write_text

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("image-e2e", artifact_location=str(tmp_path / "mlartifacts"))
    run_id = client.create_run(experiment).info.run_id

    inputs = keras.Input((32, 32, 3))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([np.array([[1, -1], [0, 0], [-1, 1]], "float32") / 10, np.zeros(2, "float32")])
    exported = export_saved_model(
        model, tmp_path / "export", labels=["red", "blue"], model_name=MODEL_NAME, run_id=run_id
    )
    base = str(tmp_path / "models")
    write_text(str(exported.path / "tfloop.json"), json.dumps({**exported.metadata, "version": 1}))
    copy_tree(str(exported.path), join(base, MODEL_NAME, "1"))
    return base, run_id, tracking_uri


def _wait_available(url: str, server: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(
                f"the image's server exited ({server.returncode}):\n{log_path.read_text()[-4000:]}"
            )
        try:
            answer = httpx.get(url, timeout=2)
            statuses = answer.json().get("model_version_status", [])
            if answer.status_code == 200 and any(v.get("state") == "AVAILABLE" for v in statuses):
                return
            failed = [v for v in statuses if v.get("status", {}).get("error_code", "OK") != "OK"]
            if failed:
                raise AssertionError(f"the image's server could not load the model: {failed}")
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(
        f"the model was not AVAILABLE after {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}"
    )


def test_serving_image_builds_serves_and_pushes(store_and_bases, registry, exported_model, tmp_path):
    from mlflow.tracking import MlflowClient

    from export.image import ImageSpec, build_image

    store, base_image, builder_image = store_and_bases
    model_base, run_id, tracking_uri = exported_model
    ca_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    build_log: list[str] = []
    spec = ImageSpec(
        model_base=model_base,
        model_name=MODEL_NAME,
        base_image=base_image,
        builder_image=builder_image,
        registry=registry,
        ca_bundle=ca_bundle if ca_bundle.is_file() else None,
        builder="buildah",
        storage_driver=store["driver"],
        storage_root=Path(store["root"]),
        storage_runroot=Path(store["runroot"]),
        mlflow_tracking_uri=tracking_uri,
    )
    started = time.monotonic()
    try:
        built = build_image(spec, on_log=build_log.append)
    except Exception as error:
        raise AssertionError(
            f"{error}\n--- build output (tail) ---\n" + "\n".join(build_log[-80:])
        ) from error
    print(
        f"\nimage build: {time.monotonic() - started:.0f}s, {built.size_bytes / 1e6:.0f} MB",
        file=sys.__stderr__,
    )

    assert built.builder == "buildah"
    assert built.image == f"{registry}/{MODEL_NAME}:v1"
    assert built.digest.startswith("sha256:") and built.pushed
    assert 0 < built.size_bytes <= 1_000_000_000, f"image is {built.size_bytes / 1e6:.0f} MB, over 1 GB"

    inspected = json.loads(_buildah(store, "inspect", "--type", "image", built.image))
    config = inspected["Docker"]["config"]
    assert config["Labels"]["ai.tfloop.model.name"] == MODEL_NAME
    assert config["Labels"]["ai.tfloop.model.version"] == "1"
    assert config["Labels"]["ai.tfloop.mlflow.run_id"] == run_id
    assert config["User"] == "tfloop"
    assert config["Healthcheck"]["Test"][0] in {"CMD", "CMD-SHELL"}
    entrypoint = config["Entrypoint"]

    container = _buildah(store, "from", built.image).strip()
    server: subprocess.Popen[bytes] | None = None
    try:
        listing = _buildah(
            store, "run", "--isolation", "chroot", container, "--", "sh", "-c", "id -u; ls /models/tiny"
        )
        assert listing.split() == ["10001", "1"], listing
        port = free_port()
        log_path = tmp_path / "server.log"
        with log_path.open("wb") as server_log:
            server = subprocess.Popen(
                [
                    *("buildah", *store_options(store), "run", "--isolation", "chroot"),
                    *("--env", f"TFLOOP_SERVE_PORT={port}", "--env", "TFLOOP_SERVE_HOST=127.0.0.1"),
                    *("--env", f"TFLOOP_SERVE_GRPC_PORT={free_port()}"),
                    *(container, "--", *entrypoint),
                ],
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        _wait_available(f"{url}/v1/models/{MODEL_NAME}", server, log_path, timeout_s=240)
        answer = httpx.post(
            f"{url}/v1/models/{MODEL_NAME}:predict",
            json={
                "instances": [
                    {"b64": base64.b64encode(_png(c)).decode()} for c in ((230, 20, 20), (20, 20, 230))
                ]
            },
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert [p["classes"][0] for p in predictions] == ["red", "blue"]
        assert predictions[0]["scores"][0] > 0.9
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        _buildah(store, "rm", container, check=False)

    catalog = httpx.get(f"http://{registry}/v2/_catalog", timeout=10).json()
    assert MODEL_NAME in catalog["repositories"]
    tags = httpx.get(f"http://{registry}/v2/{MODEL_NAME}/tags/list", timeout=10).json()["tags"]
    assert sorted(tags) == sorted(tag.rsplit(":", 1)[1] for tag in built.tags)
    manifest = httpx.get(
        f"http://{registry}/v2/{MODEL_NAME}/manifests/v1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        timeout=10,
    )
    assert manifest.status_code == 200
    assert manifest.headers["Docker-Content-Digest"] == built.digest
    config_digest = manifest.json()["config"]["digest"]
    pushed_config = httpx.get(f"http://{registry}/v2/{MODEL_NAME}/blobs/{config_digest}", timeout=10).json()
    assert pushed_config["config"]["Labels"]["ai.tfloop.model.version"] == "1"

    run_tags = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags
    assert run_tags["tfloop.image"] == built.image
    assert run_tags["tfloop.image.digest"] == built.digest

    for tag in built.tags:
        _buildah(store, "rmi", tag, check=False)


def test_model_stage_fetches_the_version_from_gcs(store_and_bases, exported_model, gcs_bucket):
    """MODEL_URI=gs://...: the Dockerfile's model stage downloads and checks the version itself."""
    from export.image import ImageSpec, build_image
    from storage import copy_tree, join

    store, base_image, builder_image = store_and_bases
    local_base, _, _ = exported_model
    gcs_base = f"{gcs_bucket}/models"
    copy_tree(join(local_base, MODEL_NAME, "1"), join(gcs_base, MODEL_NAME, "1"))
    ca_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    build_log: list[str] = []
    spec = ImageSpec(
        model_base=gcs_base,
        model_name=MODEL_NAME,
        base_image=base_image,
        builder_image=builder_image,
        model_uri_in_build=True,
        ca_bundle=ca_bundle if ca_bundle.is_file() else None,
        builder="buildah",
        storage_driver=store["driver"],
        storage_root=Path(store["root"]),
        storage_runroot=Path(store["runroot"]),
    )
    try:
        built = build_image(spec, on_log=build_log.append)
    except Exception as error:
        tail = "\n".join(build_log[-60:])
        raise AssertionError(f"{error}\n--- build output (tail) ---\n{tail}") from error
    assert not built.pushed and built.image == f"localhost/{MODEL_NAME}:v1"
    assert any(f"from {gcs_base}/{MODEL_NAME}/1" in line for line in build_log), "\n".join(build_log[-40:])
    container = _buildah(store, "from", built.image).strip()
    try:
        listing = _buildah(store, "run", "--isolation", "chroot", container, "--", "ls", "/models/tiny/1")
    finally:
        _buildah(store, "rm", container, check=False)
    assert {"saved_model.pb", "variables", "tfloop.json"} <= set(listing.split())
    for tag in built.tags:
        _buildah(store, "rmi", tag, check=False)
