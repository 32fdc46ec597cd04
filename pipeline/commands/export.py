"""CLI commands ``tfloop export`` (a training run -> next SavedModel version) and ``tfloop promote``."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands._output import emit_json, info


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.command("export")(export_command)
    app.command("promote")(promote_command)


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
    compared with the Keras model before anything is published, and a version is never overwritten.
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
            }
        )
        return
    registered = (
        f", registered as version {result.registered_version} (alias challenger)"
        if result.registered_version is not None
        else ""
    )
    typer.echo(
        f"exported {result.metadata.get('model_name')} version {result.version} to {result.path}{registered}"
    )


def promote_command(
    version: Annotated[int, typer.Argument(help="Registered model version to promote.", min=1)],
    model_name: Annotated[
        str | None, typer.Option(help="Registered model name. Default: TFLOOP_MODEL_NAME.")
    ] = None,
    alias: Annotated[str, typer.Option(help="Alias to set.")] = "champion",
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI. Default: MLFLOW_TRACKING_URI or SQLite in the state folder."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
) -> None:
    """Point a registry alias (default champion) at a registered version; the gate does this automatically."""
    from export.registry import promote, registered_version
    from pipeline.settings import TfloopSettings

    settings = TfloopSettings()
    name = model_name or settings.model_name
    uri = tracking_uri or settings.tracking_uri
    promote(name, version, tracking_uri=uri, alias=alias)
    promoted = registered_version(name, version, tracking_uri=uri)
    if json_output:
        emit_json(
            {
                "model_name": name,
                "registered_version": version,
                "alias": alias,
                "serving_version": promoted.serving_version,
                "path": promoted.export_uri,
            }
        )
        return
    typer.echo(f"{name} version {version} (serving version {promoted.serving_version}) is now {alias}")
