"""Unit tests of the promotion gate on prediction vectors: paired intervals, non-inferiority overall, per
class, on the corrected slice and against the recorded reference, the flags, determinism, and the glue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from training.data import FileRecord
from training.gate import (
    GateError,
    GateItem,
    GatePolicy,
    ModelAnswers,
    ReferenceScores,
    answer_records,
    evaluate_gate,
    gate_items,
    paired_accuracy_interval,
    paired_macro_f1_interval,
    score_predictions,
)

pytestmark = pytest.mark.code

LABELS = [str(digit) for digit in range(10)]


def _items(per_class: int = 30, *, corrected_every: int = 0, split: str = "test") -> list[GateItem]:
    items = []
    for label in LABELS:
        for i in range(per_class):
            corrected = bool(corrected_every) and i % corrected_every == 0
            items.append(
                GateItem(
                    sha256=f"{label}-{i:04d}".ljust(64, "0"), label=label, split=split, corrected=corrected
                )
            )
    return items


def _answers(items: list[GateItem], *, accuracy: float, seed: int, confidence: float = 0.8) -> ModelAnswers:
    """A model right on a seeded ``accuracy`` share of the items, wrong (next label) elsewhere."""
    rng = np.random.default_rng(seed)
    right = rng.random(len(items)) < accuracy
    labels = tuple(
        item.label if ok else LABELS[(LABELS.index(item.label) + 1) % 10]
        for item, ok in zip(items, right, strict=True)
    )
    return ModelAnswers(labels=labels, confidences=(confidence,) * len(items))


def _flip(answers: ModelAnswers, items: list[GateItem], rows: list[int]) -> ModelAnswers:
    labels = list(answers.labels)
    for row in rows:
        labels[row] = LABELS[(LABELS.index(items[row].label) + 3) % 10]
    return ModelAnswers(labels=tuple(labels), confidences=answers.confidences)


def _fix(answers: ModelAnswers, items: list[GateItem], rows: list[int]) -> ModelAnswers:
    labels = list(answers.labels)
    for row in rows:
        labels[row] = items[row].label
    return ModelAnswers(labels=tuple(labels), confidences=answers.confidences)


POLICY = GatePolicy(min_accuracy=0.3, min_class_items=20, min_corrected_items=20)


def test_paired_interval_contains_the_difference_and_is_exact_for_identical_models() -> None:
    cand = [True] * 80 + [False] * 20
    champ = [True] * 70 + [False] * 30
    difference, low, high = paired_accuracy_interval(cand, champ, samples=4000, seed=1)
    assert difference == pytest.approx(0.10)
    assert low < 0.10 < high and low > 0.0  # 10 better, 0 worse: clearly better
    assert paired_accuracy_interval(cand, cand) == (0.0, 0.0, 0.0)
    # One worse item in ten: non-inferiority cannot be shown with a tight margin.
    _, low, _ = paired_accuracy_interval([True] * 9 + [False], [True] * 10)
    assert low <= -0.1


def test_macro_f1_interval_matches_the_point_metric() -> None:
    items = _items(10)
    truths = [item.label for item in items]
    cand = _answers(items, accuracy=0.9, seed=0).labels
    champ = _answers(items, accuracy=0.7, seed=1).labels
    difference, low, high = paired_macro_f1_interval(truths, cand, champ, samples=500, seed=0)
    expected = (
        score_predictions(truths, cand, [False] * len(items)).macro_f1
        - score_predictions(truths, champ, [False] * len(items)).macro_f1
    )
    assert difference == pytest.approx(expected)
    assert low < difference < high


def test_first_model_passes_the_floor_and_nothing_else() -> None:
    items = _items(5)
    decision = evaluate_gate(items, _answers(items, accuracy=0.8, seed=0), None, policy=POLICY)
    assert decision.passed and decision.champion is None
    assert "first model" in decision.reason
    assert [check.name for check in decision.checks] == ["accuracy floor", "macro F1 floor"]
    low = evaluate_gate(items, _answers(items, accuracy=0.1, seed=0), None, policy=POLICY)
    assert not low.passed and low.reason.startswith("refused:") and "floor" in low.reason


def test_a_candidate_trained_on_flipped_labels_is_refused() -> None:
    items = _items(30)
    champion = _answers(items, accuracy=0.9, seed=0)
    # Flipped training labels: the candidate answers a wrong class for most items (high confidence, too).
    flipped = _answers(items, accuracy=0.15, seed=5, confidence=0.95)
    decision = evaluate_gate(items, flipped, champion, policy=POLICY.model_copy(update={"min_accuracy": 0.0}))
    assert not decision.passed
    assert decision.reason.startswith("refused:") and "champion" in decision.reason
    accuracy = next(check for check in decision.checks if check.name == "accuracy")
    assert not accuracy.passed and accuracy.ci_high is not None and accuracy.ci_high < 0
    assert all(not check.passed for check in decision.class_checks())


def test_a_truly_better_candidate_passes_every_check() -> None:
    items = _items(30, corrected_every=3)
    champion = _answers(items, accuracy=0.75, seed=0)
    wrong = [
        row
        for row, (item, label) in enumerate(zip(items, champion.labels, strict=True))
        if item.label != label
    ]
    better = _fix(champion, items, wrong[::2])
    decision = evaluate_gate(items, better, champion, policy=POLICY)
    assert decision.passed, decision.reason
    decided = [check for check in decision.checks if not check.skipped]
    assert {"accuracy", "macro F1", "corrected slice"} <= {check.name for check in decided}
    assert len(decision.class_checks()) == 10 and all(not c.skipped for c in decision.class_checks())
    accuracy = next(check for check in decided if check.name == "accuracy")
    assert accuracy.difference is not None and accuracy.difference > 0 and accuracy.ci_low > 0


def test_the_same_candidate_scored_twice_gets_the_same_decision() -> None:
    items = _items(25, corrected_every=2)
    champion = _answers(items, accuracy=0.8, seed=0)
    candidate = _answers(items, accuracy=0.8, seed=1)
    first = evaluate_gate(items, candidate, champion, policy=POLICY)
    second = evaluate_gate(
        list(items), ModelAnswers(candidate.labels, candidate.confidences), champion, policy=POLICY
    )
    assert first.to_dict() == second.to_dict()
    assert first.to_markdown() == second.to_markdown()


def test_identical_models_pass_even_with_zero_margins() -> None:
    items = _items(20)
    answers = _answers(items, accuracy=0.7, seed=0)
    zero = POLICY.model_copy(
        update={name: 0.0 for name in ("max_accuracy_drop", "max_macro_f1_drop", "max_class_accuracy_drop")}
    )
    assert evaluate_gate(items, answers, answers, policy=zero).passed


def test_a_collapsed_class_is_refused_even_when_overall_accuracy_holds() -> None:
    items = _items(30)
    champion = _answers(items, accuracy=0.85, seed=0)
    sevens = [row for row, item in enumerate(items) if item.label == "7"]
    others = [row for row in range(len(items)) if row not in sevens]
    candidate = _flip(_fix(champion, items, others), items, sevens)  # better elsewhere, 7s all wrong
    decision = evaluate_gate(items, candidate, champion, policy=POLICY)
    assert not decision.passed
    assert [check.name for check in decision.checks if not check.passed] == ["class 7"]
    assert "class 7" in decision.reason


def test_a_small_slice_and_small_classes_decide_nothing_and_say_so() -> None:
    items = _items(6, corrected_every=0)
    items[:4] = [GateItem(sha256=item.sha256, label=item.label, corrected=True) for item in items[:4]]
    champion = _answers(items, accuracy=0.9, seed=0)
    candidate = _flip(champion, items, [0, 1, 2, 3])  # the 4 corrected items all wrong now
    decision = evaluate_gate(
        items, candidate, champion, policy=POLICY.model_copy(update={"max_accuracy_drop": 0.2})
    )
    assert (
        "corrected slice: 4 items, too few to decide (min 20, min_corrected_items); not used"
        in decision.reason
    )
    assert all(check.skipped for check in decision.class_checks())
    assert "10 class(es) too few items to decide" in decision.reason


def test_a_corrected_slice_regression_with_enough_items_is_refused() -> None:
    items = _items(30, corrected_every=2)
    champion = _answers(items, accuracy=0.8, seed=0)
    corrected = [row for row, item in enumerate(items) if item.corrected]
    uncorrected = [row for row, item in enumerate(items) if not item.corrected]
    candidate = _flip(_fix(champion, items, uncorrected), items, corrected[::3])
    decision = evaluate_gate(
        items, candidate, champion, policy=POLICY.model_copy(update={"max_class_accuracy_drop": 1.0})
    )
    assert not decision.passed
    assert [check.name for check in decision.checks if not check.passed] == ["corrected slice"]


def test_no_slow_drift_against_the_first_blessed_models_recorded_scores() -> None:
    items = _items(30)
    first = _answers(items, accuracy=0.9, seed=0)
    reference = ReferenceScores(
        run_id="run-1",
        correct={item.sha256: item.label == label for item, label in zip(items, first.labels, strict=True)},
    )
    # Each step a little worse than the last champion (within the margin), far below the first model.
    champion = _answers(items, accuracy=0.72, seed=1)
    candidate = _fix(champion, items, [])
    drifted = evaluate_gate(items, candidate, champion, policy=POLICY, reference=reference)
    assert not drifted.passed
    assert [check.name for check in drifted.checks if not check.passed] == ["reference"]
    assert "first blessed model (run run-1)" in drifted.reason
    few = ReferenceScores(run_id="run-1", correct=dict(list(reference.correct.items())[:5]))
    loose = evaluate_gate(items, candidate, champion, policy=POLICY, reference=few)
    assert loose.passed and "reference: 5 items, too few to decide" in loose.reason
    none = evaluate_gate(items, candidate, champion, policy=POLICY)
    assert none.passed and "no scores recorded" in none.reason
    assert ReferenceScores.from_dict(json.loads(json.dumps(reference.to_dict()))) == reference


def test_corrected_items_both_models_confidently_relabel_are_flagged() -> None:
    items = [
        GateItem(sha256="a" * 64, label="3", split="train", corrected=True),
        GateItem(sha256="b" * 64, label="3", split="test", corrected=True),
        GateItem(sha256="c" * 64, label="3", split="test", corrected=True),
        GateItem(sha256="d" * 64, label="3", split="test", corrected=False),
    ]
    candidate = ModelAnswers(labels=("8", "8", "3", "8"), confidences=(0.97, 0.6, 0.99, 0.99))
    champion = ModelAnswers(labels=("8", "8", "8", "8"), confidences=(0.95, 0.99, 0.99, 0.99))
    decision = evaluate_gate(items, candidate, champion, policy=POLICY.model_copy(update={"min_accuracy": 0}))
    assert [(item.sha256[0], item.split, item.candidate_label) for item in decision.flagged] == [
        ("a", "train", "8")
    ]
    assert decision.candidate.count == 3  # the train item is only for the flags
    assert "1 corrected item(s) flagged" in decision.reason
    assert "Flagged" in decision.to_markdown()


def test_bad_inputs_are_clear_errors() -> None:
    items = _items(2)
    answers = _answers(items, accuracy=0.5, seed=0)
    with pytest.raises(GateError, match="same items"):
        evaluate_gate(
            items, answers, ModelAnswers(answers.labels[:-1], answers.confidences[:-1]), policy=POLICY
        )
    train_only = [GateItem(sha256=item.sha256, label=item.label, split="train") for item in items]
    with pytest.raises(GateError, match="no test items"):
        evaluate_gate(train_only, answers, None, policy=POLICY)
    for bad in (
        {"max_accuracy_drop": -0.1},
        {"min_accuracy": 1.5},
        {"min_class_items": 0},
        {"confidence": 1.0},
    ):
        with pytest.raises(ValidationError):
            GatePolicy(**bad)


def test_decision_serialises_to_json_markdown_and_a_plot() -> None:
    from training.plots import class_change_figure

    items = _items(25, corrected_every=4)
    champion = _answers(items, accuracy=0.8, seed=0)
    decision = evaluate_gate(items, _answers(items, accuracy=0.6, seed=3), champion, policy=POLICY)
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["passed"] is False and data["test_items"] == 250
    assert {"candidate", "champion", "policy", "checks", "flagged", "reference_run"} <= data.keys()
    check = next(c for c in data["checks"] if c["name"] == "accuracy")
    assert {"count", "difference", "ci_low", "ci_high", "limit", "passed", "skipped"} <= check.keys()
    assert check["limit"] == -POLICY.max_accuracy_drop
    markdown = decision.to_markdown()
    assert "REFUSED" in markdown and "| accuracy | 250 |" in markdown and "95% CI" in markdown
    assert len(decision.candidate_scores) == 250
    import io

    buffer = io.BytesIO()
    class_change_figure(decision).savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")


def _record(uri: str, label: str, root: str, side: str = "test") -> FileRecord:
    return FileRecord(
        uri=uri,
        label=label,
        relative_path=uri,
        side=side,
        root=root,
        local_path="",
        sha256=uri.ljust(64, "0"),
    )


def test_answers_come_in_batches_and_feedback_roots_mark_corrected_items() -> None:
    blobs = {"u0": b"a", "u1": b"b", "u2": b"a", "f3": b"b", "f4": b"a"}
    records = [
        _record(uri, "cat" if data == b"a" else "dog", "fb/pending" if uri.startswith("f") else "data")
        for uri, data in blobs.items()
    ]
    calls: list[int] = []

    def predict(images: list[bytes]) -> list[tuple[str, float]]:
        calls.append(len(images))
        return [("cat", 0.75) for _ in images]  # a model that always says "cat"

    answers = answer_records(predict, records, batch_size=2, read=lambda record: blobs[record.uri])
    assert calls == [2, 2, 1]
    assert answers.labels == ("cat",) * 5 and answers.confidences == (0.75,) * 5
    items = gate_items(records, corrected_roots={"fb/pending"})
    assert [item.corrected for item in items] == [False, False, False, True, True]
    decision = evaluate_gate(items, answers, None, policy=GatePolicy(min_accuracy=0.0))
    assert decision.candidate.accuracy == pytest.approx(3 / 5)
    assert decision.candidate.corrected_accuracy == pytest.approx(1 / 2)
    with pytest.raises(GateError, match="answered"):
        answer_records(lambda images: [], records[:1], read=lambda record: b"")


def test_the_decision_is_logged_to_mlflow_and_a_pass_carries_the_reference(tmp_path) -> None:
    from mlflow import MlflowClient

    from training.gate import REFERENCE_ARTIFACT, SCORES_ARTIFACT, log_gate_decision

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("gate", artifact_location=str(tmp_path / "art"))
    items = _items(25)
    champion = _answers(items, accuracy=0.8, seed=0)
    runs = {}
    for name, reference in (("first", None), ("second", ReferenceScores(run_id="r0", correct={"x": True}))):
        run_id = client.create_run(experiment).info.run_id
        decision = evaluate_gate(items, champion, champion, policy=POLICY, reference=reference)
        assert decision.passed
        log_gate_decision(decision, run_id=run_id, tracking_uri=uri)
        runs[name] = run_id
    first = client.get_run(runs["first"])
    assert first.data.tags["tfloop.gate"] == "passed" and first.data.metrics["gate_passed"] == 1.0
    assert first.data.tags["tfloop.gate_reference_run"] == runs["first"]  # no reference yet: its own scores
    folder = Path(client.download_artifacts(runs["first"], "gate", str(tmp_path / "one")))
    assert {p.name for p in folder.iterdir()} >= {"decision.json", "decision.md", "class_change.png"}
    scores = json.loads((folder.parent / SCORES_ARTIFACT).read_text())
    assert (
        len(scores) == 250
        and json.loads((folder.parent / REFERENCE_ARTIFACT).read_text())["correct"] == scores
    )
    carried = client.download_artifacts(runs["second"], REFERENCE_ARTIFACT, str(tmp_path / "two"))
    assert json.loads(Path(carried).read_text()) == {"run_id": "r0", "correct": {"x": True}}
