"""Dataset ingestion and input pipeline: validation of every bad-file kind, the three-way split by content
hash (stable as data grows, duplicates together, conflicts quarantined, small labels left out), several roots
(local and GCS), the demo dataset, and decoding of every supported format."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import storage
from training.data import (
    DatasetError,
    classify_image_bytes,
    dataset_fingerprint,
    make_image_dataset,
    scan_dataset,
    split_for_hash,
)
from training.demo_data import DEMO_CLASSES, make_demo_dataset

pytestmark = pytest.mark.data


def _image_bytes(fmt: str, *, mode: str = "RGB", color: object = (200, 30, 30), size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _good_dataset(root: Path, labels: dict[str, int]) -> None:
    """Distinct noisy JPEGs (a seed per label and index: no two files share their bytes)."""
    for label, count in labels.items():
        for i in range(count):
            rng = np.random.default_rng([i, *label.encode()])
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            _write(root, f"{label}/{label}-{i}.jpg", buffer.getvalue())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_split_is_a_function_of_the_content_hash_and_fixed_fractions() -> None:
    hashes = [_sha(str(i).encode()) for i in range(4000)]
    splits = [split_for_hash(h, validation_fraction=0.2, test_fraction=0.1) for h in hashes]
    assert splits == [split_for_hash(h, validation_fraction=0.2, test_fraction=0.1) for h in hashes]
    assert 0.08 < splits.count("test") / len(splits) < 0.12
    assert 0.17 < splits.count("validation") / len(splits) < 0.23
    # A bigger test share only takes images from the other splits; no test image leaves the test split.
    wider = [split_for_hash(h, validation_fraction=0.2, test_fraction=0.3) for h in hashes]
    assert all(w == "test" for s, w in zip(splits, wider, strict=True) if s == "test")
    with pytest.raises(DatasetError, match="nothing to train"):
        scan_dataset(["unused"], validation_fraction=0.5, test_fraction=0.5)


def test_images_keep_their_split_when_new_data_and_roots_arrive(tmp_path: Path) -> None:
    base, pending = tmp_path / "base", tmp_path / "feedback" / "pending"
    _good_dataset(base, {"cat": 12, "dog": 12})
    first = scan_dataset([str(base)], min_images_per_label=3)
    _good_dataset(base, {"bird": 8})
    feedback_image = _image_bytes("PNG", color=(1, 2, 3))
    _write(pending, f"cat/{_sha(feedback_image)}.png", feedback_image)
    second = scan_dataset([str(base), str(pending)], min_images_per_label=3)

    splits = {r.sha256: r.side for r in second.records}
    assert all(splits[r.sha256] == r.side for r in first.records)
    old_manifest, new_manifest = first.split_manifest(), second.split_manifest()
    for split in ("train", "validation", "test"):
        assert set(old_manifest[split]) <= set(new_manifest[split])
    feedback = second.from_root(str(pending))
    assert len(feedback) == 1 and feedback[0].label == "cat"
    assert feedback[0].side == split_for_hash(
        _sha(feedback_image), validation_fraction=0.2, test_fraction=0.2
    )
    assert second.labels == ("bird", "cat", "dog")
    assert second.report.per_root_counts == {str(base): 32, str(pending): 1}
    assert first.fingerprint != second.fingerprint


def test_duplicates_count_once_and_conflicting_labels_are_quarantined(tmp_path: Path) -> None:
    base, pending = tmp_path / "base", tmp_path / "feedback" / "pending"
    _good_dataset(base, {"cat": 10, "dog": 10})
    twin = (base / "cat" / "cat-0.jpg").read_bytes()
    _write(base, "cat/copy-of-cat-0.jpg", twin)  # same bytes, same label, another name: once
    _write(pending, f"cat/{_sha(twin)}.jpg", twin)  # and once more from the feedback queue
    disputed = (base / "dog" / "dog-3.jpg").read_bytes()
    _write(pending, f"cat/{_sha(disputed)}.jpg", disputed)  # the same bytes under another label

    scanned = scan_dataset([str(base), str(pending)], min_images_per_label=3)

    hashes = [r.sha256 for r in scanned.records]
    assert len(hashes) == len(set(hashes)) == 19
    kept = next(r for r in scanned.records if r.sha256 == _sha(twin))
    assert kept.root == str(base) and kept.relative_path == "cat/cat-0.jpg"  # base first, then path order
    assert scanned.report.duplicates == 2
    assert scanned.quarantined == (_sha(disputed),)
    manifest = scanned.split_manifest()
    assert manifest["quarantined"] == [_sha(disputed)]
    assert all(_sha(disputed) not in manifest[split] for split in ("train", "validation", "test"))
    conflict = scanned.report.to_dict()["quarantined"][0]
    assert conflict["labels"] == ["cat", "dog"] and len(conflict["files"]) == 2
    assert scanned.report.quarantined_count == 1
    assert sum(scanned.report.split_counts.values()) == scanned.report.images == 19


def test_every_bad_file_kind_is_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _good_dataset(root, {"cat": 16, "dog": 16})
    png = _image_bytes("PNG", size=64)
    jpeg = _image_bytes("JPEG", size=64)
    _write(root, "cat/corrupt.jpg", jpeg[:20] + bytes(range(256)) * 4)
    _write(root, "cat/empty.jpg", b"")
    _write(root, "cat/notes.jpg", b"this is text, not an image\n")
    _write(root, "dog/truncated.png", png[: len(png) // 2])
    _write(root, "dog/photo.tiff", _image_bytes("TIFF"))
    _write(root, "dog/dog-0.json", b'{"sidecar": true}')
    _write(root, "README.md", b"# a dataset")

    scanned = scan_dataset([str(root)], min_images_per_label=5)

    counts = scanned.report.skipped_counts
    assert counts["empty"] == 1
    assert counts["not_an_image"] == 1
    assert counts["corrupt"] == 2
    assert counts["unsupported_extension"] == 2
    assert counts["outside_label_folder"] == 1
    assert scanned.report.skipped_total == 7
    assert {Path(s.uri).name: s.reason for s in scanned.report.skipped}["truncated.png"] == "corrupt"
    assert len(scanned.records) == 32
    assert all(Path(r.local_path).name.startswith(r.label) for r in scanned.records)
    batches = list(
        make_image_dataset(scanned.records, scanned.labels, image_size=32, batch_size=5, training=False)
    )
    assert sum(int(images.shape[0]) for images, _ in batches) == 32


def test_classify_image_bytes_accepts_each_supported_format() -> None:
    for fmt, name in (("JPEG", "a.jpg"), ("PNG", "a.png"), ("GIF", "a.gif"), ("BMP", "a.bmp")):
        assert classify_image_bytes(name, _image_bytes(fmt)) is None
    assert classify_image_bytes("a.JPEG", _image_bytes("JPEG")) is None
    assert classify_image_bytes("a.webp", _image_bytes("PNG")) == "unsupported_extension"


def test_a_label_with_too_few_images_is_reported_and_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _good_dataset(tmp_path, {"cat": 16, "dog": 16, "newt": 2})
    _write(tmp_path, "newt/broken.jpg", b"\xff\xd8 broken")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        scanned = scan_dataset([str(tmp_path)], min_images_per_label=5)
    assert scanned.labels == ("cat", "dog") and len(scanned.records) == 32
    assert scanned.report.excluded_labels == {"newt": 2}
    assert "label 'newt' has 2 valid distinct image(s), fewer than the minimum 5: left out" in caplog.text
    assert len(scan_dataset([str(tmp_path)], min_images_per_label=2).records) == 34


def test_fewer_than_two_labels_is_an_error(tmp_path: Path) -> None:
    _good_dataset(tmp_path, {"cat": 10})
    with pytest.raises(DatasetError, match="at least two"):
        scan_dataset([str(tmp_path)], min_images_per_label=1)


def test_missing_roots(tmp_path: Path) -> None:
    _good_dataset(tmp_path / "base", {"cat": 16, "dog": 16})
    with pytest.raises(DatasetError, match="holds no files"):
        scan_dataset([str(tmp_path / "nope")])
    scanned = scan_dataset([str(tmp_path / "base"), str(tmp_path / "empty-queue")])
    assert scanned.report.per_root_counts[str(tmp_path / "empty-queue")] == 0


def test_decoding_converts_every_format_to_rgb(tmp_path: Path) -> None:
    frames = [Image.new("P", (10, 10), 1), Image.new("P", (10, 10), 2)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    files = {
        "gray/g.png": _image_bytes("PNG", mode="L", color=100),
        "rgba/r.png": _image_bytes("PNG", mode="RGBA", color=(10, 20, 30, 0)),
        "anim/a.gif": gif.getvalue(),
        "bmp/b.bmp": _image_bytes("BMP", color=(0, 255, 0)),
        "jpg/j.jpg": _image_bytes("JPEG", mode="CMYK", color=(0, 0, 0, 0)),
    }
    for relative, data in files.items():
        _write(tmp_path, relative, data)
    scanned = scan_dataset(
        [str(tmp_path)], min_images_per_label=1, validation_fraction=0.1, test_fraction=0.1
    )
    dataset = make_image_dataset(scanned.records, scanned.labels, image_size=16, batch_size=8, training=False)
    images, targets = next(iter(dataset))
    images = images.numpy()
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255
    by_label = {scanned.labels[t]: image for t, image in zip(targets.numpy(), images, strict=True)}
    np.testing.assert_allclose(by_label["gray"], 100, atol=1)
    np.testing.assert_allclose(by_label["rgba"], np.broadcast_to([10, 20, 30], (16, 16, 3)), atol=1)
    np.testing.assert_allclose(by_label["bmp"], np.broadcast_to([0, 255, 0], (16, 16, 3)), atol=1)


def test_training_pipeline_shuffles_and_augments_only_the_train_side(tmp_path: Path) -> None:
    _good_dataset(tmp_path, {"cat": 16, "dog": 16})
    scanned = scan_dataset([str(tmp_path)], min_images_per_label=3)
    records = scanned.records
    from training.data import AugmentConfig

    validation = make_image_dataset(records, scanned.labels, image_size=24, batch_size=64, training=False)
    first = next(iter(validation))
    again = next(iter(validation))
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    assert first[1].numpy().tolist() == [scanned.labels.index(r.label) for r in records]
    train = make_image_dataset(
        records, scanned.labels, image_size=24, batch_size=64, training=True, augment=AugmentConfig(), seed=1
    )
    epoch_one, epoch_two = (next(iter(train)) for _ in range(2))
    assert sorted(epoch_one[1].numpy().tolist()) == sorted(first[1].numpy().tolist())
    assert epoch_one[1].numpy().tolist() != first[1].numpy().tolist() or not np.allclose(
        epoch_one[0], first[0]
    )
    assert not np.allclose(epoch_one[0].numpy(), epoch_two[0].numpy())


def test_augmentation_resamples_about_the_centre_and_keeps_shapes() -> None:
    import tensorflow as tf

    from training.data import AugmentConfig, augment_batch

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, 20, 20, 3)), dtype=tf.float32)
    unchanged = augment_batch(images, AugmentConfig(flip=False, rotation=0, zoom=0), seed=0)
    np.testing.assert_array_equal(unchanged.numpy(), images.numpy())
    near_identity = augment_batch(images, AugmentConfig(flip=False, rotation=1e-7, zoom=1e-7), seed=0)
    np.testing.assert_allclose(near_identity.numpy(), images.numpy(), atol=1e-2)
    flipped = augment_batch(images, AugmentConfig(flip=True, rotation=0, zoom=0), seed=3).numpy()
    for image, out in zip(images.numpy(), flipped, strict=True):
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
    augmented = augment_batch(images, AugmentConfig(), seed=1)
    assert augmented.shape == images.shape
    assert not np.allclose(augmented.numpy(), images.numpy())
    assert float(tf.reduce_min(augmented)) >= 0.0 and float(tf.reduce_max(augmented)) <= 255.0 + 1e-3


def test_demo_dataset_is_deterministic_and_complete(tmp_path: Path) -> None:
    one = make_demo_dataset(str(tmp_path / "one"), per_class=4, seed=3, image_size=32)
    two = make_demo_dataset(str(tmp_path / "two"), per_class=4, seed=3, image_size=32)
    other = make_demo_dataset(str(tmp_path / "other"), per_class=4, seed=4, image_size=32)
    assert one.files == 4 * len(DEMO_CLASSES) and one.labels == DEMO_CLASSES
    names = storage.list_files(str(tmp_path / "one"))
    assert len(names) == one.files
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
    assert any((tmp_path / "one" / n).read_bytes() != (tmp_path / "other" / n).read_bytes() for n in names)
    with Image.open(tmp_path / "one" / names[0]) as image:
        assert image.size == (32, 32) and image.format == "JPEG"
    assert other.files == two.files


@pytest.mark.slow
def test_scan_from_gcs_downloads_into_the_cache(gcs_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    make_demo_dataset(str(local), per_class=5, seed=0, image_size=24, labels=("circle", "square"))
    _write(local, "circle/sidecar.json", b"{}")
    storage.upload_tree(str(local), storage.join(gcs_bucket, "data"))
    cache = tmp_path / "cache"

    remote = scan_dataset([storage.join(gcs_bucket, "data")], min_images_per_label=2, cache_dir=cache)
    from_disk = scan_dataset([str(local)], min_images_per_label=2)

    assert remote.fingerprint == from_disk.fingerprint == dataset_fingerprint(from_disk.records)
    assert remote.report.skipped_counts["unsupported_extension"] == 1
    assert all(r.uri.startswith(gcs_bucket) and Path(r.local_path).is_file() for r in remote.records)
    assert all(Path(r.local_path).is_relative_to(cache) for r in remote.records)
    assert [r.side for r in remote.records] == [r.side for r in from_disk.records]
    with pytest.raises(DatasetError, match="cache folder"):
        scan_dataset([storage.join(gcs_bucket, "data")], min_images_per_label=2)
