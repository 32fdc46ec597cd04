"""The drift watch's statistics: a training run's reference (what the model saw and how sure it was on the
test split) and the comparison of recent predictions with it.

Population stability index (PSI) on binned distributions: the top-1 confidence, the predicted-class shares,
and the inputs' encoded size and pixel count; a chi-square goodness-of-fit test on the predicted-class
counts. Conventional PSI reading: under 0.1 stable, 0.1 to 0.2 a moderate shift, 0.2 and over significant.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

REFERENCE_ARTIFACT = "drift/reference.json"
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(11))
BYTES_EDGES = (0.0, *(float(2**power) for power in range(10, 25)), math.inf)
PIXELS_EDGES = (0.0, *(float(side * side) for side in (32, 64, 96, 128, 224, 299, 512, 1024, 2048)), math.inf)
SHARE_FLOOR = 1e-4  # empty bins would make PSI infinite


def histogram_shares(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """The share of ``values`` in each bin between consecutive ``edges`` (the last bin includes its top)."""
    if not values:
        return [0.0] * (len(edges) - 1)
    counts, _ = np.histogram(np.clip(np.asarray(values, dtype=np.float64), edges[0], None), bins=edges)
    return (counts / max(1, counts.sum())).tolist()


def label_shares(labels: Sequence[str], order: Sequence[str]) -> list[float]:
    """The share of each label of ``order`` among ``labels``."""
    counts = Counter(labels)
    total = max(1, len(labels))
    return [counts.get(label, 0) / total for label in order]


@dataclass(frozen=True)
class DriftReference:
    """What a training run's model saw and answered: the basis ``tfloop monitor`` compares against."""

    labels: list[str]
    class_prior: list[float]  # label shares of the training split
    predicted_shares: list[float]  # predicted-class shares on the test split
    confidence: list[float]  # top-1 score shares over CONFIDENCE_EDGES, on the test split
    input_bytes: list[float]  # over BYTES_EDGES, test split
    input_pixels: list[float]  # over PIXELS_EDGES, test split
    test_items: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        return cls(
            labels=[str(label) for label in data["labels"]],
            class_prior=[float(x) for x in data["class_prior"]],
            predicted_shares=[float(x) for x in data["predicted_shares"]],
            confidence=[float(x) for x in data["confidence"]],
            input_bytes=[float(x) for x in data["input_bytes"]],
            input_pixels=[float(x) for x in data["input_pixels"]],
            test_items=int(data["test_items"]),
        )


def build_reference(
    *,
    labels: Sequence[str],
    train_labels: Sequence[str],
    test_predicted: Sequence[str],
    test_confidences: Sequence[float],
    test_bytes: Sequence[int],
    test_pixels: Sequence[int],
) -> DriftReference:
    """The reference of a run from its training labels and its model's answers on the test split."""
    return DriftReference(
        labels=list(labels),
        class_prior=label_shares(train_labels, labels),
        predicted_shares=label_shares(test_predicted, labels),
        confidence=histogram_shares(test_confidences, CONFIDENCE_EDGES),
        input_bytes=histogram_shares([float(b) for b in test_bytes], BYTES_EDGES),
        input_pixels=histogram_shares([float(p) for p in test_pixels], PIXELS_EDGES),
        test_items=len(test_predicted),
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
    shares = np.maximum(np.asarray(expected_shares, dtype=np.float64), SHARE_FLOOR)
    shares = shares / shares.sum()
    expected = shares * total
    statistic = float(np.sum((np.asarray(observed, dtype=np.float64) - expected) ** 2 / expected))
    dof = max(1, len(observed) - 1)
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class DriftOptions:
    """When the watch calls drift."""

    psi_threshold: float = 0.2
    chi_square_alpha: float = 0.01
    min_predictions: int = 50


@dataclass(frozen=True)
class DriftCheck:
    """One statistic against its threshold."""

    name: str
    statistic: str
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

    @property
    def drift(self) -> bool:
        return self.enough and any(check.drifted for check in self.checks)


def compare(
    reference: DriftReference,
    *,
    predicted: Sequence[str],
    confidences: Sequence[float],
    input_bytes: Sequence[int],
    input_pixels: Sequence[int],
    options: DriftOptions,
) -> DriftReport:
    """Recent predictions against ``reference``. Class shares drift when their PSI crosses the threshold,
    or when the chi-square test rejects them at ``chi_square_alpha`` and their PSI shows at least a moderate
    shift (half the threshold): with many predictions the test alone flags shifts too small to matter."""
    shares = label_shares(predicted, reference.labels)
    confidence = histogram_shares(confidences, CONFIDENCE_EDGES)
    share_psi = psi(reference.predicted_shares, shares)
    tally = Counter(predicted)
    counts = [tally.get(label, 0) for label in reference.labels]
    p_value = chi_square_p_value(reference.predicted_shares, counts) if predicted else 1.0
    threshold = options.psi_threshold
    checks = [
        DriftCheck("predicted class shares", "psi", share_psi, threshold, share_psi >= threshold),
        DriftCheck(
            "predicted class shares",
            "chi_square_p",
            p_value,
            options.chi_square_alpha,
            p_value < options.chi_square_alpha and share_psi >= threshold / 2,
        ),
    ]
    for name, expected, actual in (
        ("top-1 confidence", reference.confidence, confidence),
        (
            "input bytes",
            reference.input_bytes,
            histogram_shares([float(b) for b in input_bytes], BYTES_EDGES),
        ),
        (
            "input pixels",
            reference.input_pixels,
            histogram_shares([float(p) for p in input_pixels], PIXELS_EDGES),
        ),
    ):
        value = psi(expected, actual)
        checks.append(DriftCheck(name, "psi", value, threshold, value >= threshold))
    return DriftReport(
        predictions=len(predicted),
        checks=checks,
        enough=len(predicted) >= options.min_predictions,
        recent_shares=shares,
        recent_confidence=confidence,
    )


def image_sizes(images: Sequence[bytes]) -> list[tuple[int, int]]:
    """(encoded bytes, width * height) of each image, from its header."""
    import io

    from PIL import Image

    sizes = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            sizes.append((len(data), image.width * image.height))
    return sizes
