"""The promotion gate: decide whether a candidate model may replace the current champion, with statistics.

Like TFX's Evaluator, both models answer the SAME test items (the split no training run selects anything
on, :mod:`training.data`), and each comparison is a confidence interval, not a pair of point estimates.
:func:`evaluate_gate` is a pure function of the items and both models' answers; the glue below gets those
answers from a Keras candidate or an exported SavedModel, and :func:`log_gate_decision` records the
decision on the candidate's MLflow run.

Rules (each a :class:`GateCheck` in the decision):

- every candidate must reach the absolute floors ``min_accuracy`` and ``min_macro_f1`` (point estimates;
  with no champion these are the only rules);
- non-inferiority against the champion: the lower bound of the two-sided ``confidence`` (95%) interval of
  (candidate - champion) must be at least ``-margin``, for accuracy (``max_accuracy_drop``), macro F1
  (``max_macro_f1_drop``), each class's accuracy (``max_class_accuracy_drop``) and the corrected-label slice
  (``max_corrected_accuracy_drop``). A class or the slice decides only with at least ``min_class_items`` /
  ``min_corrected_items`` items; below that the decision says so and does not use it;
- no slow drift: the candidate must also be non-inferior (``max_reference_accuracy_drop``) to the scores
  recorded for the first blessed model on the test items both saw (:class:`ReferenceScores`, carried from
  champion to champion in ``gate/reference.json``), once they share ``min_reference_items`` items.

The intervals come from a paired bootstrap with a fixed seed (``seed``, ``bootstrap_samples``): the same
answers always give the same decision. For accuracy the bootstrap is exact and cheap: resampling items
only changes how many discordant pairs of each kind are drawn (a multinomial draw).

Sizing: with ``n`` items of which a share ``d`` are discordant (one model right, the other wrong), the
interval's half-width is about ``1.96 * sqrt(d / n)``; two equally good models pass a margin ``m`` only when
``n > 3.84 * d / m**2`` (d = 0.2, m = 0.15: about 35 items; m = 0.05: about 300). The default minimum
counts and margins follow from that; a small test split cannot certify a candidate and the gate refuses.

Corrected items where champion and candidate both predict another label with probability at least
``flag_confidence`` are flagged (a possible mislabel or poisoning) in the decision.

The decision is taken before export, when the candidate has served nothing yet; its last section, the
second opinion of the shadow candidate (:mod:`training.shadow`: agreement with live on a copy of live
traffic, accuracy on the items people reviewed), is filled in on the same run by :func:`add_second_opinion`
once the exported candidate has answered in the shadow, before promotion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from storage import TfloopError

if TYPE_CHECKING:
    import numpy as np

    from training.data import FileRecord
    from training.evaluate import TopPredictFn
    from training.shadow import ShadowReport

REFERENCE_ARTIFACT = "gate/reference.json"
SCORES_ARTIFACT = "gate/test_scores.json"
DECISION_ARTIFACT = "gate/decision.json"
DECISION_MARKDOWN = "gate/decision.md"
SECOND_OPINION_HEADING = "## Second opinion: the shadow candidate"
SECOND_OPINION_PENDING = (
    "Pending: once exported and rolled out, the candidate answers a copy of live traffic in the shadow; "
    "its agreement with live and its accuracy on reviewed items are added here before promotion."
)


class GateError(TfloopError):
    """The gate was asked something it cannot answer (bad policy, answers that do not match the items)."""


@dataclass(frozen=True)
class EvaluationMetrics:
    """One model's scores on the test items, overall and on the corrected-label slice."""

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
                "the corrected slice is part of the test items"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationMetrics:
        """Build from a dict such as :meth:`to_dict` gives (unknown keys ignored)."""
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GatePolicy(BaseModel):
    """Margins, minimum counts and floors of the gate (margins and floors are fractions); the one home of
    these options (the flows' ``GateOptions`` derive from it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_accuracy_drop: float = Field(
        default=0.05, ge=0, le=1, description="Non-inferiority margin on overall test accuracy."
    )
    max_macro_f1_drop: float = Field(default=0.05, ge=0, le=1, description="Margin on macro F1.")
    max_class_accuracy_drop: float = Field(
        default=0.15, ge=0, le=1, description="Margin on each class's accuracy (recall)."
    )
    max_corrected_accuracy_drop: float = Field(
        default=0.15, ge=0, le=1, description="Margin on the corrected-label slice."
    )
    max_reference_accuracy_drop: float = Field(
        default=0.05, ge=0, le=1, description="Margin against the first blessed model's recorded scores."
    )
    min_accuracy: float = Field(default=0.5, ge=0, le=1, description="Absolute accuracy floor.")
    min_macro_f1: float = Field(default=0.0, ge=0, le=1, description="Absolute macro F1 floor.")
    min_class_items: int = Field(default=50, ge=1, description="Test items a class needs to decide.")
    min_corrected_items: int = Field(default=50, ge=1, description="Test items the corrected slice needs.")
    min_reference_items: int = Field(
        default=50, ge=1, description="Shared test items the reference comparison needs."
    )
    confidence: float = Field(default=0.95, ge=0.5, lt=1, description="Level of the two-sided intervals.")
    bootstrap_samples: int = Field(default=2000, ge=100, description="Bootstrap replicates per interval.")
    seed: int = Field(default=0, description="Bootstrap seed: the same answers give the same decision.")
    flag_confidence: float = Field(
        default=0.9, ge=0, le=1, description="Probability above which a confident disagreement is flagged."
    )


@dataclass(frozen=True)
class GateItem:
    """One scored image: its content hash, submitted label, split, and whether it is a correction."""

    sha256: str
    label: str
    split: str = "test"
    corrected: bool = False


@dataclass(frozen=True)
class ModelAnswers:
    """One model's top-1 label and its probability for each item, in item order."""

    labels: tuple[str, ...]
    confidences: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.confidences):
            raise GateError("answers need one confidence per predicted label")


