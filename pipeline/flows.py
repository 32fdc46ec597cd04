"""Prefect flows of the loop: train -> evaluate -> gate -> export -> build -> roll out -> smoke test ->
consume feedback -> promote. Thin: every step is a task in pipeline/tasks.py over a plain function.

``train_and_deploy`` is the manual and nightly entry point; ``retrain_from_feedback`` is what the
``tfloop.feedback.received`` trigger starts (its ``reason``/``trigger`` parameters say which event crossed
the threshold). Steps after the gate run only when it passes. The gate's decision is published as a
markdown artifact (key ``gate-decision``) and the run's summary as ``loop-summary``.

One loop run per model at a time: against a Prefect server a run holds the one slot of the global
concurrency limit ``tfloop-loop-<model>`` (created on first use), so the nightly, feedback and manual
deployments never overlap (a second run waits for the slot); without a server (``tfloop flows run
--local``, the demo) it holds an OS file lock in the Prefect home instead, because the temporary servers
of in-process runs do not share concurrency leases. Delivery options that cannot work are refused before
anything is trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipeline import locking, loop, promotion, summary, tasks
from pipeline.delivery import DeliveryRequest, check_delivery
from pipeline.options import DeliveryOptions, GateOptions, TrainingOptions
from pipeline.settings import TfloopSettings
from training.gate import decision_title


def resolve_settings(
    *,
    home: str | None = None,
    data_uri: str | None = None,
    feedback_uri: str | None = None,
    model_base: str | None = None,
    model_name: str | None = None,
    tracking_uri: str | None = None,
) -> TfloopSettings:
    """The environment's settings with the flow's parameters on top (None keeps the environment's value)."""
    base = TfloopSettings()
    updates: dict[str, Any] = {
        "home": home,
        "data_uri": data_uri,
        "feedback_uri": feedback_uri,
        "model_base": model_base,
        "model_name": model_name,
        "mlflow_tracking_uri": tracking_uri,
    }
    if home is not None:
        updates["home"] = Path(home)
    return base.model_copy(update={key: value for key, value in updates.items() if value is not None})


def _run_key() -> str:
    """The flow run id (stable across retries of the same run), or a local fallback outside a run."""
    run_id = flow_run.get_id()
    return str(run_id) if run_id else "local"


# A lease outlives a renewal blip by this much; a crashed run's slot is freed by the server after it.
LOOP_LEASE_S = 300.0


@contextlib.contextmanager
def one_run_per_model(settings: TfloopSettings) -> Iterator[None]:
    """Hold the model's loop slot: the Prefect global concurrency limit, or a local file lock."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import get_current_settings

    from pipeline.prefect_server import ensure_concurrency_limit

    logger = get_run_logger()
    name = locking.loop_limit_name(settings.model_name)
    if get_current_settings().api.url:
        ensure_concurrency_limit(name=name, limit=1)
        logger.info("taking the one slot of concurrency limit %s (waits while another run holds it)", name)
        with concurrency(
            name, occupy=1, strict=True, lease_duration=LOOP_LEASE_S, raise_on_lease_renewal_failure=False
        ):
            yield
        return
    logger.info("no Prefect server: taking the local loop lock of %s", settings.model_name)
    with locking.local_loop_lock(settings.prefect_home, settings.model_name):
        yield


def run_loop(
    *,
    settings: TfloopSettings,
    reason: str,
    trigger: dict[str, Any] | None,
    training: TrainingOptions,
    gate_options: GateOptions,
    delivery: DeliveryOptions,
    require_pending: bool,
) -> dict[str, Any]:
    """The steps shared by both flows (one run per model at a time); returns :class:`summary.LoopResult`."""
    check_delivery(delivery)
    with one_run_per_model(settings):
        return _run_loop(
            settings=settings,
            reason=reason,
            trigger=trigger,
            training=training,
            gate_options=gate_options,
            delivery=delivery,
            require_pending=require_pending,
        )


def _run_loop(
    *,
    settings: TfloopSettings,
    reason: str,
    trigger: dict[str, Any] | None,
    training: TrainingOptions,
    gate_options: GateOptions,
    delivery: DeliveryOptions,
    require_pending: bool,
) -> dict[str, Any]:
    logger = get_run_logger()
    result = summary.LoopResult(
        reason=summary.describe_trigger(reason, trigger), model_name=settings.model_name
    )
    result.live_version = promotion.current_live_version(
        model_base=settings.models_uri, model_name=settings.model_name
    )
    logger.info("tfloop run: %s", result.reason)
    roots = tasks.gather_roots(data_uri=settings.dataset_uri, feedback_root=settings.feedback_root)
    if require_pending and not roots.pending_files:
        result.skipped.append("no pending corrections in the feedback queue: nothing new to retrain on")
        return _finish(result)
    logger.info("training on %s (%d pending corrections)", roots.all, len(roots.pending_files))
    outcome = tasks.train(
        loop.TrainRequest(
            roots=roots,
            model_name=settings.model_name,
            tracking_uri=settings.tracking_uri,
            experiment=settings.experiment,
            artifact_root=settings.artifact_root,
            checkpoint_dir=str(settings.checkpoints_dir / _run_key()),
            cache_dir=str(settings.home_dir / "cache"),
            options=training,
        )
    )
    result.run_id = outcome.run_id
    tasks.mark_quarantined(feedback_root=settings.feedback_root, conflicts=outcome.quarantined)
    result.quarantined = len(outcome.quarantined)
    evaluation = tasks.evaluate(
        loop.EvaluationRequest(
            run_id=outcome.run_id,
            model_name=settings.model_name,
            tracking_uri=settings.tracking_uri,
            roots=roots,
            cache_dir=str(settings.home_dir / "cache"),
        )
    )
    decision = tasks.decide(evaluation, policy=gate_options.policy(), tracking_uri=settings.tracking_uri)
    create_markdown_artifact(
        markdown=decision.to_markdown(title=decision_title(outcome.run_id)),
        key="gate-decision",
        description=decision.reason[:500],
    )
    result.gate_passed, result.gate_reason = decision.passed, decision.reason
    result.candidate_metrics = decision.candidate.to_dict()
    result.champion_metrics = decision.champion.to_dict() if decision.champion else None
    logger.info("gate: %s", decision.reason)
    if not decision.passed:
        result.skipped.append(
            "export, image, rollout, feedback and promotion: the gate refused the candidate"
        )
        return _finish(result)

    exported = tasks.export_and_register(
        run_id=outcome.run_id,
        model_base=settings.models_uri,
        model_name=settings.model_name,
        tracking_uri=settings.tracking_uri,
    )
    result.exported_version, result.export_path = exported["version"], exported["path"]
    result.registered_version = str(exported["registered_version"])
    request = DeliveryRequest(
        model_name=settings.model_name,
        model_base=settings.models_uri,
        version=int(exported["version"]),
        run_id=outcome.run_id,
        tracking_uri=settings.tracking_uri,
        options=delivery,
        feedback_uri=settings.feedback_root,
    )
    image = tasks.build_image(request)
    rollout = tasks.roll_out(request, image)
    smoke = tasks.smoke_test(request, rollout)
    for step in (image, rollout, smoke):
        if not step.ran:
            result.skipped.append(step.detail)
        logger.info("%s", step.detail)
    result.image = f"{image.value}@{image.digest}" if image.value and image.digest else image.value
    result.rollout = rollout.detail if rollout.ran else None
    result.smoke_test = smoke.detail if smoke.ran else None

    consumed = tasks.consume_feedback(
        feedback_root=settings.feedback_root,
        run_id=outcome.run_id,
        files=roots.pending_files,
        quarantined=tuple(outcome.quarantined),
    )
    result.feedback_consumed = consumed.moved + consumed.already_moved
    opinion = tasks.second_opinion(
        feedback_root=settings.feedback_root,
        model_name=settings.model_name,
        version=int(exported["version"]),
        run_id=outcome.run_id,
        tracking_uri=settings.tracking_uri,
    )
    result.second_opinion = opinion.report.render()
    if opinion.gate_decision is not None:
        create_markdown_artifact(
            markdown=opinion.gate_decision,
            key="gate-decision",
            description=f"{decision.reason[:300]}; {opinion.report.render()[:190]}",
        )
    else:
        logger.warning("second opinion not added to the gate decision: %s", opinion.not_recorded)
    if not delivery.promote:
        result.skipped.append(
            f"promotion: delivery.promote=false; version {exported['version']} stays a candidate until "
            f"`tfloop promote {exported['version']} --model-name {settings.model_name} "
            f"--model-base {settings.models_uri}`"
        )
        return _finish(result)
    promoted = tasks.promote(
        model_name=settings.model_name,
        model_base=settings.models_uri,
        version=int(exported["version"]),
        tracking_uri=settings.tracking_uri,
        promoted_by=f"flow run {_run_key()} (MLflow run {outcome.run_id})",
    )
    result.champion_alias = promoted.champion_alias
    result.live_version, result.live_previous = promoted.version, promoted.previous
    result.promoted = True
    return _finish(result)


def _finish(result: summary.LoopResult) -> dict[str, Any]:
    text = summary.format_summary(result)
    get_run_logger().info("summary:\n%s", text)
    create_markdown_artifact(
        markdown="# tfloop run summary\n\n```\n" + text + "\n```\n",
        key="loop-summary",
        description=result.reason[:500],
    )
    return result.to_dict()


@flow(name="train-and-deploy", log_prints=True, persist_result=True)
def train_and_deploy(
    reason: str = "manual run",
    trigger: dict[str, Any] | None = None,
    home: str | None = None,
    data_uri: str | None = None,
    feedback_uri: str | None = None,
    model_base: str | None = None,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    training: TrainingOptions | None = None,
    gate: GateOptions | None = None,
    delivery: DeliveryOptions | None = None,
) -> dict[str, Any]:
    """Base dataset + all pending corrections -> train -> gate -> export -> build -> roll out -> promote."""
    return run_loop(
        settings=resolve_settings(
            home=home,
            data_uri=data_uri,
            feedback_uri=feedback_uri,
            model_base=model_base,
            model_name=model_name,
            tracking_uri=tracking_uri,
        ),
        reason=reason,
        trigger=trigger,
        training=training or TrainingOptions(),
        gate_options=gate or GateOptions(),
        delivery=delivery or DeliveryOptions(),
        require_pending=False,
    )


@flow(name="retrain-from-feedback", log_prints=True, persist_result=True)
def retrain_from_feedback(
    reason: str = "feedback threshold reached",
    trigger: dict[str, Any] | None = None,
    home: str | None = None,
    data_uri: str | None = None,
    feedback_uri: str | None = None,
    model_base: str | None = None,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    training: TrainingOptions | None = None,
    gate: GateOptions | None = None,
    delivery: DeliveryOptions | None = None,
) -> dict[str, Any]:
    """What the feedback trigger starts: the same loop, skipped when no corrections are pending."""
    return run_loop(
        settings=resolve_settings(
            home=home,
            data_uri=data_uri,
            feedback_uri=feedback_uri,
            model_base=model_base,
            model_name=model_name,
            tracking_uri=tracking_uri,
        ),
        reason=reason,
        trigger=trigger,
        training=training or TrainingOptions(),
        gate_options=gate or GateOptions(),
        delivery=delivery or DeliveryOptions(),
        require_pending=True,
    )
