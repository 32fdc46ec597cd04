"""The drift watch's statistics: a training run's reference (what the model was trained on and how sure it
was on the test split) and the comparison of recent predictions with it.

Population stability index (PSI) on binned distributions: the predicted-class shares against the training
split's class prior, the top-1 confidence against the test split's, and the inputs' encoded size, width,
height and format against the training images'; a chi-square goodness-of-fit test of the predicted-class
counts against the class prior. Conventional PSI reading: under 0.1 stable, 0.1 to 0.2 a moderate shift,
0.2 and over significant. numpy only: the chi-square survival function is approximated here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

REFERENCE_ARTIFACT = "drift/reference.json"  # in the training run's MLflow artifacts
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(11))
BYTES_EDGES = (0.0, *(float(2**power) for power in range(10, 25)), math.inf)
SIDE_EDGES = (
    0.0,
    *(float(s) for s in (32, 64, 96, 128, 160, 224, 256, 320, 384, 512, 640, 800, 1024, 1600, 2048, 4096)),
    math.inf,
)
INPUT_SAMPLE = 2000  # training images whose headers the reference reads at most
SHARE_FLOOR = 1e-4  # empty bins would make PSI infinite
_PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "GIF": "gif", "BMP": "bmp"}


def histogram_shares(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """The share of ``values`` in each bin between consecutive ``edges`` (the last bin includes its top)."""
    if not len(values):
        return [0.0] * (len(edges) - 1)
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), edges[0], None), bins=edges)
    return (counts / max(1, counts.sum())).tolist()


def label_shares(labels: Sequence[str], order: Sequence[str]) -> list[float]:
    """The share of each label of ``order`` among ``labels``."""
    counts = Counter(labels)
    total = max(1, len(labels))
    return [counts.get(label, 0) / total for label in order]


def format_shares(formats: Sequence[str]) -> dict[str, float]:
    """The share of each image format (``jpeg``, ``png``, ...) among ``formats``."""
    counts = Counter(formats)
    total = max(1, len(formats))
    return {name: count / total for name, count in sorted(counts.items())}


@dataclass(frozen=True)
class InputStats:
    """Encoded size, width, height and format of a set of images (one entry per image)."""

    bytes: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    format: list[str] = field(default_factory=list)


def read_input_stats(paths: Sequence[str], *, limit: int = INPUT_SAMPLE) -> InputStats:
    """Size and header (width, height, format) of local image files; no pixel is decoded. Over ``limit``
    files, an evenly spread sample (by path hash, so the same files every time) stands for them."""
    from PIL import Image

    chosen = sorted(paths, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())[:limit]
    stats = InputStats()
    for path in chosen:
        with Image.open(path) as image:
            stats.width.append(image.width)
            stats.height.append(image.height)
            stats.format.append(_PIL_FORMATS.get(str(image.format), str(image.format).lower()))
        stats.bytes.append(os.path.getsize(path))
    return stats


@dataclass(frozen=True)
class DriftReference:
    """What a training run's model was trained on and answered: the basis ``tfloop monitor`` compares
    against. Written by training (MLflow artifact :data:`REFERENCE_ARTIFACT`), carried by export into the
    published version (``storage.versions.REFERENCE_FILE``)."""

    labels: list[str]
    class_prior: list[float]  # label shares of the training split, in ``labels`` order
    predicted_shares: list[float]  # predicted-class shares on the test split
    confidence: list[float]  # top-1 score shares over CONFIDENCE_EDGES, test split
    input_bytes: list[float]  # encoded size shares over BYTES_EDGES, training images
    input_width: list[float]  # over SIDE_EDGES, training images
    input_height: list[float]  # over SIDE_EDGES, training images
    input_formats: dict[str, float]  # format shares, training images
    train_items: int
    test_items: int
    input_items: int  # training images the input statistics were read from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        """Raises KeyError, TypeError or ValueError for a document that is not a reference."""
        labels = [str(label) for label in data["labels"]]
        prior = [float(x) for x in data["class_prior"]]
        if not labels or len(prior) != len(labels):
            raise ValueError("labels and class_prior must be non-empty and of one length")
        return cls(
            labels=labels,
            class_prior=prior,
            predicted_shares=[float(x) for x in data["predicted_shares"]],
            confidence=[float(x) for x in data["confidence"]],
            input_bytes=[float(x) for x in data["input_bytes"]],
            input_width=[float(x) for x in data["input_width"]],
            input_height=[float(x) for x in data["input_height"]],
            input_formats={str(k): float(v) for k, v in dict(data["input_formats"]).items()},
            train_items=int(data["train_items"]),
            test_items=int(data["test_items"]),
            input_items=int(data["input_items"]),
        )


def build_reference(
    *,
    labels: Sequence[str],
    train_labels: Sequence[str],
    test_predicted: Sequence[str],
    test_confidences: Sequence[float],
    inputs: InputStats,
) -> DriftReference:
    """The reference of a run from its training labels and images and its model's answers on the test
    split."""
    return DriftReference(
        labels=list(labels),
        class_prior=label_shares(train_labels, labels),
        predicted_shares=label_shares(test_predicted, labels),
        confidence=histogram_shares(test_confidences, CONFIDENCE_EDGES),
        input_bytes=histogram_shares([float(b) for b in inputs.bytes], BYTES_EDGES),
        input_width=histogram_shares([float(w) for w in inputs.width], SIDE_EDGES),
        input_height=histogram_shares([float(h) for h in inputs.height], SIDE_EDGES),
        input_formats=format_shares(inputs.format),
        train_items=len(train_labels),
        test_items=len(test_predicted),
        input_items=len(inputs.bytes),
    )


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two binned share vectors (empty bins floored)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), SHARE_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), SHARE_FLOOR)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def chi_square_p_value(expected_shares: Sequence[float], observed: Sequence[int]) -> float:
    """p-value of a chi-square goodness-of-fit test of ``observed`` counts against ``expected_shares``.

    The survival function uses the Wilson-Hilferty approximation (within about 0.01 of the exact value for
    one degree of freedom and closer for more), so no statistics library is needed."""
    total = float(sum(observed))
    if total <= 0:
        return 1.0
    shares = np.maximum(np.asarray(expected_shares, dtype=np.float64), SHARE_FLOOR)
    shares = shares / shares.sum()
    expected = shares * total
    statistic = float(np.sum((np.asarray(observed, dtype=np.float64) - expected) ** 2 / expected))
    dof = max(1, len(observed) - 1)
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class DriftOptions:
    """When the watch calls drift: a PSI at or over ``psi_threshold``, or a chi-square p-value under
    ``chi_square_alpha``; never with fewer than ``min_predictions`` predictions."""

    psi_threshold: float = 0.2
    chi_square_alpha: float = 0.01
    min_predictions: int = 50


@dataclass(frozen=True)
class DriftCheck:
    """One statistic against its threshold."""

    name: str
    statistic: str  # "psi" (drift at value >= threshold) or "chi_square_p" (drift at value < threshold)
    value: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    """The comparison of recent predictions with a reference."""

    predictions: int
    checks: list[DriftCheck]
    enough: bool
    recent_shares: list[float] = field(default_factory=list)
    recent_confidence: list[float] = field(default_factory=list)
    recent_bytes: list[float] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return self.enough and any(check.drifted for check in self.checks)

    @property
    def verdict(self) -> str:
        if not self.enough:
            return "too few predictions"
        return "drift" if self.drift else "no drift"


def compare(
    reference: DriftReference,
    *,
    predicted: Sequence[str],
    confidences: Sequence[float],
    inputs: InputStats,
    options: DriftOptions,
) -> DriftReport:
    """Recent predictions (labels, top-1 scores, and the inputs they were made on) against ``reference``.

    Class shares drift when their PSI against the class prior crosses the threshold, or when the chi-square
    test rejects the prior at ``chi_square_alpha`` and their PSI shows at least a moderate shift (half the
    threshold): with many predictions the test alone flags shifts too small to matter. A check never
    drifts with fewer than ``min_predictions`` predictions (``enough`` is False then)."""
    enough = len(predicted) >= options.min_predictions
    threshold = options.psi_threshold
    shares = label_shares(predicted, reference.labels)
    confidence = histogram_shares(confidences, CONFIDENCE_EDGES)
    recent_bytes = histogram_shares([float(b) for b in inputs.bytes], BYTES_EDGES)
    share_psi = psi(reference.class_prior, shares)
    tally = Counter(predicted)
    p_value = chi_square_p_value(reference.class_prior, [tally.get(label, 0) for label in reference.labels])
    formats = sorted(set(reference.input_formats) | set(inputs.format))
    recent_formats = format_shares(inputs.format)
    checks = [
        DriftCheck("predicted class shares", "psi", share_psi, threshold, enough and share_psi >= threshold),
        DriftCheck(
            "predicted class shares",
            "chi_square_p",
            p_value,
            options.chi_square_alpha,
            enough and p_value < options.chi_square_alpha and share_psi >= threshold / 2,
        ),
    ]
    for name, expected, actual in (
        ("top-1 confidence", reference.confidence, confidence),
        ("input bytes", reference.input_bytes, recent_bytes),
        (
            "input width",
            reference.input_width,
            histogram_shares([float(w) for w in inputs.width], SIDE_EDGES),
        ),
        (
            "input height",
            reference.input_height,
            histogram_shares([float(h) for h in inputs.height], SIDE_EDGES),
        ),
        (
            "input format",
            [reference.input_formats.get(f, 0.0) for f in formats],
            [recent_formats.get(f, 0.0) for f in formats],
        ),
    ):
        value = psi(expected, actual) if len(expected) > 1 else 0.0
        checks.append(DriftCheck(name, "psi", value, threshold, enough and value >= threshold))
    return DriftReport(
        predictions=len(predicted),
        checks=checks,
        enough=enough,
        recent_shares=shares,
        recent_confidence=confidence,
        recent_bytes=recent_bytes,
    )
