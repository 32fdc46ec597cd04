"""CLI command ``tfloop promote``: make an exported version live (live pointer and alias ``champion``)."""

from __future__ import annotations

from typing import Annotated

import typer

import storage
from pipeline.commands._output import emit_json, fail, info


def promote_command(
    version: Annotated[int, typer.Argument(help="Serving version to make live (the folder number).", min=1)],
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="Model name. Default: TFLOOP_MODEL_NAME.")
    ] = None,
    model_base: Annotated[
        str | None,
        typer.Option(
            "--model-base",
            help="Model base (folder or gs:// prefix) holding <name>/<version>/. "
            "Default: TFLOOP_MODEL_BASE or <state folder>/models.",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI. Default: MLFLOW_TRACKING_URI or SQLite in the state folder.",
        ),
    ] = None,
    feedback_uri: Annotated[
        str | None,
        typer.Option(
            "--feedback-uri",
            help="Feedback queue root holding the prediction log, for the shadow candidate's second opinion. "
            "Default: TFLOOP_FEEDBACK_URI or <state folder>/feedback.",
        ),
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            "--min-agreement",
            min=0.0,
            max=1.0,
            help="Refuse the promotion when the candidate answered live traffic in the shadow and agreed "
            "with live less often than this (0-1).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
) -> None:
    """Make VERSION live: write <base>/<name>/live.json and move the MLflow alias champion to it.

    Serving replicas answer unpinned requests with the live version; versions published after it stay
    candidates (reachable at /v1/models/<name>/versions/<N>) until promoted. The version must be complete
    and registered. Running the same promotion again is harmless and repairs a half-done one.

    Before promoting, prints the second opinion of the shadow candidate and adds it to the gate decision of
    VERSION's MLflow run (gate/decision.json, key second_opinion; gate/decision.md): while VERSION was the
    candidate, the replicas had it answer a copy of live traffic; its agreement with live and the accuracy
    of both on the images people labelled since come from the prediction log.
    """
    from export.registry import promote_version
    from pipeline.promotion import second_opinion
    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    name = model_name or settings.model_name
    base = model_base or settings.models_uri
    tracking = tracking_uri or settings.tracking_uri
    try:
        opinion = second_opinion(
            feedback_uri=feedback_uri or settings.feedback_root,
            model_name=name,
            version=version,
            tracking_uri=tracking,
            model_base=base,
        )
    except storage.StorageError as error:
        info(f"no second opinion: the prediction log cannot be read ({error})")
        opinion = None
    shadow = None
    if opinion is not None:
        shadow = opinion.report
        info(shadow.render())
        if opinion.not_recorded:
            info(f"(not added to the gate decision: {opinion.not_recorded})")
        agreement = shadow.agreement
        if min_agreement is not None and agreement is not None and agreement < min_agreement:
            fail(
                f"version {version} agreed with live on {100 * agreement:.1f}% of {shadow.compared} shadowed "
                f"requests, under --min-agreement {min_agreement:g}: not promoted (look at the disagreements "
                "in the prediction log, or promote without --min-agreement)"
            )
    promotion = promote_version(
        model_name=name,
        model_base=base,
        version=version,
        tracking_uri=tracking,
        promoted_by="tfloop promote",
    )
    if not promotion.pointer_written:
        info(f"{promotion.live_pointer} already named version {version}; moved the alias only")
    if json_output:
        emit_json({**promotion.to_dict(), "shadow": shadow.to_dict() if shadow is not None else None})
        return
    previous = f" (was {promotion.previous})" if promotion.previous is not None else ""
    typer.echo(
        f"{name} version {version} is live{previous}: {promotion.live_pointer}; "
        f"MLflow alias {promotion.alias} -> registered version {promotion.registered_version}"
    )


def register(app: typer.Typer) -> None:
    """Add ``tfloop promote`` to app."""
    app.command("promote")(promote_command)
