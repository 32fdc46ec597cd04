"""CLI command ``tfloop export``: a training run -> the next SavedModel version (once per run)."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands._output import emit_json, info


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.command("export")(export_command)


def export_command(
    run: Annotated[str, typer.Option("--run", help="MLflow run id of a `tfloop train` run.")],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Export base (folder or gs:// prefix); the model lands in <base>/<model name>/<version>/. "
            "Default: TFLOOP_MODEL_BASE or <state folder>/models.",
        ),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(help="Model name (folder and registry name). Default: the run's tfloop.model_name tag."),
    ] = None,
    register_model: Annotated[
        bool,
        typer.Option(
            "--register/--no-register",
            help="Register the version in the MLflow Model Registry with the alias challenger.",
        ),
    ] = True,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI. Default: MLFLOW_TRACKING_URI or SQLite in the state folder."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (version, path, registered_version) last.")
    ] = False,
) -> None:
    """Export a training run's model as the next version: raw image bytes in, verified, published, registered.

    The SavedModel decodes JPEG/PNG/GIF/BMP, resizes and preprocesses inside the graph; it is reloaded and
    compared with the Keras model before anything is published, and a version is never overwritten. A run
    that is already published below the base is not published again: its version is printed (and
    registered, if a crash came between publishing and registering).
    """
    from export.api import export_run
    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    target = base or settings.models_uri
    result = export_run(
        run,
        base=target,
        tracking_uri=tracking_uri or settings.tracking_uri,
        model_name=model_name,
        register=register_model,
        progress=info,
    )
    if json_output:
        emit_json(
            {
                "version": result.version,
                "path": result.path,
                "registered_version": result.registered_version,
                "model_name": result.metadata.get("model_name"),
                "reused": result.reused,
            }
        )
        return
    registered = (
        f", registered as version {result.registered_version} (alias challenger)"
        if result.registered_version is not None
        else ""
    )
    verb = "already exported" if result.reused else "exported"
    typer.echo(
        f"{verb} {result.metadata.get('model_name')} version {result.version} to {result.path}{registered}"
    )
