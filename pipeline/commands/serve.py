"""CLI command ``tfloop serve``: run the serving API (the same settings as ``python -m serving``)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from pipeline.commands._output import fail, info


def _serve(
    model_base: Annotated[
        str | None, typer.Option("--model-base", help="Export base with <name>/<version>/ (path or gs://).")
    ] = None,
    model_name: Annotated[str | None, typer.Option("--model-name", help="Model to serve.")] = None,
    feedback: Annotated[
        str | None, typer.Option("--feedback", help="Feedback queue root (path or gs://).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (default 8501).")] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option("--grpc-port", help="TF Serving gRPC port (default 8500; 0 turns gRPC off)."),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Interface (default 0.0.0.0).")] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="'latest' (default, follows new versions) or a pinned number."),
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", help="Images per model call.")
    ] = None,
    max_batch_wait_ms: Annotated[
        float | None, typer.Option("--max-batch-wait-ms", help="Longest wait for a batch to fill.")
    ] = None,
    batch_workers: Annotated[
        int | None,
        typer.Option("--batch-workers", help="Batches the model may run at once (default 2)."),
    ] = None,
    tf_intra_op_threads: Annotated[
        int | None,
        typer.Option(
            "--tf-intra-op-threads",
            help="Threads one TensorFlow op may use (default: the cores divided among the batch workers).",
        ),
    ] = None,
    tf_inter_op_threads: Annotated[
        int | None,
        typer.Option("--tf-inter-op-threads", help="TensorFlow ops run at once (default: one per core)."),
    ] = None,
    poll_interval: Annotated[
        float | None, typer.Option("--poll-interval", help="Seconds between looks for a new version.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="TFLOOP_SERVE_TOKEN", help="Bearer token required by /feedback."),
    ] = None,
    allow_new_labels: Annotated[
        bool | None,
        typer.Option("--allow-new-labels/--known-labels-only", help="Accept labels the model lacks."),
    ] = None,
    prefect_api_url: Annotated[
        str | None,
        typer.Option("--prefect-api-url", help="Prefect API for feedback events (default: PREFECT_API_URL)."),
    ] = None,
) -> None:
    """Serve the model: TF Serving REST and gRPC, /classify, /feedback, an upload page at /.

    Unset options come from TFLOOP_SERVE_* environment variables, then from the tfloop state folder.
    """
    from pydantic import ValidationError

    from pipeline.settings import TfloopSettings
    from serving.server import run_server
    from serving.settings import ServingSettings

    tfloop = TfloopSettings()
    overrides: dict[str, Any] = {
        "model_base": model_base,
        "model_name": model_name,
        "feedback_uri": feedback,
        "port": port,
        "grpc_port": grpc_port,
        "host": host,
        "version_policy": version,
        "max_batch_size": max_batch_size,
        "max_batch_wait_ms": max_batch_wait_ms,
        "batch_workers": batch_workers,
        "tf_intra_op_threads": tf_intra_op_threads,
        "tf_inter_op_threads": tf_inter_op_threads,
        "poll_interval_s": poll_interval,
        "token": token,
        "allow_new_labels": allow_new_labels,
        "prefect_api_url": prefect_api_url,
    }
    defaults = {
        "model_base": ("TFLOOP_SERVE_MODEL_BASE", tfloop.models_uri),
        "model_name": ("TFLOOP_SERVE_MODEL_NAME", tfloop.model_name),
        "feedback_uri": ("TFLOOP_SERVE_FEEDBACK_URI", tfloop.feedback_root),
        "cache_dir": ("TFLOOP_SERVE_CACHE_DIR", str(tfloop.home_dir / "serving-cache")),
    }
    for key, (env_name, value) in defaults.items():
        if overrides.get(key) is None and env_name not in os.environ:
            overrides[key] = value
    try:
        settings = ServingSettings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as error:
        fail(f"invalid serve options: {error}")
    info(
        f"serving {settings.model_name} from {settings.model_base} ({settings.version_policy}) on "
        f"http://{settings.host}:{settings.port}"
        + (f" and gRPC {settings.host}:{settings.grpc_port}" if settings.grpc_port else "")
        + f"; feedback to {settings.feedback_uri}"
    )
    run_server(settings)


def register(app: typer.Typer) -> None:
    """Add this stage's commands to app."""
    app.command("serve")(_serve)
