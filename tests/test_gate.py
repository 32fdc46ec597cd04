"""Unit tests of the promotion gate: the pure decision function and the scoring helpers."""

from __future__ import annotations

import json

import pytest

from storage import TfloopError
from training.data import FileRecord
from training.gate import (
    EvaluationMetrics,
    GateError,
    GatePolicy,
    evaluate_gate,
    score_on_records,
    score_predictions,
)

pytestmark = pytest.mark.code


def metrics(
    accuracy: float,
    macro_f1: float,
    *,
    corrected_accuracy: float | None = None,
    count: int = 100,
    corrected_count: int = 0,
) -> EvaluationMetrics:
    return EvaluationMetrics(
        accuracy=accuracy,
        macro_f1=macro_f1,
        count=count,
        corrected_accuracy=corrected_accuracy,
        corrected_macro_f1=corrected_accuracy,
        corrected_count=corrected_count,
    )


POLICY = GatePolicy(max_accuracy_drop=0.02, max_macro_f1_drop=0.02, max_corrected_accuracy_drop=0.0)


def test_first_model_passes_when_above_floor() -> None:
    decision = evaluate_gate(metrics(0.8, 0.78), None, policy=GatePolicy(min_accuracy=0.6))
    assert decision.passed
    assert decision.champion is None
    assert "first model" in decision.reason
    assert [check.name for check in decision.checks] == ["accuracy floor", "macro F1 floor"]


def test_first_model_below_floor_is_refused_with_numbers_in_reason() -> None:
    decision = evaluate_gate(metrics(0.4, 0.35), None, policy=GatePolicy(min_accuracy=0.6))
    assert not decision.passed
    assert decision.reason.startswith("refused:")
    assert "0.4000" in decision.reason and "0.6000" in decision.reason


def test_macro_f1_floor_applies() -> None:
    decision = evaluate_gate(metrics(0.9, 0.3), None, policy=GatePolicy(min_accuracy=0.5, min_macro_f1=0.5))
    assert not decision.passed
    assert "macro F1" in decision.reason


def test_candidate_within_margin_passes() -> None:
    decision = evaluate_gate(metrics(0.89, 0.88), metrics(0.90, 0.89), policy=POLICY)
    assert decision.passed, decision.reason


def test_equal_models_pass_despite_float_noise() -> None:
    champion = metrics(0.9, 0.9)
    candidate = metrics(0.9 - 1e-12, 0.9)
    assert evaluate_gate(candidate, champion, policy=GatePolicy(max_accuracy_drop=0.0)).passed


def test_candidate_worse_on_accuracy_beyond_margin_is_refused() -> None:
    decision = evaluate_gate(metrics(0.85, 0.89), metrics(0.90, 0.89), policy=POLICY)
    assert not decision.passed
    failed = [check.name for check in decision.checks if not check.passed]
    assert failed == ["accuracy vs champion"]
    assert "champion 0.9000" in decision.reason


def test_candidate_worse_on_macro_f1_is_refused() -> None:
    decision = evaluate_gate(metrics(0.90, 0.80), metrics(0.90, 0.89), policy=POLICY)
    assert not decision.passed
    assert [c.name for c in decision.checks if not c.passed] == ["macro F1 vs champion"]


def test_corrected_slice_regression_is_refused_even_when_overall_improves() -> None:
    champion = metrics(0.80, 0.80, corrected_accuracy=0.9, corrected_count=10)
    candidate = metrics(0.95, 0.95, corrected_accuracy=0.7, corrected_count=10)
    decision = evaluate_gate(candidate, champion, policy=POLICY)
    assert not decision.passed
    assert "corrected-label accuracy" in decision.reason


def test_corrected_slice_improvement_passes() -> None:
    champion = metrics(0.80, 0.80, corrected_accuracy=0.2, corrected_count=10)
    candidate = metrics(0.81, 0.80, corrected_accuracy=0.9, corrected_count=10)
    decision = evaluate_gate(candidate, champion, policy=POLICY)
    assert decision.passed
    slice_check = decision.checks[-1]
    assert not slice_check.skipped and slice_check.candidate == 0.9 and slice_check.reference == 0.2


def test_small_corrected_slice_is_skipped_and_said() -> None:
    champion = metrics(0.80, 0.80, corrected_accuracy=1.0, corrected_count=2)
    candidate = metrics(0.80, 0.80, corrected_accuracy=0.0, corrected_count=2)
    decision = evaluate_gate(candidate, champion, policy=GatePolicy(min_corrected_items=3))
    assert decision.passed
    assert decision.checks[-1].skipped
    assert "not compared" in decision.reason