@dataclass(frozen=True)
class ReferenceScores:
    """Which test items (sha256) the first blessed model got right; the fixed yardstick against drift."""

    run_id: str
    correct: Mapping[str, bool]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "correct": dict(sorted(self.correct.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceScores:
        return cls(
            run_id=str(data["run_id"]), correct={str(k): bool(v) for k, v in dict(data["correct"]).items()}
        )


@dataclass(frozen=True)
class GateCheck:
    """One rule of the gate with its numbers: point estimates, the difference and its interval."""

    name: str
    passed: bool
    candidate: float | None
    reference: float | None
    limit: float | None
    detail: str
    skipped: bool = False
    count: int = 0
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class FlaggedItem:
    """A corrected item both models confidently put under another label than the submitted one."""

    sha256: str
    label: str
    split: str
    candidate_label: str
    candidate_confidence: float
    champion_label: str
    champion_confidence: float


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: passed or not, why, both models' metrics, every check with its interval."""

    passed: bool
    reason: str
    candidate: EvaluationMetrics
    champion: EvaluationMetrics | None
    policy: GatePolicy
    checks: tuple[GateCheck, ...] = field(default_factory=tuple)
    flagged: tuple[FlaggedItem, ...] = ()
    candidate_scores: Mapping[str, bool] = field(default_factory=dict)
    reference: ReferenceScores | None = None

    def class_checks(self) -> list[GateCheck]:
        return [check for check in self.checks if check.name.startswith("class ")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "candidate": self.candidate.to_dict(),
            "champion": self.champion.to_dict() if self.champion else None,
            "policy": self.policy.model_dump(),
            "checks": [asdict(check) for check in self.checks],
            "flagged": [asdict(item) for item in self.flagged],
            "test_items": self.candidate.count,
            "reference_run": self.reference.run_id if self.reference else None,
            "second_opinion": None,
        }

    def to_markdown(self, *, title: str = "Model gate") -> str:
        """A markdown report a person reads in seconds: verdict, reason, one row per check, flagged items."""
        verdict = "PASSED" if self.passed else "REFUSED"
        level = f"{self.policy.confidence:.0%}"
        lines = [
            f"# {title}: {verdict}",
            "",
            f"**Reason:** {self.reason}",
            "",
            f"{self.candidate.count} test items ({self.candidate.corrected_count} corrected labels); "
            f"intervals: paired bootstrap, {level}, seed {self.policy.seed}.",
            "",
            f"| check | items | candidate | champion | difference ({level} CI) | limit | result |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for check in self.checks:
            result = "not used" if check.skipped else ("pass" if check.passed else "**FAIL**")
            interval = (
                f"{check.difference:+.3f} ({check.ci_low:+.3f} to {check.ci_high:+.3f})"
                if check.difference is not None and check.ci_low is not None and check.ci_high is not None
                else "-"
            )
            limit = "-" if check.limit is None else f"{check.limit:+.3f}"
            lines.append(
                f"| {check.name} | {check.count} | {_fmt(check.candidate)} | {_fmt(check.reference)} | "
                f"{interval} | {limit} | {result} |"
            )
        if self.flagged:
            lines += [
                "",
                f"**Flagged:** {len(self.flagged)} corrected item(s) both models confidently label otherwise "
                "(possible mislabel or poisoning):",
                "",
                "| sha256 | submitted | candidate | champion |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                f"| {item.sha256[:12]} | {item.label} | {item.candidate_label} "
                f"({item.candidate_confidence:.2f}) | {item.champion_label} "
                f"({item.champion_confidence:.2f}) |"
                for item in self.flagged
            ]
        lines += ["", SECOND_OPINION_HEADING, "", SECOND_OPINION_PENDING]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# --- statistics ---------------------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    import numpy as np

    return np.random.default_rng(seed)


def paired_accuracy_interval(
    candidate_correct: Sequence[bool],
    reference_correct: Sequence[bool],
    *,
    confidence: float = 0.95,
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(candidate - reference) accuracy on the same items, with a two-sided paired-bootstrap interval.

    Resampling n paired items with replacement only changes how many items of each kind are drawn:
    candidate-only right (+1), reference-only right (-1), or concordant (0); so the bootstrap is one
    multinomial draw per replicate. Returns ``(difference, low, high)``; deterministic for a given seed.
    """
    import numpy as np

    if len(candidate_correct) != len(reference_correct) or not candidate_correct:
        raise GateError("paired scores need the same, non-empty list of items for both models")
    cand = np.asarray(candidate_correct, dtype=bool)
    ref = np.asarray(reference_correct, dtype=bool)
    n = len(cand)
    better = int(np.sum(cand & ~ref))
    worse = int(np.sum(~cand & ref))
    difference = (better - worse) / n
    if better == worse == 0:
        return 0.0, 0.0, 0.0
    draws = _rng(seed).multinomial(n, [better / n, worse / n, (n - better - worse) / n], size=samples)
    replicates = (draws[:, 0] - draws[:, 1]) / n
    alpha = 1.0 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return difference, float(low), float(high)


def _macro_f1(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> np.ndarray:
    import numpy as np

    denominator = predicted + support
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp, dtype=float), where=denominator > 0)
    present = denominator > 0
    counts = present.sum(axis=-1)
    return np.divide(f1.sum(axis=-1), counts, out=np.zeros(counts.shape), where=counts > 0)


def paired_macro_f1_interval(
    truths: Sequence[str],
    candidate: Sequence[str],
    reference: Sequence[str],
    *,
    confidence: float = 0.95,
    samples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(candidate - reference) macro F1 on the same items with a paired-bootstrap interval (items are
    resampled, both models keep their answers per item). Macro F1 as :func:`training.evaluate.compute_report`
    (labels with true items or predictions)."""
    import numpy as np

    n = len(truths)
    if not n or len(candidate) != n or len(reference) != n:
        raise GateError("paired scores need the same, non-empty list of items for both models")
    order = sorted({*truths, *candidate, *reference})
    index = {label: i for i, label in enumerate(order)}
    eye = np.eye(len(order))
    truth = eye[[index[t] for t in truths]]
    per_model = []
    for answers in (candidate, reference):
        guess = eye[[index[a] for a in answers]]
        per_model.append((truth * guess, guess))

    def macro(weights: np.ndarray) -> np.ndarray:
        support = weights @ truth
        return np.stack([_macro_f1(weights @ tp, weights @ guess, support) for tp, guess in per_model])

    point = macro(np.ones((1, n)))
    difference = float(point[0, 0] - point[1, 0])
    rng = _rng(seed)
    chunk = max(1, 2_000_000 // n)
    replicates: list[np.ndarray] = []
    for start in range(0, samples, chunk):
        rows = min(chunk, samples - start)
        picks = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        weights = np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n).astype(float)
        values = macro(weights)
        replicates.append(values[0] - values[1])
    alpha = 1.0 - confidence
    low, high = np.quantile(np.concatenate(replicates), [alpha / 2, 1 - alpha / 2])
    return difference, float(low), float(high)


# --- the decision -------------------------------------------------------------------------------------


def score_predictions(
    truths: Sequence[str], predictions: Sequence[str], corrected: Sequence[bool]
) -> EvaluationMetrics:
    """Metrics overall and on the corrected-label slice, from one predicted label name per item.

    Accuracy and macro F1 are computed like training's metrics (:func:`training.evaluate.compute_report`).
    """
    from training.evaluate import compute_report

    if not len(truths) == len(predictions) == len(corrected):
        raise GateError("truths, predictions and corrected flags must have one entry per test item")

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


def _floor_check(name: str, value: float, floor: float, count: int) -> GateCheck:
    passed = value >= floor
    relation = ">=" if passed else "<"
    return GateCheck(
        name=f"{name} floor",
        passed=passed,
        candidate=value,
        reference=None,
        limit=floor,
        count=count,
        detail=f"candidate {name} {value:.4f} {relation} floor {floor:.4f}",
    )


def _non_inferiority(
    name: str,
    *,
    against: str,
    count: int,
    candidate: float,
    reference: float,
    interval: tuple[float, float, float],
    margin: float,
    policy: GatePolicy,
) -> GateCheck:
    difference, low, high = interval
    # A tiny tolerance keeps float noise from refusing a candidate exactly at the margin.
    passed = low >= -margin - 1e-9
    relation = ">=" if passed else "below"
    return GateCheck(
        name=name,
        passed=passed,
        candidate=candidate,
        reference=reference,
        limit=-margin,
        count=count,
        difference=difference,
        ci_low=low,
        ci_high=high,
        detail=(
            f"{name}: candidate {candidate:.3f} vs {against} {reference:.3f} on {count} items, difference "
            f"{difference:+.3f} ({policy.confidence:.0%} CI {low:+.3f} to {high:+.3f}), lower bound "
            f"{relation} -{margin:.3f}"
        ),
    )


def _too_few(name: str, count: int, minimum: int, option: str) -> GateCheck:
    return GateCheck(
        name=name,
        passed=True,
        skipped=True,
        candidate=None,
        reference=None,
        limit=None,
        count=count,
        detail=f"{name}: {count} items, too few to decide (min {minimum}, {option}); not used",
    )


def _accuracy_check(
    name: str,
    rows: Sequence[int],
    cand_right: Sequence[bool],
    champ_right: Sequence[bool],
    *,
    against: str,
    margin: float,
    minimum: int,
    option: str,
    policy: GatePolicy,
) -> GateCheck:
    if len(rows) < minimum:
        return _too_few(name, len(rows), minimum, option)
    cand = [cand_right[i] for i in rows]
    champ = [champ_right[i] for i in rows]
    interval = paired_accuracy_interval(
        cand, champ, confidence=policy.confidence, samples=policy.bootstrap_samples, seed=policy.seed
    )
    return _non_inferiority(
        name,
        against=against,
        count=len(rows),
        candidate=sum(cand) / len(rows),
        reference=sum(champ) / len(rows),
        interval=interval,
        margin=margin,
        policy=policy,
    )


def flag_confident_disagreements(
    items: Sequence[GateItem], candidate: ModelAnswers, champion: ModelAnswers, *, threshold: float
) -> list[FlaggedItem]:
    """Corrected items where both models predict a label other than the submitted one with probability
    at least ``threshold`` (any split)."""
    flagged = []
    for i, item in enumerate(items):
        if not item.corrected:
            continue
        cand_label, cand_conf = candidate.labels[i], candidate.confidences[i]
        champ_label, champ_conf = champion.labels[i], champion.confidences[i]
        if (
            cand_label != item.label
            and champ_label != item.label
            and cand_conf >= threshold
            and champ_conf >= threshold
        ):
            flagged.append(
                FlaggedItem(
                    sha256=item.sha256,
                    label=item.label,
                    split=item.split,
                    candidate_label=cand_label,
                    candidate_confidence=float(cand_conf),
                    champion_label=champ_label,
                    champion_confidence=float(champ_conf),
                )
            )
    return flagged


def evaluate_gate(
    items: Sequence[GateItem],
    candidate: ModelAnswers,
    champion: ModelAnswers | None,
    *,
    policy: GatePolicy,
    reference: ReferenceScores | None = None,
) -> GateDecision:
    """Decide whether the candidate may be promoted; pure (no I/O), deterministic for a policy's seed.

    ``items`` are every scored image; the statistics use those with ``split == "test"``, the flags use the
    corrected ones of any split. ``champion`` is None for a first model: then only the floors apply.
    ``reference`` is the first blessed model's recorded test scores (None: none recorded yet).
    """
    for name, answers in (("candidate", candidate), ("champion", champion)):
        if answers is not None and len(answers.labels) != len(items):
            raise GateError(
                f"the {name} answered {len(answers.labels)} items but {len(items)} were scored; score both "
                "models on the same items"
            )
    test = [i for i, item in enumerate(items) if item.split == "test"]
    if not test:
        raise GateError("no test items: nothing to judge the candidate on; add images or raise test_fraction")
    truths = [items[i].label for i in test]
    corrected = [items[i].corrected for i in test]
    cand_labels = [candidate.labels[i] for i in test]
    cand_right = [label == truth for label, truth in zip(cand_labels, truths, strict=True)]
    cand_metrics = score_predictions(truths, cand_labels, corrected)
    checks = [
        _floor_check("accuracy", cand_metrics.accuracy, policy.min_accuracy, len(test)),
        _floor_check("macro F1", cand_metrics.macro_f1, policy.min_macro_f1, len(test)),
    ]
    champ_metrics: EvaluationMetrics | None = None
    flagged: list[FlaggedItem] = []
    if champion is not None:
        champ_labels = [champion.labels[i] for i in test]
        champ_right = [label == truth for label, truth in zip(champ_labels, truths, strict=True)]
        champ_metrics = score_predictions(truths, champ_labels, corrected)
        everything = list(range(len(test)))
        checks.append(
            _accuracy_check(
                "accuracy",
                everything,
                cand_right,
                champ_right,
                against="champion",
                margin=policy.max_accuracy_drop,
                minimum=1,
                option="",
                policy=policy,
            )
        )
        checks.append(
            _non_inferiority(
                "macro F1",
                against="champion",
                count=len(test),
                candidate=cand_metrics.macro_f1,
                reference=champ_metrics.macro_f1,
                interval=paired_macro_f1_interval(
                    truths,
                    cand_labels,
                    champ_labels,
                    confidence=policy.confidence,
                    samples=policy.bootstrap_samples,
                    seed=policy.seed,
                ),
                margin=policy.max_macro_f1_drop,
                policy=policy,
            )
        )
        for label in sorted(set(truths)):
            checks.append(
                _accuracy_check(
                    f"class {label}",
                    [row for row, truth in enumerate(truths) if truth == label],
                    cand_right,
                    champ_right,
                    against="champion",
                    margin=policy.max_class_accuracy_drop,
                    minimum=policy.min_class_items,
                    option="min_class_items",
                    policy=policy,
                )
            )
        checks.append(
            _accuracy_check(
                "corrected slice",
                [row for row, flag in enumerate(corrected) if flag],
                cand_right,
                champ_right,
                against="champion",
                margin=policy.max_corrected_accuracy_drop,
                minimum=policy.min_corrected_items,
                option="min_corrected_items",
                policy=policy,
            )
        )
        flagged = flag_confident_disagreements(items, candidate, champion, threshold=policy.flag_confidence)
    if reference is not None:
        shared = [row for row, i in enumerate(test) if items[i].sha256 in reference.correct]
        recorded = [False] * len(test)
        for row in shared:
            recorded[row] = reference.correct[items[test[row]].sha256]
        checks.append(
            _accuracy_check(
                "reference",
                shared,
                cand_right,
                recorded,
                against=f"first blessed model (run {reference.run_id})",
                margin=policy.max_reference_accuracy_drop,
                minimum=policy.min_reference_items,
                option="min_reference_items",
                policy=policy,
            )
        )
    elif champion is not None:
        checks.append(
            GateCheck(
                name="reference",
                passed=True,
                skipped=True,
                candidate=None,
                reference=None,
                limit=None,
                detail="reference: no scores recorded for a blessed model yet; not used",
            )
        )
    return GateDecision(
        passed=all(check.passed for check in checks),
        reason=_reason(checks, first=champion is None, flagged=len(flagged)),
        candidate=cand_metrics,
        champion=champ_metrics,
        policy=policy,
        checks=tuple(checks),
        flagged=tuple(flagged),
        candidate_scores={items[i].sha256: right for i, right in zip(test, cand_right, strict=True)},
        reference=reference,
    )


def _reason(checks: Sequence[GateCheck], *, first: bool, flagged: int) -> str:
    failed = [check for check in checks if not check.passed]
    decided = [check for check in checks if check.passed and not check.skipped]
    skipped = [check for check in checks if check.skipped]
    if failed:
        text = "refused: " + "; ".join(check.detail for check in failed)
    else:
        classes = [check for check in decided if check.name.startswith("class ")]
        listed = [check.detail for check in decided if not check.name.startswith("class ")]
        if classes:
            listed.append(f"{len(classes)} class(es) not worse beyond the class margin")
        text = ("passed: first model (no champion), " if first else "passed: ") + "; ".join(listed)
    few_classes = [check for check in skipped if check.name.startswith("class ")]
    notes = [check.detail for check in skipped if not check.name.startswith("class ")]
    if few_classes:
        names = ", ".join(f"{check.name[6:]} ({check.count})" for check in few_classes)
        notes.append(f"{len(few_classes)} class(es) too few items to decide, not used: {names}")
    if flagged:
        notes.append(f"{flagged} corrected item(s) flagged: both models confidently disagree with the label")
    return text + (" (" + "; ".join(notes) + ")" if notes else "")


# --- evaluation glue: both models answer the same files ------------------------------------------------


def gate_items(records: Sequence[FileRecord], *, corrected_roots: Collection[str]) -> list[GateItem]:
    """Gate items from dataset records; a record is a corrected-label item when it comes from one of
    ``corrected_roots`` (the feedback queue's folders)."""
    return [
        GateItem(sha256=r.sha256, label=r.label, split=r.side, corrected=r.root in corrected_roots)
        for r in records
    ]


def answer_records(
    predict: TopPredictFn,
    records: Sequence[FileRecord],
    *,
    batch_size: int = 32,
    read: Callable[[FileRecord], bytes] | None = None,
) -> ModelAnswers:
    """Run ``predict`` (encoded images -> (label, probability) each) over ``records`` once, in batches."""
    labels: list[str] = []
    confidences: list[float] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        answer = list(predict([read(record) if read else record.read_bytes() for record in batch]))
        if len(answer) != len(batch):
            raise GateError(f"the model answered {len(answer)} labels for {len(batch)} images")
        labels.extend(str(label) for label, _ in answer)
        confidences.extend(float(confidence) for _, confidence in answer)
    return ModelAnswers(labels=tuple(labels), confidences=tuple(confidences))


def savedmodel_predict_fn(saved_model_dir: str) -> TopPredictFn:
    """A top-1 predict function over an exported SavedModel's ``serving_default`` (image bytes in).

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

    def predict(images: list[bytes]) -> list[tuple[str, float]]:
        outputs = signature(image_bytes=tf.constant(list(images), dtype=tf.string))
        probabilities = outputs["probabilities"].numpy()
        if probabilities.shape[-1] != len(labels):
            raise GateError(
                f"{saved_model_dir} returns {probabilities.shape[-1]} probabilities but lists {len(labels)} "
                "labels in assets/labels.txt; re-export it"
            )
        best = np.argmax(probabilities, axis=-1)
        return [(labels[i], float(row[i])) for i, row in zip(best, probabilities, strict=True)]

    predict.keepalive = loaded  # type: ignore[attr-defined]  # the signature needs its SavedModel alive
    return predict


def decision_title(run_id: str) -> str:
    """The title of a run's gate decision (its markdown on the run, and the flow's artifact)."""
    return f"Gate for run {run_id}"


def log_gate_decision(decision: GateDecision, *, run_id: str, tracking_uri: str) -> None:
    """Record the decision on the candidate's MLflow run: ``gate/decision.json`` and ``decision.md``, the
    per-class change plot, the candidate's per-item test scores, metrics and tags. A passing candidate
    also gets ``gate/reference.json``: the reference it was held to, or its own scores when none existed
    (it is then the first blessed model)."""
    import mlflow

    from training.plots import class_change_figure

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.log_dict(run_id, decision.to_dict(), DECISION_ARTIFACT)
    client.log_text(run_id, decision.to_markdown(title=decision_title(run_id)), DECISION_MARKDOWN)
    client.log_dict(run_id, dict(sorted(decision.candidate_scores.items())), SCORES_ARTIFACT)
    if decision.class_checks():
        client.log_figure(run_id, class_change_figure(decision), "gate/class_change.png")
    if decision.passed:
        reference = decision.reference or ReferenceScores(run_id=run_id, correct=decision.candidate_scores)
        client.log_dict(run_id, reference.to_dict(), REFERENCE_ARTIFACT)
        client.set_tag(run_id, "tfloop.gate_reference_run", reference.run_id)
    metrics: dict[str, float] = {"gate_passed": 1.0 if decision.passed else 0.0}
    metrics["gate_flagged"] = float(len(decision.flagged))
    for prefix, values in (("gate_candidate", decision.candidate), ("gate_champion", decision.champion)):
        if values is None:
            continue
        for key, value in values.to_dict().items():
            if value is not None:
                metrics[f"{prefix}_{key}"] = float(value)
    for check in decision.checks:
        if check.name == "accuracy" and check.ci_low is not None:
            metrics["gate_accuracy_difference"] = float(check.difference or 0.0)
            metrics["gate_accuracy_difference_ci_low"] = float(check.ci_low)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "tfloop.gate", "passed" if decision.passed else "refused")
    client.set_tag(run_id, "tfloop.gate_reason", decision.reason[:5000])


def add_second_opinion(report: ShadowReport, *, run_id: str, tracking_uri: str) -> str:
    """Record the shadow candidate's second opinion in the gate decision of its run: key ``second_opinion``
    of ``gate/decision.json``, the last section of ``gate/decision.md`` (replacing what was there) and
    ``gate_shadow_*`` metrics. Returns the decision's markdown with it; GateError when the run has no
    gate decision."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            decision_json = client.download_artifacts(run_id, DECISION_ARTIFACT, scratch)
            decision_md = client.download_artifacts(run_id, DECISION_MARKDOWN, scratch)
        except (MlflowException, OSError) as error:
            raise GateError(
                f"run {run_id} has no gate decision ({DECISION_ARTIFACT}): {error}; the second opinion "
                "belongs to a candidate that went through the gate (`tfloop run` or the flow)"
            ) from error
        with open(decision_json, encoding="utf-8") as handle:
            decision = json.load(handle)
        with open(decision_md, encoding="utf-8") as handle:
            markdown = handle.read()
    head = markdown.split(SECOND_OPINION_HEADING, 1)[0].rstrip("\n")
    markdown = f"{head}\n\n{SECOND_OPINION_HEADING}\n\n{report.to_markdown()}"
    decision["second_opinion"] = report.to_dict()
    client.log_dict(run_id, decision, DECISION_ARTIFACT)
    client.log_text(run_id, markdown, DECISION_MARKDOWN)
    metrics = {
        "gate_shadow_compared": report.compared,
        "gate_shadow_agreement": report.agreement,
        "gate_shadow_reviewed": report.reviewed,
        "gate_shadow_candidate_accuracy": report.candidate_accuracy,
        "gate_shadow_live_accuracy": report.live_accuracy,
    }
    for key, value in metrics.items():
        if value is not None:
            client.log_metric(run_id, key, float(value))
    return markdown
