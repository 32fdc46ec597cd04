"""Dataset ingestion and the ``tf.data`` input pipeline.

A dataset is one or more roots (local folders or ``gs://`` prefixes) laid out ``<label>/<image file>``; the
base dataset and the feedback queue's folders are scanned together. :func:`scan_dataset` lists every root,
validates every file (skipping and counting corrupt, empty, non-image and unsupported files) and groups the
valid files by content (sha256 of the bytes):

- the same bytes under one label in several files count once (a duplicate);
- the same bytes under different labels are a conflict: quarantined, held out of every split and listed in
  the report;
- a label left with fewer than ``min_images_per_label`` images is reported and left out of the run.

Each image gets its split (train / validation / test) from its content hash alone (:func:`split_for_hash`),
so identical bytes always share a split and an image keeps its split when data is added. Validation drives
early stopping and best-epoch selection; test is kept for the promotion gate. Files on GCS are downloaded
into a local cache folder, so the pipeline reads local files on every backend. :func:`make_image_dataset`
turns records into batches of float32 RGB pixels in ``[0, 255]`` with parallel decode, caching, optional
augmentation (train split only) and prefetch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

import storage
from storage import TfloopError

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp"})
Side = Literal["train", "validation", "test"]
SPLITS: tuple[Side, ...] = ("train", "validation", "test")
QUARANTINED = "quarantined"
SkipReason = Literal["empty", "unsupported_extension", "not_an_image", "corrupt", "outside_label_folder"]
SKIP_REASONS: tuple[SkipReason, ...] = (
    "empty",
    "unsupported_extension",
    "not_an_image",
    "corrupt",
    "outside_label_folder",
)
_IMAGE_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")
_MAX_LISTED_SKIPS = 200
_MAX_LISTED_CONFLICTS = 500
_HASH_SPACE = float(2**64)

logger = logging.getLogger(__name__)


class DatasetError(TfloopError):
    """The dataset cannot be trained on (too few labels or images, unreadable roots)."""


@dataclass(frozen=True)
class FileRecord:
    """One valid image: where it is, its label, its split (``side``), which root it came from, its sha256."""

    uri: str
    label: str
    relative_path: str
    side: Side
    root: str
    local_path: str
    sha256: str

    def read_bytes(self) -> bytes:
        """The image's bytes: from the local copy ingestion made when it is there, else from ``uri``."""
        local = storage.local_path(self.local_path) if self.local_path else None
        return local.read_bytes() if local is not None and local.is_file() else storage.read_bytes(self.uri)


@dataclass(frozen=True)
class SkippedFile:
    """A file ingestion left out, and why."""

    uri: str
    reason: SkipReason


@dataclass(frozen=True)
class Conflict:
    """The same bytes under different labels: held out of every split."""

    sha256: str
    labels: list[str]
    files: list[str]


@dataclass
class DataReport:
    """What ingestion found: per-label counts per split, skipped files by reason, duplicates, conflicts
    (quarantined), labels left out for too few images, and the dataset fingerprint.

    ``images`` counts distinct images that train, validate or test (duplicates once, conflicts and left-out
    labels not at all).
    """

    roots: list[str]
    labels: list[str]
    validation_fraction: float
    images: int
    train_counts: dict[str, int]
    validation_counts: dict[str, int]
    per_root_counts: dict[str, int]
    skipped_counts: dict[str, int]
    skipped: list[SkippedFile] = field(default_factory=list)
    fingerprint: str = ""
    test_fraction: float = 0.0
    test_counts: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    quarantined: list[Conflict] = field(default_factory=list)
    quarantined_count: int = 0
    excluded_labels: dict[str, int] = field(default_factory=dict)
    min_images_per_label: int = 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_counts.values())

    @property
    def split_counts(self) -> dict[str, int]:
        """Distinct images per split: ``{"train": n, "validation": n, "test": n}``."""
        return {
            "train": sum(self.train_counts.values()),
            "validation": sum(self.validation_counts.values()),
            "test": sum(self.test_counts.values()),
        }

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["skipped_total"] = self.skipped_total
        data["skipped_listed"] = len(self.skipped)
        data["split"] = self.split_counts
        return data


