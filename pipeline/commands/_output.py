"""Output helpers shared by every CLI command: one JSON line for scripts, clear errors for people."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer


def emit_json(payload: dict[str, Any]) -> None:
    """Print ``payload`` as the last stdout line (one JSON object), for ``--json``."""
    sys.stdout.flush()
    print(json.dumps(payload, default=str, sort_keys=True), flush=True)


def fail(message: str, *, code: int = 1) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def info(message: str, *, quiet: bool = False) -> None:
    """A progress line on stderr, so stdout stays clean for ``--json``."""
    if not quiet:
        typer.echo(message, err=True)
