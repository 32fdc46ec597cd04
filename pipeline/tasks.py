"""Prefect tasks: each a short wrapper over one plain, typed function of training/, export/, k8s/ or the
loop's modules in pipeline/.

Tasks that touch storage, the MLflow registry, an image registry or the cluster retry with exponential
backoff and have timeouts. Results are persisted (in Prefect's result storage under the state folder) with
Prefect's default cache policy (inputs + task source + flow run id), so retrying a failed flow run reuses
the steps that had finished instead of redoing them. Training keeps a checkpoint folder per flow run, so a
retried training task resumes from its last checkpoint.

Retries never duplicate: a retried export returns the version its run already has (export.api), promotion
is idempotent, and a rollout that was rolled back (``delivery.RolledBackError``), a delivery that cannot
work (``delivery.DeliveryConfigError``) or settings the cluster refuses are final: :func:`retry_unless_final`
refuses to retry them.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from k8s.errors import ForbiddenError, InvalidSettingsError, InvalidTargetError, NamespaceMissingError
from pipeline import delivery, feedback_queue, loop, promotion
from training import gate

# Errors a retry cannot fix: the same rollout would be rolled back again, the same settings refused again.
FINAL_ERRORS: tuple[type[BaseException], ...] = (
    delivery.RolledBackError,
    delivery.DeliveryConfigError,
    InvalidTargetError,
    InvalidSettingsError,
    ForbiddenError,
    NamespaceMissingError,
)


def retry_unless_final(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task unless its error is final (:data:`FINAL_ERRORS`).

    A rolled-back rollout is final: retrying it would roll the same image out again and roll it back again.
    """
    error = state.data
    return not isinstance(error, FINAL_ERRORS)


STORAGE_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.2,
}
FIVE_MINUTES = 300
ONE_HOUR = 3600


@task(name="gather-roots", **STORAGE_RETRIES, timeout_seconds=FIVE_MINUTES, persist_result=True)
def gather_roots(
    *, data_uri: str, feedback_root: str, include_consumed: bool = True
) -> feedback_queue.DatasetRoots:
    """The base dataset plus feedback roots, and the pending files this run will consume."""
    return feedback_queue.gather_roots(
        data_uri=data_uri, feedback_root=feedback_root, include_consumed=include_consumed
    )


@task(name="train", retries=1, retry_delay_seconds=10, timeout_seconds=12 * ONE_HOUR, persist_result=True)
def train(request: loop.TrainRequest) -> loop.TrainOutcome:
    """Train and evaluate on the validation split, tracked in MLflow; resumes from its checkpoint on retry."""
    return loop.train_candidate(request)


@task(
    name="evaluate-candidate-and-champion", **STORAGE_RETRIES, timeout_seconds=ONE_HOUR, persist_result=True
)
def evaluate(request: loop.EvaluationRequest) -> loop.Evaluation:
    """Both models answer the run's test items (corrected slice included) and its other corrected items."""
    return loop.evaluate_candidate_and_champion(request)


@task(name="gate", **STORAGE_RETRIES, timeout_seconds=FIVE_MINUTES, persist_result=True)
def decide(evaluation: loop.Evaluation, *, policy: gate.GatePolicy, tracking_uri: str) -> gate.GateDecision:
    """Apply the gate (intervals, per class, corrected slice, reference) and log the decision, its markdown
    table and per-class plot on the candidate's MLflow run; the flow publishes the returned decision."""
    decision = gate.evaluate_gate(
        evaluation.items,
        evaluation.candidate,
        evaluation.champion,
        policy=policy,
        reference=evaluation.reference,
    )
    gate.log_gate_decision(decision, run_id=evaluation.run_id, tracking_uri=tracking_uri)
    return decision


@task(name="export-and-register", **STORAGE_RETRIES, timeout_seconds=ONE_HOUR, persist_result=True)
def export_and_register(
    *, run_id: str, model_base: str, model_name: str, tracking_uri: str
) -> dict[str, Any]:
    """Export the run's model as the next SavedModel version and register it (alias ``challenger``)."""
    return loop.export_candidate(
        run_id=run_id, model_base=model_base, model_name=model_name, tracking_uri=tracking_uri
    )


@task(
    name="build-image", retries=2, retry_delay_seconds=30, timeout_seconds=2 * ONE_HOUR, persist_result=True
)
def build_image(request: delivery.DeliveryRequest) -> delivery.StepOutcome:
    """Build (and push) the serving image of the exported version, or say why it was skipped."""
    return delivery.build_serving_image(request)


@task(
    name="roll-out",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_unless_final,
    timeout_seconds=ONE_HOUR,
    persist_result=True,
)
def roll_out(request: delivery.DeliveryRequest, image: delivery.StepOutcome) -> delivery.StepOutcome:
    """Roll the built image out by digest (rollback on failure; a rolled-back rollout is not retried)."""
    return delivery.roll_out_image(request, image=image.value, digest=image.digest)


@task(name="smoke-test", timeout_seconds=FIVE_MINUTES, persist_result=True)
def smoke_test(request: delivery.DeliveryRequest, rollout: delivery.StepOutcome) -> delivery.StepOutcome:
    """Check the candidate answers (the rollout's smoke test, or its pinned route on the serving URL).

    Not retried: the check already waits up to ``delivery.smoke_timeout_s`` for the candidate to load.
    """
    return delivery.smoke_test_serving(request, rollout=rollout)


@task(name="consume-feedback", **STORAGE_RETRIES, timeout_seconds=ONE_HOUR, persist_result=True)
def consume_feedback(
    *, feedback_root: str, run_id: str, files: tuple[str, ...], quarantined: tuple[str, ...] = ()
) -> feedback_queue.ConsumeResult:
    """Move the pending corrections this run trained on to ``consumed/<run>/`` (never deleted); the
    quarantined ones stay pending."""
    return feedback_queue.consume_feedback(
        feedback_root=feedback_root, run_id=run_id, files=files, quarantined=quarantined
    )


@task(name="mark-quarantined", **STORAGE_RETRIES, timeout_seconds=FIVE_MINUTES, persist_result=True)
def mark_quarantined(*, feedback_root: str, conflicts: dict[str, list[str]]) -> int:
    """Mark the images the run found under different labels, for a person to resolve."""
    return feedback_queue.mark_quarantined(feedback_root=feedback_root, conflicts=conflicts)


@task(name="promote", **STORAGE_RETRIES, timeout_seconds=FIVE_MINUTES, persist_result=True)
def promote(
    *, model_name: str, model_base: str, version: int, tracking_uri: str, promoted_by: str
) -> promotion.PromotionOutcome:
    """Make the version live: the live pointer beside the versions and MLflow's ``champion`` alias."""
    return promotion.promote_live(
        model_name=model_name,
        model_base=model_base,
        version=version,
        tracking_uri=tracking_uri,
        promoted_by=promoted_by,
    )


@task(name="second-opinion", **STORAGE_RETRIES, timeout_seconds=FIVE_MINUTES, persist_result=True)
def second_opinion(
    *, feedback_root: str, model_name: str, version: int, run_id: str, tracking_uri: str
) -> promotion.SecondOpinion:
    """The shadow candidate's agreement with live (and accuracy on reviewed items) from the prediction log,
    added to the candidate's gate decision."""
    return promotion.second_opinion(
        feedback_uri=feedback_root,
        model_name=model_name,
        version=version,
        run_id=run_id,
        tracking_uri=tracking_uri,
    )
