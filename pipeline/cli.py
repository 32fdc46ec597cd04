"""The ``tfloop`` command line: one command per pipeline stage, each a thin layer over a library function.

Heavy libraries (TensorFlow, MLflow, Prefect) are imported inside the commands, so ``tfloop --help`` is fast.
Errors that tfloop reports to users (``storage.TfloopError`` and subclasses) print as one clear line.
"""

from __future__ import annotations

import os
import sys

import typer

from pipeline.commands import (
    build,
    data,
    demo,
    deploy,
    export,
    feedback,
    flows,
    monitor,
    promote,
    serve,
    train,
)
from storage import TfloopError

app = typer.Typer(
    name="tfloop",
    help="Train, export, serve, build and roll out image classifiers; retrain them from user feedback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for stage in (data, train, export, promote, serve, build, deploy, flows, feedback, monitor, demo):
    stage.register(app)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        app()
    except TfloopError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
