"""Code tier: the storage API behaves the same on local folders, file:// URIs and the GCS emulator."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import storage

pytestmark = pytest.mark.code


@pytest.fixture(params=["local", "file-uri", "gcs"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file-uri":
        return f"file://{tmp_path / 'root'}"
    return request.getfixturevalue("gcs_bucket") + "/root"


def test_write_read_list(root: str) -> None:
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"x")
    storage.write_text(storage.join(root, "a", "b", "y.txt"), "why")
    storage.write_bytes(storage.join(root, "c", "z.bin"), b"z")
    assert storage.list_files(root) == ["a/b/y.txt", "a/x.bin", "c/z.bin"]
    assert storage.list_dirs(root) == ["a", "c"]
    assert storage.read_text(storage.join(root, "a", "b", "y.txt")) == "why"
    assert storage.exists(storage.join(root, "a"))
    assert storage.exists(storage.join(root, "a", "x.bin"))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.list_files(storage.join(root, "missing")) == []


def test_local_writes_are_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "public.json"
    storage.write_text(str(target), "{}")
    storage.write_if_absent(str(tmp_path / "other.bin"), b"x")
    assert target.stat().st_mode & 0o044 == 0o044
    assert (tmp_path / "other.bin").stat().st_mode & 0o044 == 0o044


def test_a_write_interrupted_by_a_crash_is_not_listed(tmp_path: Path) -> None:
    # A local write goes to ".<name>.<random>.tmp" beside its target and is renamed; a crash in between
    # leaves that file behind, and readers of the listing (the feedback queue, retraining) must not see it.
    storage.write_bytes(str(tmp_path / "q" / "whole.png"), b"whole")
    (tmp_path / "q" / ".cut.png.k2j4x.tmp").write_bytes(b"ha")
    assert storage.list_files(str(tmp_path)) == ["q/whole.png"]


def test_write_if_absent_never_overwrites(root: str) -> None:
    target = storage.join(root, "q", "item.json")
    assert storage.write_if_absent(target, b"first") is True
    assert storage.write_if_absent(target, b"second") is False
    assert storage.read_bytes(target) == b"first"


def test_copy_tree_writes_marker_last_and_roundtrips(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "variables").mkdir(parents=True)
    (src / "saved_model.pb").write_bytes(b"pb")
    (src / "variables" / "v.data").write_bytes(b"data")
    assert storage.upload_tree(src, storage.join(root, "m", "1")) == 2
    local = storage.download_tree(storage.join(root, "m", "1"), tmp_path / "back")
    assert (local / "saved_model.pb").read_bytes() == b"pb"
    assert (local / "variables" / "v.data").read_bytes() == b"data"
    assert (
        storage.core._ordered(["saved_model.pb", "variables/v.data"], ("saved_model.pb",))[-1]
        == "saved_model.pb"
    )


def test_move_and_delete(root: str) -> None:
    src = storage.join(root, "pending", "cat", "a.jpg")
    dst = storage.join(root, "consumed", "run1", "cat", "a.jpg")
    storage.write_bytes(src, b"img")
    storage.move(src, dst)
    assert not storage.exists(src)
    assert storage.read_bytes(dst) == b"img"
    storage.write_bytes(src, b"other")
    with pytest.raises(storage.StorageError, match="different file"):
        storage.move(src, dst)
    assert storage.read_bytes(src) == b"other"
    storage.delete(storage.join(root, "consumed"), recursive=True)
    assert not storage.exists(dst)


def test_missing_file_is_a_clear_error(root: str) -> None:
    with pytest.raises(storage.StorageError, match="cannot read"):
        storage.read_bytes(storage.join(root, "absent.bin"))


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_concurrent_write_if_absent_has_one_winner(where: str, tmp_path: Path, request) -> None:
    """Writers that all saw the object absent race to create it: exactly one wins and its bytes stay."""
    if where == "gcs":
        target = request.getfixturevalue("gcs_bucket") + "/race/item"
    else:
        target = str(tmp_path / "race" / "item")
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(storage.write_if_absent(target, f"writer-{i}".encode()))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert storage.read_bytes(target).startswith(b"writer-")


def test_emulator_refuses_a_second_create_only_upload(gcs_bucket: str) -> None:
    """The GCS stand-in enforces ``ifGenerationMatch=0`` as GCS does, so no-overwrite tests can fail."""
    from google.api_core.exceptions import PreconditionFailed

    bucket, key = storage.core._bucket(gcs_bucket + "/once")
    bucket.blob(key).upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob(key).upload_from_string(b"second", if_generation_match=0)
    assert storage.read_bytes(gcs_bucket + "/once") == b"first"


def test_unreachable_bucket_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage.core, "GCS_TIMEOUT_SECONDS", 2.0)
    with pytest.raises(storage.StorageError, match=r"unreachable|did not answer"):
        storage.read_bytes("gs://nowhere/x")


def test_bad_gcs_uri() -> None:
    with pytest.raises(storage.StorageError, match="bucket name"):
        storage.list_files("gs:///no-bucket")


def test_local_writes_fsync_the_file_and_every_folder_they_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that returned survives a power cut: the file's bytes and the entries naming it are synced."""
    import os
    import stat

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        link = os.readlink(f"/proc/self/fd/{descriptor}")
        synced.append((link, stat.S_ISDIR(os.fstat(descriptor).st_mode)))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "queue" / "pending" / "cat" / "a.jpg"
    assert storage.write_if_absent(str(target), b"image")
    synced_dirs = {path for path, is_dir in synced if is_dir}
    assert any(not is_dir for _, is_dir in synced)
    assert {str(target.parent), str(tmp_path / "queue" / "pending"), str(tmp_path / "queue")} <= synced_dirs
    assert str(tmp_path) in synced_dirs

    synced.clear()
    storage.move(str(target), str(tmp_path / "queue" / "consumed" / "run" / "cat" / "a.jpg"))
    synced_dirs = {path for path, is_dir in synced if is_dir}
    assert str(tmp_path / "queue" / "consumed" / "run" / "cat") in synced_dirs
    assert str(target.parent) in synced_dirs


@pytest.mark.parametrize("with_shadow", [False, True])
def test_a_prediction_record_round_trips_through_its_log_line(with_shadow: bool) -> None:
    import dataclasses
    import json

    from storage.predictions import PredictionRecord, ShadowAnswer

    record = PredictionRecord(
        sha256="ab" * 32,
        model_name="flowers",
        model_version=3,
        top_k=[("tulip", 0.612345), ("rose", 0.2)],
        margin=0.412345,
        entropy=0.9,
        time="2026-12-03T09:00:00+00:00",
        bytes=1234,
        format="jpeg",
        width=48,
        height=40,
        protocol="grpc",
        shadow=ShadowAnswer(version=4, label="rose", score=0.7, agrees=False) if with_shadow else None,
    )
    line = json.loads(record.to_json())
    expected = {field.name for field in dataclasses.fields(PredictionRecord)} - ({"shadow"} - line.keys())
    assert set(line) == expected and ("shadow" in line) == with_shadow
    assert PredictionRecord.from_dict(line) == record
