"""Fast tests of the image build step: serving requirements, context, builder choice, MLflow record, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from export import image
from export.image import ImageBuildError, ImageSpec

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.code


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version
    return pins


def _write_version(
    base: Path, name: str, version: int, *, complete: bool = True, run_id: str | None = None
) -> Path:
    folder = base / name / str(version)
    (folder / "variables").mkdir(parents=True)
    (folder / "variables" / "variables.index").write_bytes(b"index-%d" % version)
    (folder / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(64))
    (folder / "assets").mkdir()
    (folder / "assets" / "labels.txt").write_text("red\nblue\n")
    meta = {"model_name": name, "version": version, "labels": ["red", "blue"], "run_id": run_id}
    (folder / "tfloop.json").write_text(json.dumps(meta))
    if complete:
        (folder / "saved_model.pb").write_bytes(b"pb-%d" % version)
    return folder


def test_serving_requirements_are_pinned_from_the_lock_and_carry_no_training_stack():
    serving = _pins(REPO / "requirements" / "serving.txt")
    lock = _pins(REPO / "requirements" / "lock.txt")
    assert {
        "tensorflow-cpu",
        "fastapi",
        "uvicorn",
        "pillow",
        "google-cloud-storage",
        "prometheus-client",
    } <= set(serving)
    # TF Serving's protos: pinned by the Makefile (installed with --no-deps), not by the lock
    makefile = (REPO / "Makefile").read_text()
    assert f"TFSA := tensorflow-serving-api=={serving.pop('tensorflow-serving-api')}" in makefile
    mismatched = {
        name: (version, lock.get(name)) for name, version in serving.items() if lock.get(name) != version
    }
    assert not mismatched, f"serving.txt disagrees with lock.txt: {mismatched}"
    training = {"mlflow", "prefect", "keras", "matplotlib", "kubernetes", "docker", "typer", "pytest"}
    assert not training & set(serving)


def test_context_holds_only_what_the_image_needs(tmp_path):
    base = tmp_path / "models"
    _write_version(base, "clf", 1)
    _write_version(base, "clf", 2, run_id="abc123")
    _write_version(base, "clf", 3, complete=False)
    spec = ImageSpec(model_base=str(base), model_name="clf")

    context = image.prepare_context(spec, dest=tmp_path / "ctx")

    assert context.version == 2
    assert context.run_id == "abc123"
    top = {p.name for p in context.path.iterdir()}
    assert top == {"Dockerfile.serve", "requirements", "scripts", "serving", "storage", "model"}
    assert [p.name for p in (context.path / "requirements").iterdir()] == ["serving.txt"]
    assert sorted(p.name for p in (context.path / "scripts").iterdir()) == [
        "fetch_model_version.py",
        "sourceless-imported.py",
    ]
    model_files = sorted(
        p.relative_to(context.path / "model").as_posix() for p in (context.path / "model").rglob("*")
    )
    assert (context.path / "model" / "saved_model.pb").read_bytes() == b"pb-2"
    assert "tfloop.json" in model_files
    assert not [p for p in context.path.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]
    assert (context.path / "storage" / "versions.py").is_file()

    again = image.prepare_context(spec, dest=tmp_path / "ctx2")
    assert again.content_hash == context.content_hash
    (base / "clf" / "2" / "assets" / "labels.txt").write_text("red\ngreen\n")
    changed = image.prepare_context(spec, dest=tmp_path / "ctx3")
    assert changed.content_hash != context.content_hash

    tags = image.image_tags(
        ImageSpec(model_base=str(base), model_name="clf", registry="127.0.0.1:5000"), context
    )
    assert tags == ("127.0.0.1:5000/clf:v2", f"127.0.0.1:5000/clf:c-{context.content_hash[:12]}")


def test_context_copies_the_version_from_gcs(gcs_bucket, tmp_path):
    local = tmp_path / "models"
    _write_version(local, "clf", 7, run_id="run-7")
    storage.upload_tree(str(local / "clf" / "7"), f"{gcs_bucket}/models/clf/7")

    context = image.prepare_context(
        ImageSpec(model_base=f"{gcs_bucket}/models", model_name="clf"), dest=tmp_path / "ctx"
    )

    assert context.version == 7
    assert context.run_id == "run-7"
    assert (context.path / "model" / "saved_model.pb").read_bytes() == b"pb-7"
    assert (context.path / "model" / "variables" / "variables.index").read_bytes() == b"index-7"


def test_missing_incomplete_and_badly_named_versions_are_clear_errors(tmp_path):
    base = tmp_path / "models"
    _write_version(base, "clf", 1, complete=False)
    with pytest.raises(ImageBuildError, match="no complete version"):
        image.prepare_context(ImageSpec(model_base=str(base), model_name="clf"), dest=tmp_path / "a")
    with pytest.raises(ImageBuildError, match=r"version 1 .* incomplete"):
        image.prepare_context(
            ImageSpec(model_base=str(base), model_name="clf", version=1), dest=tmp_path / "b"
        )
    with pytest.raises(ImageBuildError, match="cannot name an image"):
        image.prepare_context(ImageSpec(model_base=str(base), model_name="My Model"), dest=tmp_path / "c")
    with pytest.raises(ImageBuildError, match="needs a registry"):
        image.build_image(ImageSpec(model_base=str(base), model_name="clf", push=True))


def test_without_docker_or_buildah_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    spec = ImageSpec(model_base=str(tmp_path), model_name="clf")
    assert not image.docker_available()
    with pytest.raises(ImageBuildError, match=r"install buildah"):
        image.choose_builder(spec)

    (empty_bin / "buildah").write_text("#!/bin/sh\nexit 0\n")
    (empty_bin / "buildah").chmod(0o755)
    assert image.choose_builder(spec) == "buildah"
    with pytest.raises(ImageBuildError, match="no Docker Engine answers"):
        image.choose_builder(ImageSpec(model_base=str(tmp_path), model_name="clf", builder="docker"))


def _fetch(
    tmp_path: Path, source: Path, *, name: str = "clf", version: int = 2
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fetch_model_version.py"),
            *("--source", str(source), "--name", name, "--version", str(version)),
            *("--dest", str(tmp_path / "dest")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


def test_model_stage_script_checks_the_version(tmp_path):
    base = tmp_path / "models"
    good = _write_version(base, "clf", 2)
    done = _fetch(tmp_path, good)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dest" / "clf" / "2" / "saved_model.pb").read_bytes() == b"pb-2"

    wrong_name = _fetch(tmp_path, good, name="other")
    assert wrong_name.returncode == 1
    assert "MODEL_NAME" in wrong_name.stderr and "Traceback" not in wrong_name.stderr

    partial = _write_version(base, "clf", 3, complete=False)
    incomplete = _fetch(tmp_path, partial, version=3)
    assert incomplete.returncode == 1
    assert "incomplete (missing saved_model.pb)" in incomplete.stderr

    missing = _fetch(tmp_path, base / "clf" / "9", version=9)
    assert missing.returncode == 1 and "model/" in missing.stderr


def test_image_reference_is_recorded_on_the_mlflow_run(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("image-test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    del mlflow

    note = image.record_in_mlflow(
        tracking_uri=uri, run_id=run.info.run_id, image="127.0.0.1:5000/clf:v2", digest="sha256:" + "a" * 64
    )

    tags = client.get_run(run.info.run_id).data.tags
    assert tags["tfloop.image"] == "127.0.0.1:5000/clf:v2"
    assert tags["tfloop.image.pinned"] == "127.0.0.1:5000/clf@sha256:" + "a" * 64
    assert "tagged" in note
    assert "skipped" in image.record_in_mlflow(tracking_uri=None, run_id="x", image="i", digest="")
    assert "names no run_id" in image.record_in_mlflow(tracking_uri=uri, run_id=None, image="i", digest="")
    assert "not usable" in image.record_in_mlflow(tracking_uri=uri, run_id="0" * 32, image="i", digest="")


def test_cli_build_reports_a_missing_model_in_one_line(tmp_path, tfloop_home):
    tfloop = Path(sys.executable).parent / "tfloop"
    help_text = subprocess.run([str(tfloop), "build", "--help"], capture_output=True, text=True, check=True)
    for flag in (
        "--model-base",
        "--model-name",
        "--version",
        "--base-image",
        "--registry",
        "--push",
        "--json",
    ):
        assert flag in help_text.stdout
    failed = subprocess.run(
        [str(tfloop), "build", "--model-base", str(tmp_path / "none"), "--model-name", "clf", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert "error:" in failed.stderr and "Traceback" not in failed.stderr
    assert failed.stdout.strip() == ""
