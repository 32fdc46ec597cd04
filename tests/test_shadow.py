"""The shadow candidate's second opinion from a prediction log and the feedback records: agreement with
live, and both versions' accuracy on the images people labelled."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

import storage
from serving.feedback import FeedbackItem, FeedbackQueue
from storage.predictions import PredictionRecord, ShadowAnswer, batch_name, model_log_uri
from training.shadow import shadow_report

NAME = "shadowed"

# (live answer, candidate answer, label a person gave or None), one per live request
ANSWERS = [
    ("cat", "cat", "cat"),
    ("cat", "dog", "dog"),
    ("dog", "dog", None),
    ("dog", "cat", "dog"),
    ("cat", "cat", None),
    ("dog", "dog", "cat"),
    ("cat", "dog", None),
]


def image_of(index: int) -> bytes:
    return f"image {index}".encode()


def write_shadow_log(
    root: str, answers: Sequence[tuple[str, str, str | None]], *, candidate: int, model_name: str = NAME
) -> None:
    """A log as serving writes it (live version 1, candidate ``candidate``), and the labels people gave."""
    now = datetime.now(UTC)
    records = [
        PredictionRecord(
            sha256=hashlib.sha256(image_of(i)).hexdigest(),
            model_name=model_name,
            model_version=1,
            top_k=[(live, 0.6), ("other", 0.4)],
            margin=0.2,
            entropy=0.67,
            time=now.isoformat(),
            bytes=7,
            format="png",
            width=8,
            height=8,
            shadow=ShadowAnswer(version=candidate, label=shadow, score=0.7, agrees=shadow == live),
        )
        for i, (live, shadow, _) in enumerate(answers)
    ]
    uri = storage.join(model_log_uri(root, model_name), batch_name(now, writer="r1", sequence=candidate))
    storage.write_if_absent(uri, ("\n".join(r.to_json() for r in records) + "\n").encode())
    queue = FeedbackQueue(root)
    for i, (_, _, truth) in enumerate(answers):
        if truth is not None:
            queue.submit(FeedbackItem(image=image_of(i), extension="png", label=truth))


def test_agreement_and_reviewed_accuracy_match_a_direct_count(tmp_path: Path) -> None:
    root = str(tmp_path / "feedback")
    write_shadow_log(root, ANSWERS, candidate=2)
    write_shadow_log(root, [("cat", "dog", None)] * 5, candidate=3)  # another candidate's traffic
    report = shadow_report(feedback_uri=root, model_name=NAME, candidate_version=2)
    reviewed = [(live, shadow, truth) for live, shadow, truth in ANSWERS if truth is not None]
    assert report.compared == len(ANSWERS)
    assert report.agreement == pytest.approx(
        sum(live == shadow for live, shadow, _ in ANSWERS) / len(ANSWERS)
    )
    assert report.reviewed == len(reviewed)
    assert report.candidate_accuracy == pytest.approx(sum(s == t for _, s, t in reviewed) / len(reviewed))
    assert report.live_accuracy == pytest.approx(sum(lv == t for lv, _, t in reviewed) / len(reviewed))
    assert "agreed with live 57.1%" in report.render() and "4 reviewed items" in report.render()
    other = shadow_report(feedback_uri=root, model_name=NAME, candidate_version=3)
    overlap = [truth for _, _, truth in ANSWERS[:5] if truth is not None]  # the same images, labelled
    assert other.compared == 5 and other.agreement == 0.0 and other.reviewed == len(overlap)
    assert other.candidate_correct == overlap.count("dog") and other.live_correct == overlap.count("cat")


def test_an_image_labelled_two_ways_is_not_a_reviewed_item(tmp_path: Path) -> None:
    root = str(tmp_path / "feedback")
    write_shadow_log(root, ANSWERS[:2], candidate=2)
    FeedbackQueue(root).submit(FeedbackItem(image=image_of(0), extension="png", label="dog"))  # was "cat"
    report = shadow_report(feedback_uri=root, model_name=NAME, candidate_version=2)
    assert report.reviewed == 1 and report.candidate_accuracy == 1.0 and report.live_accuracy == 0.0


def test_no_shadow_traffic_says_so(tmp_path: Path) -> None:
    report = shadow_report(feedback_uri=str(tmp_path / "nothing"), model_name=NAME, candidate_version=4)
    assert report.compared == 0 and report.agreement is None and report.candidate_accuracy is None
    assert report.render() == "second opinion: no shadow traffic recorded for version 4 yet"


def test_the_second_opinion_joins_the_candidates_gate_decision(tmp_path: Path) -> None:
    """The gate decides before export and says the second opinion is pending; once the candidate has
    answered in the shadow, the same run's decision carries it (JSON, markdown, metrics), replaced, not
    appended, when it is recorded again."""
    import json

    from mlflow import MlflowClient

    from pipeline.promotion import second_opinion
    from tests.test_gate import POLICY, _answers, _items
    from training.gate import (
        DECISION_ARTIFACT,
        DECISION_MARKDOWN,
        SECOND_OPINION_HEADING,
        SECOND_OPINION_PENDING,
        evaluate_gate,
        log_gate_decision,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(
        client.create_experiment("g", artifact_location=str(tmp_path / "a"))
    ).info.run_id
    items = _items(25)
    answers = _answers(items, accuracy=0.8, seed=0)
    log_gate_decision(evaluate_gate(items, answers, answers, policy=POLICY), run_id=run_id, tracking_uri=uri)

    def logged(path: str, into: str) -> str:
        return Path(client.download_artifacts(run_id, path, str(tmp_path / into))).read_text()

    before = logged(DECISION_MARKDOWN, "before")
    assert (
        SECOND_OPINION_PENDING in before
        and json.loads(logged(DECISION_ARTIFACT, "b"))["second_opinion"] is None
    )

    root = str(tmp_path / "feedback")
    write_shadow_log(root, ANSWERS, candidate=2)
    for into in ("once", "twice"):
        opinion = second_opinion(
            feedback_uri=root, model_name=NAME, version=2, tracking_uri=uri, run_id=run_id
        )
        assert opinion.not_recorded is None and opinion.gate_decision == logged(DECISION_MARKDOWN, into)
    markdown = opinion.gate_decision
    assert markdown.count(SECOND_OPINION_HEADING) == 1 and SECOND_OPINION_PENDING not in markdown
    assert markdown.split(SECOND_OPINION_HEADING)[0] == before.split(SECOND_OPINION_HEADING)[0]
    agreeing = sum(live == shadow for live, shadow, _ in ANSWERS)
    assert f"| agreement with live | {len(ANSWERS)} | {100 * agreeing / len(ANSWERS):.1f}% |" in markdown
    recorded = json.loads(logged(DECISION_ARTIFACT, "json"))["second_opinion"]
    assert recorded == opinion.report.to_dict() and recorded["agreed"] == agreeing
    metrics = client.get_run(run_id).data.metrics
    assert metrics["gate_shadow_compared"] == len(ANSWERS)
    assert metrics["gate_shadow_agreement"] == pytest.approx(agreeing / len(ANSWERS))

    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id  # never gated
    refused = second_opinion(feedback_uri=root, model_name=NAME, version=2, tracking_uri=uri, run_id=other)
    assert refused.gate_decision is None and "has no gate decision" in (refused.not_recorded or "")
    assert refused.report == opinion.report
