"""Promotion at the end of a loop run: the smoke-tested candidate becomes the live version (the live
pointer beside the versions, and MLflow's ``champion`` alias in the same step), after the shadow
candidate's second opinion is added to the candidate's gate decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.shadow import ShadowReport


@dataclass(frozen=True)
class PromotionOutcome:
    """What promotion did: the live version (and the one before it) and the registered ``champion``."""

    version: int
    previous: int | None
    registered_version: int
    live_pointer: str
    champion_alias: str


def promote_live(
    *, model_name: str, model_base: str, version: int, tracking_uri: str, promoted_by: str
) -> PromotionOutcome:
    """Make ``version`` live: the live pointer beside the versions, then MLflow's ``champion`` alias."""
    from export.registry import promote_version

    promotion = promote_version(
        model_name=model_name,
        model_base=model_base,
        version=version,
        tracking_uri=tracking_uri,
        promoted_by=promoted_by,
    )
    return PromotionOutcome(
        version=promotion.version,
        previous=promotion.previous,
        registered_version=promotion.registered_version,
        live_pointer=promotion.live_pointer,
        champion_alias=f"{model_name} registered version {promotion.registered_version}",
    )


def current_live_version(*, model_base: str, model_name: str) -> int | None:
    """The version unpinned requests get now (``storage.versions.live_version``)."""
    from storage import versions

    return versions.live_version(model_base, model_name)


@dataclass(frozen=True)
class SecondOpinion:
    """The shadow candidate's report, and the gate decision it was added to (markdown), or why it was not."""

    report: ShadowReport
    gate_decision: str | None
    not_recorded: str | None = None


def second_opinion(
    *,
    feedback_uri: str,
    model_name: str,
    version: int,
    tracking_uri: str,
    run_id: str | None = None,
    model_base: str | None = None,
) -> SecondOpinion:
    """Read the shadow candidate's second opinion on ``version`` from the prediction log and add it to the
    gate decision of its MLflow run (``run_id``, else the run registered for the version under
    ``model_base``). A run that cannot be found or has no gate decision leaves the report unrecorded, with
    the reason; an unreadable log raises StorageError."""
    from export.errors import RegistryError
    from storage import versions
    from training.gate import GateError, add_second_opinion
    from training.shadow import shadow_report

    report = shadow_report(feedback_uri=feedback_uri, model_name=model_name, candidate_version=version)
    try:
        if run_id is None and model_base is not None:
            from export.registry import find_registered_version

            entry = find_registered_version(
                model_name=model_name,
                export_uri=versions.version_uri(model_base, model_name, version),
                tracking_uri=tracking_uri,
            )
            run_id = entry.run_id if entry is not None else None
        if run_id is None:
            return SecondOpinion(report, None, f"version {version} of {model_name} has no registered run")
        return SecondOpinion(report, add_second_opinion(report, run_id=run_id, tracking_uri=tracking_uri))
    except (GateError, RegistryError) as error:
        return SecondOpinion(report, None, str(error))