@dataclass(frozen=True)
class ScannedDataset:
    """The valid records of a scanned dataset, its label order and its report."""

    records: tuple[FileRecord, ...]
    labels: tuple[str, ...]
    report: DataReport
    quarantined: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.report.fingerprint

    def split_manifest(self) -> dict[str, list[str]]:
        """The sha256 of every image per split, and the quarantined ones (MLflow's ``split.json``)."""
        manifest: dict[str, list[str]] = {
            split: sorted(r.sha256 for r in self.records if r.side == split) for split in SPLITS
        }
        manifest[QUARANTINED] = sorted(self.quarantined)
        return manifest

    def side(self, side: Side) -> list[FileRecord]:
        return [record for record in self.records if record.side == side]

    def from_root(self, root: str) -> list[FileRecord]:
        return [record for record in self.records if record.root == root]


def split_for_hash(sha256: str, *, validation_fraction: float, test_fraction: float) -> Side:
    """The split of an image from its content hash only: the hash's first 64 bits as a number ``u`` in
    ``[0, 1)``; ``u < test_fraction`` is test, then ``validation_fraction`` more is validation, the rest
    train. A pure function of the hash and the fractions: an image keeps its split in every later run."""
    position = int(sha256[:16], 16) / _HASH_SPACE
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


def check_fractions(*, validation_fraction: float, test_fraction: float) -> None:
    """Raise :class:`DatasetError` unless both fractions are in (0, 1) and leave room for training."""
    for name, value in (("validation", validation_fraction), ("test", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DatasetError(f"{name} fraction must be between 0 and 1, got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"validation fraction {validation_fraction} + test fraction {test_fraction} leave nothing to "
            "train on; their sum must be below 1"
        )


def classify_image_bytes(name: str, data: bytes) -> SkipReason | None:
    """None if ``data`` is a complete image TensorFlow can decode, else the reason to skip it."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty"
    if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return "unsupported_extension"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in {"JPEG", "PNG", "GIF", "BMP", "MPO"}:
                    return "not_an_image"
                image.load()
    except UnidentifiedImageError:
        return "corrupt" if data.startswith(_IMAGE_SIGNATURES) else "not_an_image"
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return "corrupt"
    return None


def _cache_folder(cache_dir: Path, root: str) -> Path:
    return cache_dir / hashlib.sha256(root.encode("utf-8")).hexdigest()[:16]


def _validate_one(
    root: str, name: str, *, cache_dir: Path | None, validation_fraction: float, test_fraction: float
) -> FileRecord | SkippedFile:
    uri = storage.join(root, name)
    parts = PurePosixPath(name).parts
    if len(parts) < 2:
        return SkippedFile(uri=uri, reason="outside_label_folder")
    if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS or parts[-1].startswith("."):
        return SkippedFile(uri=uri, reason="unsupported_extension")
    data = storage.read_bytes(uri)
    reason = classify_image_bytes(name, data)
    if reason is not None:
        return SkippedFile(uri=uri, reason=reason)
    if storage.is_gcs(root):
        if cache_dir is None:
            raise DatasetError(f"{root} is on GCS: pass a local cache folder to download its images into")
        local = _cache_folder(cache_dir, root) / name
        if not (local.is_file() and local.stat().st_size == len(data) and local.read_bytes() == data):
            storage.write_bytes(str(local), data)
    else:
        local = storage.local_path(uri)
    sha256 = hashlib.sha256(data).hexdigest()
    return FileRecord(
        uri=uri,
        label=parts[0],
        relative_path=name,
        side=split_for_hash(sha256, validation_fraction=validation_fraction, test_fraction=test_fraction),
        root=root,
        local_path=str(local),
        sha256=sha256,
    )


def dataset_fingerprint(records: Sequence[FileRecord]) -> str:
    """A hash of the file list, labels and contents: equal fingerprints mean equal training data."""
    lines = sorted(f"{r.label}\t{r.relative_path}\t{r.sha256}" for r in records)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def scan_dataset(
    roots: Sequence[str],
    *,
    validation_fraction: float = 0.2,
    test_fraction: float = 0.2,
    min_images_per_label: int = 5,
    cache_dir: Path | None = None,
    required_roots: Sequence[str] | None = None,
    workers: int = 8,
    label_overrides: Mapping[str, str] | None = None,
) -> ScannedDataset:
    """List and validate every file below ``roots``; return the distinct images, labels and a report.

    Roots in ``required_roots`` (default: the first root) must exist; others (e.g. an empty feedback
    queue) may be missing. Files with the same bytes and label count once (the first by root order, then
    path); the same bytes under different labels are quarantined, unless ``label_overrides`` (sha256 ->
    label, a person's resolution) names the label they have from now on. A label with fewer than
    ``min_images_per_label`` distinct images is left out (reported and logged). Raises
    :class:`DatasetError` when fewer than two labels remain or the train split is empty.
    """
    if not roots:
        raise DatasetError(
            "no dataset given; pass --data with a folder or gs:// prefix laid out <label>/<image>"
        )
    check_fractions(validation_fraction=validation_fraction, test_fraction=test_fraction)
    required = list(required_roots) if required_roots is not None else [roots[0]]
    jobs: list[tuple[str, str]] = []
    for root in roots:
        names = storage.list_files(root)
        if not names and root in required:
            raise DatasetError(
                f"{root} holds no files; point --data at a folder or gs:// prefix laid out <label>/<image> "
                "(`tfloop data make-demo OUT` writes one)"
            )
        jobs.extend((root, name) for name in names)

    def work(job: tuple[str, str]) -> FileRecord | SkippedFile:
        return _validate_one(
            job[0],
            job[1],
            cache_dir=cache_dir,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(work, jobs))
    valid = [r for r in results if isinstance(r, FileRecord)]
    skipped = [r for r in results if isinstance(r, SkippedFile)]

    by_hash: dict[str, list[FileRecord]] = {}
    for record in valid:  # jobs are in root order, then path order: the first copy is the one kept
        by_hash.setdefault(record.sha256, []).append(record)
    unique: list[FileRecord] = []
    conflicts: list[Conflict] = []
    overrides = label_overrides or {}
    resolved = 0
    for sha256, copies in by_hash.items():
        labels_of = sorted({copy.label for copy in copies})
        chosen = overrides.get(sha256)
        if chosen is not None:
            kept = [copy for copy in copies if copy.label == chosen]
            unique.append(kept[0] if kept else replace(copies[0], label=chosen))
            resolved += len(labels_of) > 1
        elif len(labels_of) > 1:
            conflicts.append(Conflict(sha256=sha256, labels=labels_of, files=[copy.uri for copy in copies]))
        else:
            unique.append(copies[0])
    duplicates = len(valid) - len(unique) - sum(len(c.files) for c in conflicts)
    if resolved:
        logger.info("%d image(s) under different labels take the label a person chose for them", resolved)
    for conflict in conflicts[:20]:
        logger.warning(
            "quarantined: the same image is labelled %s (%s); it is held out of every split",
            " and ".join(conflict.labels),
            ", ".join(conflict.files),
        )

    per_label = Counter(r.label for r in unique)
    seen_labels = {PurePosixPath(name).parts[0] for _, name in jobs if len(PurePosixPath(name).parts) >= 2}
    excluded = {
        label: per_label[label] for label in sorted(seen_labels) if per_label[label] < min_images_per_label
    }
    for label, count in excluded.items():
        logger.warning(
            "label %r has %d valid distinct image(s), fewer than the minimum %d: left out of this run "
            "(add images to %s/ or lower --min-images)",
            label,
            count,
            min_images_per_label,
            label,
        )
    records = tuple(r for r in unique if r.label not in excluded)
    labels = tuple(sorted({r.label for r in records}))
    if len(labels) < 2:
        left_out = f"; left out for fewer than {min_images_per_label} images: {excluded}" if excluded else ""
        raise DatasetError(
            f"found {len(labels)} usable label(s) {list(labels)} in {list(roots)}{left_out}; a classifier "
            "needs at least two label folders <label>/<image> with enough images each"
        )
    counts = {split: Counter(r.label for r in records if r.side == split) for split in SPLITS}
    if not counts["train"]:
        raise DatasetError(
            "the split left the train side empty; add images or lower --validation-fraction/--test-fraction"
        )
    skipped_counts = Counter(s.reason for s in skipped)
    report = DataReport(
        roots=list(roots),
        labels=list(labels),
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        min_images_per_label=min_images_per_label,
        images=len(records),
        train_counts={label: counts["train"][label] for label in labels},
        validation_counts={label: counts["validation"][label] for label in labels},
        test_counts={label: counts["test"][label] for label in labels},
        per_root_counts={root: sum(1 for r in records if r.root == root) for root in roots},
        skipped_counts={reason: skipped_counts[reason] for reason in SKIP_REASONS},
        skipped=skipped[:_MAX_LISTED_SKIPS],
        duplicates=duplicates,
        quarantined=sorted(conflicts, key=lambda c: c.sha256)[:_MAX_LISTED_CONFLICTS],
        quarantined_count=len(conflicts),
        excluded_labels=excluded,
        fingerprint=dataset_fingerprint(records),
    )
    return ScannedDataset(
        records=records,
        labels=labels,
        report=report,
        quarantined=tuple(sorted(c.sha256 for c in conflicts)),
    )


def report_json(report: DataReport) -> str:
    """The data report as indented JSON (what MLflow stores as ``data_report.json``)."""
    return json.dumps(report.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# tf.data pipeline


@dataclass(frozen=True)
class AugmentConfig:
    """Train-side augmentation: horizontal flip, small rotation (fraction of a turn) and zoom."""

    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1

    @property
    def active(self) -> bool:
        return self.flip or self.rotation > 0 or self.zoom > 0


def decode_image(data: tf.Tensor, *, image_size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF (first frame)/BMP bytes -> float32 ``(S, S, 3)`` RGB in ``[0, 255]``.

    Grayscale and RGBA inputs become RGB (alpha is dropped).
    """
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    image = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def augment_batch(images: tf.Tensor, augment: AugmentConfig, *, seed: int) -> tf.Tensor:
    """Random horizontal flip, rotation and zoom of a float32 ``(N, H, W, 3)`` batch, in one resampling.

    Rotation and zoom are folded into a single affine transform per image (reflect fill, bilinear), so the
    CPU resamples each image once instead of once per augmentation; that keeps augmentation cheap enough
    not to starve training on a CPU-only machine.
    """
    import math

    import tensorflow as tf

    shape = tf.shape(images)
    batch = shape[0]
    if augment.flip:
        flip = tf.random.uniform([batch, 1, 1, 1], seed=seed) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    if augment.rotation <= 0 and augment.zoom <= 0:
        return images
    angles = tf.random.uniform([batch], -augment.rotation, augment.rotation, seed=seed + 1) * 2 * math.pi
    scales = tf.random.uniform([batch], 1 - augment.zoom, 1 + augment.zoom, seed=seed + 2)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a0, a1 = scales * tf.cos(angles), -scales * tf.sin(angles)
    b0, b1 = scales * tf.sin(angles), scales * tf.cos(angles)
    zeros = tf.zeros_like(a0)
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotate/scale about the centre.
    transforms = tf.stack(
        [a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, zeros, zeros], axis=1
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def make_image_dataset(
    records: Sequence[FileRecord],
    labels: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    cache: bool = True,
) -> tf.data.Dataset:
    """Batches of ``(images float32 [B, S, S, 3] in [0, 255], label index int32 [B])`` from ``records``.

    Files are read and decoded in parallel, cached in memory as uint8 after resizing (``cache``), shuffled
    each epoch and augmented on the train side (``training``), and prefetched.
    """
    import tensorflow as tf

    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({r.label for r in records} - set(index))
    if unknown:
        raise DatasetError(f"labels {unknown} are not among the model's labels {list(labels)}")
    paths = [r.local_path for r in records]
    targets = [index[r.label] for r in records]
    autotune = tf.data.AUTOTUNE

    def load(path: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = decode_image(tf.io.read_file(path), image_size=image_size)
        return tf.cast(tf.round(image), tf.uint8), target

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, dtype=tf.string), tf.constant(targets, dtype=tf.int32))
    )
    options = tf.data.Options()
    options.deterministic = not training
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    dataset = dataset.map(load, num_parallel_calls=autotune)
    if cache:
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(min(len(paths), 10_000), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, num_parallel_calls=autotune)
    dataset = dataset.map(lambda images, y: (tf.cast(images, tf.float32), y), num_parallel_calls=autotune)
    if training and augment is not None and augment.active:
        config = augment

        def augment_pair(images: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.clip_by_value(augment_batch(images, config, seed=seed), 0.0, 255.0), y

        dataset = dataset.map(augment_pair, num_parallel_calls=autotune)
    return dataset.prefetch(autotune)