def test_floor_also_applies_with_a_champion() -> None:
    decision = evaluate_gate(metrics(0.3, 0.3), metrics(0.3, 0.3), policy=GatePolicy(min_accuracy=0.5))
    assert not decision.passed
    assert "floor" in decision.reason


def test_models_scored_on_different_data_is_an_error() -> None:
    with pytest.raises(GateError, match="same held-out"):
        evaluate_gate(metrics(0.9, 0.9, count=100), metrics(0.9, 0.9, count=90), policy=POLICY)


def test_empty_held_out_data_is_an_error() -> None:
    with pytest.raises(TfloopError, match="empty"):
        evaluate_gate(metrics(0.0, 0.0, count=0), None, policy=POLICY)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_accuracy_drop": -0.1}, {"min_accuracy": 1.5}, {"min_corrected_items": 0}],
)
def test_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(GateError, match="gate policy"):
        GatePolicy(**kwargs)


def test_metrics_reject_percentages_and_inconsistent_counts() -> None:
    with pytest.raises(GateError, match="fractions"):
        EvaluationMetrics(accuracy=90.0, macro_f1=0.9, count=10)
    with pytest.raises(GateError, match="counts"):
        EvaluationMetrics(accuracy=0.9, macro_f1=0.9, count=10, corrected_count=11)


def test_decision_serialises_to_dict_and_markdown() -> None:
    champion = metrics(0.80, 0.79, corrected_accuracy=0.5, corrected_count=4)
    candidate = metrics(0.70, 0.69, corrected_accuracy=0.75, corrected_count=4)
    decision = evaluate_gate(candidate, champion, policy=POLICY)
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["passed"] is False
    assert data["candidate"]["accuracy"] == 0.70 and data["champion"]["accuracy"] == 0.80
    assert data["candidate"]["corrected_accuracy"] == 0.75
    assert EvaluationMetrics.from_dict(data["champion"]) == champion
    markdown = decision.to_markdown()
    assert "REFUSED" in markdown
    assert "| accuracy | 0.7000 | 0.8000 |" in markdown
    assert "| corrected-label accuracy | 0.7500 | 0.5000 |" in markdown


def test_score_predictions_matches_hand_computation_and_splits_corrected_slice() -> None:
    truths = ["a", "a", "b", "b"]
    predicted = ["a", "b", "b", "b"]
    scored = score_predictions(truths, predicted, [False, False, True, True])
    assert scored.accuracy == pytest.approx(0.75)
    # F1(a) = 2*1/(2+0+1) = 2/3, F1(b) = 2*2/(4+1+0) = 4/5
    assert scored.macro_f1 == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scored.count == 4 and scored.corrected_count == 2
    assert scored.corrected_accuracy == pytest.approx(1.0)
    none_corrected = score_predictions(truths, predicted, [False] * 4)
    assert none_corrected.corrected_accuracy is None and none_corrected.corrected_count == 0


def _record(uri: str, label: str, root: str) -> FileRecord:
    return FileRecord(
        uri=uri, label=label, relative_path=uri, side="validation", root=root, local_path="", sha256=""
    )


def test_score_on_records_predicts_once_per_batch_and_marks_feedback_items() -> None:
    blobs = {"u/0": b"a", "u/1": b"b", "u/2": b"a", "fb/3": b"b", "fb/4": b"a"}
    records = [
        _record(uri, "cat" if data == b"a" else "dog", "feedback/pending" if uri.startswith("fb") else "data")
        for uri, data in blobs.items()
    ]
    calls: list[int] = []

    def predict(images: list[bytes]) -> list[str]:
        calls.append(len(images))
        return ["cat" for _ in images]  # a model that always says "cat"

    scored = score_on_records(
        predict,
        records,
        corrected_roots={"feedback/pending"},
        batch_size=2,
        read=lambda record: blobs[record.uri],
    )
    assert calls == [2, 2, 1]
    assert scored.count == 5 and scored.corrected_count == 2
    assert scored.accuracy == pytest.approx(3 / 5)
    assert scored.corrected_accuracy == pytest.approx(1 / 2)


def test_score_on_records_rejects_a_short_answer() -> None:
    with pytest.raises(GateError, match="answered"):
        score_on_records(
            lambda images: [],
            [_record("u", "cat", "data")],
            corrected_roots=(),
            read=lambda record: b"",
        )
