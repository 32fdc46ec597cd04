"""The promotion gate: decide whether a candidate model may replace the current champion.

Like TFX's evaluator, both models are scored on the SAME held-out data, which includes a held-out share of
the user-corrected (feedback) items. :func:`evaluate_gate` is a pure function over those scores; the
evaluation glue below scores a Keras candidate and an exported champion SavedModel on dataset files, and
:func:`log_gate_decision` records the decision on the candidate's MLflow run.

Rules (each a :class:`GateCheck` in the decision):
- every candidate must reach the absolute floors (``min_accuracy``, ``min_macro_f1``);
- with a champion, the candidate may not be worse than it by more than ``max_accuracy_drop`` on accuracy,
  ``max_macro_f1_drop`` on macro F1, nor ``max_corrected_accuracy_drop`` on the corrected-label slice
  (compared only when the slice has at least ``min_corrected_items`` items; otherwise the check is skipped
  and the reason says so).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from storage import TfloopError

if TYPE_CHECKING:
    from training.data import FileRecord

LabelPredictFn = Callable[[list[bytes]], Sequence[str]]
"""Encoded images in, one predicted label name per image out (what training.evaluate calls PredictFn)."""


class GateError(TfloopError):
    """The gate was asked something it cannot answer (bad policy, models scored on different data)."""


@dataclass(frozen=True)
class EvaluationMetrics:
    """One model's scores on the held-out data, overall and on the corrected-label slice."""

    accuracy: float
    macro_f1: float
    count: int
    corrected_accuracy: float | None = None
    corrected_macro_f1: float | None = None
    corrected_count: int = 0

    def __post_init__(self) -> None:
        for name in ("accuracy", "macro_f1", "corrected_accuracy", "corrected_macro_f1"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value <= 1.0) and not math.isnan(value):
                raise GateError(f"metric {name}={value} is outside [0, 1]; pass fractions, not percentages")
        if self.count < 0 or self.corrected_count < 0 or self.corrected_count > self.count:
            raise GateError(
                f"counts are inconsistent (count={self.count}, corrected_count={self.corrected_count}): "
                "the corrected slice is part of the held-out data"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationMetrics:
        """Build from a dict such as :meth:`to_dict` gives (unknown keys ignored)."""
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GatePolicy:
    """Margins and floors of the gate; fractions in [0, 1]."""

    max_accuracy_drop: float = 0.01
    max_macro_f1_drop: float = 0.01
    max_corrected_accuracy_drop: float = 0.0
    min_accuracy: float = 0.5
    min_macro_f1: float = 0.0
    min_corrected_items: int = 3

    def __post_init__(self) -> None:
        for name in (
            "max_accuracy_drop",
            "max_macro_f1_drop",
            "max_corrected_accuracy_drop",
            "min_accuracy",
            "min_macro_f1",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise GateError(f"gate policy {name}={value} must be a fraction between 0 and 1")
        if self.min_corrected_items < 1:
            raise GateError(f"gate policy min_corrected_items={self.min_corrected_items} must be at least 1")


@dataclass(frozen=True)
class GateCheck:
    """One rule of the gate, with the numbers it compared."""

    name: str
    passed: bool
    candidate: float | None
    reference: float | None
    limit: float | None
    detail: str
    skipped: bool = False


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: passed or not, why, and both models' metrics."""

    passed: bool
    reason: str
    candidate: EvaluationMetrics
    champion: EvaluationMetrics | None
    policy: GatePolicy
    checks: tuple[GateCheck, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "candidate": self.candidate.to_dict(),
            "champion": self.champion.to_dict() if self.champion else None,
            "policy": asdict(self.policy),
            "checks": [asdict(check) for check in self.checks],
        }

    def to_markdown(self, *, title: str = "Model gate") -> str:
        """A markdown report: verdict, reason, a metrics table for both models and the checks."""
        verdict = "PASSED" if self.passed else "REFUSED"
        rows = [
            ("accuracy", self.candidate.accuracy, self.champion.accuracy if self.champion else None),
            ("macro F1", self.candidate.macro_f1, self.champion.macro_f1 if self.champion else None),
            (
                "corrected-label accuracy",
                self.candidate.corrected_accuracy,
                self.champion.corrected_accuracy if self.champion else None,
            ),
            (
                "corrected-label macro F1",
                self.candidate.corrected_macro_f1,
                self.champion.corrected_macro_f1 if self.champion else None,
            ),
        ]
        lines = [
            f"# {title}: {verdict}",
            "",
            f"**Reason:** {self.reason}",
            "",
            "| metric | candidate | champion |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {name} | {_fmt(cand)} | {_fmt(champ)} |" for name, cand, champ in rows]
        champion_count = str(self.champion.count) if self.champion else "-"
        champion_corrected = str(self.champion.corrected_count) if self.champion else "-"
        lines.append(f"| held-out items | {self.candidate.count} | {champion_count} |")
        lines.append(f"| corrected-label items | {self.candidate.corrected_count} | {champion_corrected} |")
        lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
        for check in self.checks:
            result = "skipped" if check.skipped else ("pass" if check.passed else "FAIL")
            lines.append(f"| {check.name} | {result} | {check.detail} |")
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _floor_check(name: str, value: float, floor: float) -> GateCheck:
    passed = value >= floor
    relation = ">=" if passed else "<"
    return GateCheck(
        name=f"{name} floor",
        passed=passed,
        candidate=value,
        reference=None,
        limit=floor,
        detail=f"candidate {name} {value:.4f} {relation} floor {floor:.4f}",
    )


def _drop_check(name: str, candidate: float, champion: float, max_drop: float) -> GateCheck:
    limit = champion - max_drop
    # A tiny tolerance keeps float noise (0.9 - 0.0 vs 0.8999999) from refusing an equal model.
    passed = candidate >= limit - 1e-9
    relation = ">=" if passed else "<"
    return GateCheck(
        name=f"{name} vs champion",
        passed=passed,
        candidate=candidate,
        reference=champion,
        limit=limit,
        detail=(
            f"candidate {name} {candidate:.4f} {relation} champion {champion:.4f} - margin {max_drop:.4f}"
        ),
    )


def evaluate_gate(
    candidate_metrics: EvaluationMetrics,
    champion_metrics: EvaluationMetrics | None,
    *,
    policy: GatePolicy,
) -> GateDecision:
    """Decide whether the candidate may be promoted; pure (no I/O).

    ``champion_metrics`` is None for a first model: then only the absolute floors apply. Both models must
    have been scored on the same held-out data (same item counts), else :class:`GateError`.
    """
    if champion_metrics is not None and (
        champion_metrics.count != candidate_metrics.count
        or champion_metrics.corrected_count != candidate_metrics.corrected_count
    ):
        raise GateError(
            "candidate and champion were scored on different data "
            f"({candidate_metrics.count}/{candidate_metrics.corrected_count} vs "
            f"{champion_metrics.count}/{champion_metrics.corrected_count} items/corrected items); "
            "evaluate both on the same held-out records"
        )
    if candidate_metrics.count == 0:
        raise GateError("the held-out data is empty: nothing to judge the candidate on; add validation data")

    checks: list[GateCheck] = [
        _floor_check("accuracy", candidate_metrics.accuracy, policy.min_accuracy),
        _floor_check("macro F1", candidate_metrics.macro_f1, policy.min_macro_f1),
    ]
    if champion_metrics is not None:
        checks.append(
            _drop_check(
                "accuracy", candidate_metrics.accuracy, champion_metrics.accuracy, policy.max_accuracy_drop
            )
        )
        checks.append(
            _drop_check(
                "macro F1", candidate_metrics.macro_f1, champion_metrics.macro_f1, policy.max_macro_f1_drop
            )
        )
        checks.append(_corrected_check(candidate_metrics, champion_metrics, policy))

    failed = [check for check in checks if not check.passed]
    skipped = [check for check in checks if check.skipped]
    if failed:
        reason = "refused: " + "; ".join(check.detail for check in failed)
    elif champion_metrics is None:
        reason = "passed: first model (no champion), " + "; ".join(
            check.detail for check in checks if not check.skipped
        )
    else:
        reason = "passed: " + "; ".join(check.detail for check in checks if not check.skipped)
    if skipped:
        reason += " (" + "; ".join(check.detail for check in skipped) + ")"
    return GateDecision(
        passed=not failed,
        reason=reason,
        candidate=candidate_metrics,
        champion=champion_metrics,
        policy=policy,
        checks=tuple(checks),
    )


def _corrected_check(
    candidate: EvaluationMetrics, champion: EvaluationMetrics, policy: GatePolicy
) -> GateCheck:
    name = "corrected-label accuracy"
    if (
        candidate.corrected_count < policy.min_corrected_items
        or candidate.corrected_accuracy is None
        or champion.corrected_accuracy is None
    ):
        return GateCheck(
            name=f"{name} vs champion",
            passed=True,
            skipped=True,
            candidate=candidate.corrected_accuracy,
            reference=champion.corrected_accuracy,
            limit=None,
            detail=(
                f"corrected-label slice not compared: {candidate.corrected_count} held-out corrected "
                f"item(s), fewer than min_corrected_items={policy.min_corrected_items}"
            ),
        )
    return _drop_check(
        name, candidate.corrected_accuracy, champion.corrected_accuracy, policy.max_corrected_accuracy_drop
    )


# --- evaluation glue: score both models on the same held-out files -------------------------------------


def score_predictions(
    truths: Sequence[str], predictions: Sequence[str], corrected: Sequence[bool]
) -> EvaluationMetrics:
    """Metrics overall and on the corrected-label slice, from one predicted label name per item.

    Accuracy and macro F1 are computed like training's validation metrics
    (:func:`training.evaluate.compute_report`).
    """
    from training.evaluate import compute_report

    if not len(truths) == len(predictions) == len(corrected):
        raise GateError("truths, predictions and corrected flags must have one entry per held-out item")

    def report(pairs: list[tuple[str, str]]) -> tuple[float, float]:
        order = sorted({label for pair in pairs for label in pair})
        index = {label: i for i, label in enumerate(order)}
        result = compute_report([index[t] for t, _ in pairs], [index[p] for _, p in pairs], order)
        return result.accuracy, result.macro_f1

    pairs = list(zip(truths, predictions, strict=True))
    accuracy, macro_f1 = report(pairs) if pairs else (0.0, 0.0)
    slice_pairs = [pair for pair, flag in zip(pairs, corrected, strict=True) if flag]
    corrected_accuracy, corrected_macro_f1 = report(slice_pairs) if slice_pairs else (None, None)
    return EvaluationMetrics(
        accuracy=accuracy,
        macro_f1=macro_f1,
        count=len(pairs),
        corrected_accuracy=corrected_accuracy,
        corrected_macro_f1=corrected_macro_f1,
        corrected_count=len(slice_pairs),
    )


def score_on_records(
    predict: LabelPredictFn,
    records: Sequence[FileRecord],
    *,
    corrected_roots: Collection[str],
    batch_size: int = 32,
    read: Callable[[FileRecord], bytes] | None = None,
) -> EvaluationMetrics:
    """Run ``predict`` (encoded images -> label names) over ``records`` once and score it.

    A record counts as a corrected-label item when its root is one of ``corrected_roots`` (the feedback
    queue's folders). A model that does not know an item's label simply gets it wrong.
    """
    read = read or _record_bytes
    predictions: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        answer = [str(label) for label in predict([read(record) for record in batch])]
        if len(answer) != len(batch):
            raise GateError(f"the model answered {len(answer)} labels for {len(batch)} images")
        predictions.extend(answer)
    return score_predictions(
        [record.label for record in records],
        predictions,
        [record.root in corrected_roots for record in records],
    )


def _record_bytes(record: FileRecord) -> bytes:
    import storage

    local = storage.local_path(record.local_path) if record.local_path else None
    return local.read_bytes() if local is not None and local.is_file() else storage.read_bytes(record.uri)


def savedmodel_predict_fn(saved_model_dir: str) -> LabelPredictFn:
    """A label predict function over an exported SavedModel's ``serving_default`` (image bytes in).

    ``saved_model_dir`` is a local version folder ``<base>/<name>/<version>`` (download GCS first). Labels
    come from ``assets/labels.txt`` in the model's output order.
    """
    import numpy as np
    import tensorflow as tf

    import storage

    labels_text = storage.read_text(storage.join(saved_model_dir, "assets", "labels.txt"))
    labels = [line for line in labels_text.splitlines() if line]
    loaded = tf.saved_model.load(str(saved_model_dir))
    signature = loaded.signatures["serving_default"]

    def predict(images: list[bytes]) -> list[str]:
        outputs = signature(image_bytes=tf.constant(list(images), dtype=tf.string))
        probabilities = outputs["probabilities"].numpy()
        if probabilities.shape[-1] != len(labels):
            raise GateError(
                f"{saved_model_dir} returns {probabilities.shape[-1]} probabilities but lists {len(labels)} "
                "labels in assets/labels.txt; re-export it"
            )
        return [labels[i] for i in np.argmax(probabilities, axis=-1)]

    predict.keepalive = loaded  # type: ignore[attr-defined]  # the signature needs its SavedModel alive
    return predict


def log_gate_decision(decision: GateDecision, *, run_id: str, tracking_uri: str) -> None:
    """Record the decision on the candidate's MLflow run: a JSON artifact, metrics and a verdict tag."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.log_dict(run_id, decision.to_dict(), "gate/decision.json")
    client.log_text(run_id, decision.to_markdown(), "gate/decision.md")
    metrics: dict[str, float] = {"gate_passed": 1.0 if decision.passed else 0.0}
    for prefix, values in (("gate_candidate", decision.candidate), ("gate_champion", decision.champion)):
        if values is None:
            continue
        for key, value in values.to_dict().items():
            if value is not None:
                metrics[f"{prefix}_{key}"] = float(value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "tfloop.gate", "passed" if decision.passed else "refused")
    client.set_tag(run_id, "tfloop.gate_reason", decision.reason[:5000])


def decision_json(decision: GateDecision) -> str:
    """The decision as one JSON string (for CLI output and logs)."""
    return json.dumps(decision.to_dict(), sort_keys=True)
