"""Evaluation of classifiers on labelled file records: accuracy, per-class precision/recall/F1, macro F1 and
the confusion matrix.

:func:`evaluate_model` evaluates a Keras model on a validation split. :func:`evaluate_predict_fn` evaluates
ANY prediction function that maps encoded image bytes to top-1 labels with their probabilities
(:data:`TopPredictFn`: a SavedModel signature, a served model, a Keras model wrapped by
:func:`keras_top1_fn`), so a champion and a candidate can be compared on
identical files even when their label sets differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import FileRecord, make_image_dataset

if TYPE_CHECKING:
    import keras

TopPredictFn = Callable[[list[bytes]], Sequence[tuple[str, float]]]
"""Encoded images in, the top-1 label and its probability per image out (what the gate scores)."""


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall, F1 and support (true items) of one label."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalReport:
    """Metrics over ``n`` items; ``confusion[i][j]`` counts items of ``labels[i]`` predicted ``labels[j]``."""

    labels: list[str]
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> EvalReport:
    """Metrics from label indices into ``labels``; macro F1 averages labels with true items or predictions."""
    n_labels = len(labels)
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)
    for truth, guess in zip(y_true, y_pred, strict=True):
        confusion[int(truth), int(guess)] += 1
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros(n_labels), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros(n_labels), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(n_labels), where=denominator > 0)
    present = (support > 0) | (predicted > 0)
    total = int(confusion.sum())
    return EvalReport(
        labels=list(labels),
        n=total,
        accuracy=float(true_positive.sum() / total) if total else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class={
            label: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, label in enumerate(labels)
        },
        confusion=confusion.tolist(),
    )


def evaluate_model(
    model: keras.Model,
    records: Sequence[FileRecord],
    labels: Sequence[str],
    *,
    image_size: int,
    batch_size: int = 32,
) -> EvalReport:
    """Evaluate a Keras classifier (output order ``labels``) on ``records`` read from their local paths."""
    return evaluate_model_answers(model, records, labels, image_size=image_size, batch_size=batch_size)[0]


def evaluate_model_answers(
    model: keras.Model,
    records: Sequence[FileRecord],
    labels: Sequence[str],
    *,
    image_size: int,
    batch_size: int = 32,
) -> tuple[EvalReport, list[int], list[float]]:
    """:func:`evaluate_model`'s report, with the model's answer for each record (predicted label index and
    top-1 score, in record order)."""
    if not records:
        return compute_report([], [], labels), [], []
    dataset = make_image_dataset(
        records, labels, image_size=image_size, batch_size=batch_size, training=False, cache=False
    )
    y_true: list[int] = []
    y_pred: list[int] = []
    scores: list[float] = []
    for images, targets in dataset:
        probabilities = np.asarray(model(images, training=False))
        y_pred.extend(np.argmax(probabilities, axis=-1).tolist())
        scores.extend(np.max(probabilities, axis=-1).astype(float).tolist())
        y_true.extend(np.asarray(targets).tolist())
    return compute_report(y_true, y_pred, labels), y_pred, scores


def evaluate_predict_fn(
    predict: TopPredictFn,
    records: Sequence[FileRecord],
    *,
    labels: Sequence[str] | None = None,
    batch_size: int = 32,
) -> EvalReport:
    """Evaluate ``predict`` (encoded image bytes -> top-1 label and probability each) on ``records``.

    The report's label order is ``labels`` (default: the records' labels, sorted); predicted names outside
    it are appended, so a model that predicts a label the data lacks is counted wrong, not dropped.
    """
    order = list(labels) if labels is not None else sorted({r.label for r in records})
    for record in records:
        if record.label not in order:
            order.append(record.label)
    truths: list[str] = []
    guesses: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        predicted = [label for label, _ in predict([r.read_bytes() for r in batch])]
        if len(predicted) != len(batch):
            raise ValueError(f"predict returned {len(predicted)} labels for {len(batch)} images")
        truths.extend(r.label for r in batch)
        guesses.extend(str(p) for p in predicted)
    for guess in guesses:
        if guess not in order:
            order.append(guess)
    index = {label: i for i, label in enumerate(order)}
    return compute_report([index[t] for t in truths], [index[g] for g in guesses], order)


def keras_top1_fn(
    model: keras.Model, labels: Sequence[str], *, image_size: int, batch_size: int = 32
) -> TopPredictFn:
    """A :data:`TopPredictFn` for a Keras classifier: decode like training, predict, return the top-1
    label name and its probability."""
    import tensorflow as tf

    from training.data import decode_image

    def predict(images: list[bytes]) -> list[tuple[str, float]]:
        batch = tf.stack([decode_image(tf.constant(data), image_size=image_size) for data in images])
        probabilities = np.asarray(model.predict(batch, batch_size=batch_size, verbose=0))
        best = np.argmax(probabilities, axis=-1)
        return [(labels[i], float(row[i])) for i, row in zip(best, probabilities, strict=True)]

    return predict
