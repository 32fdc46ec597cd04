"""CLI command ``tfloop promote``: make an exported version live (live pointer and alias ``champion``)."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands._output import emit_json, info


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
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
) -> None:
    """Make VERSION live: write <base>/<name>/live.json and move the MLflow alias champion to it.

    Serving replicas answer unpinned requests with the live version; versions published after it stay
    candidates (reachable at /v1/models/<name>/versions/<N>) until promoted. The version must be complete
    and registered. Running the same promotion again is harmless and repairs a half-done one.
    """
    from export.registry import promote_version
    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    name = model_name or settings.model_name
    base = model_base or settings.models_uri
    promotion = promote_version(
        model_name=name,
        model_base=base,
        version=version,
        tracking_uri=tracking_uri or settings.tracking_uri,
        promoted_by="tfloop promote",
    )
    if not promotion.pointer_written:
        info(f"{promotion.live_pointer} already named version {version}; moved the alias only")
    if json_output:
        emit_json(promotion.to_dict())
        return
    previous = f" (was {promotion.previous})" if promotion.previous is not None else ""
    typer.echo(
        f"{name} version {version} is live{previous}: {promotion.live_pointer}; "
        f"MLflow alias {promotion.alias} -> registered version {promotion.registered_version}"
    )


def register(app: typer.Typer) -> None:
    """Add ``tfloop promote`` to app."""
    app.command("promote")(promote_command)
