"""CLI command ``tfloop monitor``: the drift watch over the prediction log (see :mod:`pipeline.monitor`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from pipeline.commands._output import emit_json, fail, info

DRIFT_EXIT_CODE = 3
_DURATION = re.compile(r"(?P<amount>[0-9]+(?:\.[0-9]+)?)(?P<unit>[smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, *, now: datetime) -> datetime:
    """``24h``, ``30m``, ``7d`` (before ``now``) or an ISO time (UTC when it names no zone)."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=float(match["amount"]) * _UNITS[match["unit"]])
    try:
        stamp = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is neither a duration (24h, 30m, 7d) nor an ISO time") from None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


def monitor_command(
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="Model name. Default: TFLOOP_MODEL_NAME.")
    ] = None,
    model_base: Annotated[
        str | None,
        typer.Option(
            "--model-base", help="Model base holding <name>/<version>/. Default: TFLOOP_MODEL_BASE."
        ),
    ] = None,
    feedback_uri: Annotated[
        str | None,
        typer.Option(
            "--feedback-uri",
            help="Feedback queue root the serving replicas log predictions below (folder or gs://). "
            "Default: TFLOOP_FEEDBACK_URI.",
        ),
    ] = None,
    since: Annotated[
        str,
        typer.Option(
            "--since", help="Start of the window: a duration back from now (24h, 7d) or an ISO time."
        ),
    ] = "24h",
    until: Annotated[
        str | None, typer.Option("--until", help="End of the window (ISO time). Default: now.")
    ] = None,
    model_version: Annotated[
        int | None, typer.Option("--model-version", min=1, help="Version to watch. Default: the live one.")
    ] = None,
    all_versions: Annotated[
        bool,
        typer.Option("--all-versions", help="Count predictions of every version, not only the watched one."),
    ] = False,
    psi_threshold: Annotated[
        float,
        typer.Option("--psi-threshold", min=0.0, help="PSI at which a statistic drifted (0.2: significant)."),
    ] = 0.2,
    alpha: Annotated[
        float, typer.Option("--alpha", min=0.0, max=1.0, help="Significance level of the chi-square test.")
    ] = 0.01,
    min_predictions: Annotated[
        int,
        typer.Option("--min-predictions", min=1, help="Fewer predictions than this never count as drift."),
    ] = 50,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="PNG report path. Default: <state folder>/monitor/<name>-v<N>.png."),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow tracking URI. Default: MLFLOW_TRACKING_URI.")
    ] = None,
    no_event: Annotated[
        bool, typer.Option("--no-event", help="Do not send tfloop.drift.detected to Prefect on drift.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
) -> None:
    """Compare recent predictions with the training run's reference and say whether traffic drifted.

    Reads the prediction log the serving replicas write below the feedback queue, keeps the window's
    predictions of the watched version, and compares them with the reference the version carries
    (reference.json, written by its training run): population stability index (PSI) of the predicted-class
    shares against the training split's class prior, of the top-1 confidence against the test split's, and
    of the input bytes, width, height and format against the training images'; and a chi-square test of
    the class counts. Writes a PNG report, logs the values and the figure to MLflow (experiment
    <name>-monitor) and, on drift, sends the Prefect event tfloop.drift.detected (resource
    tfloop.model.<name>; the flows.yaml deployment drift-retrain retrains on it; needs PREFECT_API_URL).

    Exit code: 0 no drift (or too few predictions to tell), 3 drift detected, 1 the watch could not run
    (no published version, no reference, no prediction log).
    """
    from pipeline.monitor import MonitorError, MonitorRequest, run_monitor
    from pipeline.settings import TfloopSettings
    from storage.versions import live_version
    from training.drift import DriftOptions

    settings = TfloopSettings()
    now = datetime.now(UTC)
    name = model_name or settings.model_name
    base = model_base or settings.models_uri
    version = model_version or live_version(base, name)
    request = MonitorRequest(
        model_name=name,
        model_base=base,
        feedback_uri=feedback_uri or settings.feedback_root,
        tracking_uri=tracking_uri or settings.tracking_uri,
        artifact_root=settings.artifact_root,
        since=parse_since(since, now=now),
        until=parse_since(until, now=now) if until else None,
        model_version=version,
        all_versions=all_versions,
        options=DriftOptions(
            psi_threshold=psi_threshold, chi_square_alpha=alpha, min_predictions=min_predictions
        ),
    )
    path = report or settings.home_dir / "monitor" / f"{name}-v{version}.png"
    try:
        result = run_monitor(request, report_path=path, emit=not no_event)
    except MonitorError as error:
        fail(str(error))
    drift = result.report
    if json_output:
        emit_json(result.to_dict())
    else:
        verdict = drift.verdict.upper() if drift.drift else drift.verdict
        if not drift.enough:
            verdict += f" to tell ({drift.predictions} < {min_predictions})"
        typer.echo(
            f"{name} version {result.model_version}: {verdict} "
            f"({drift.predictions} predictions since {result.since})"
        )
        typer.echo(f"  {'check':<24} {'statistic':<13} {'value':>8}  {'threshold':>9}  verdict")
        for check in drift.checks:
            mark = "DRIFT" if check.drifted else "ok"
            typer.echo(
                f"  {check.name:<24} {check.statistic:<13} {check.value:8.4f}  {check.threshold:>9g}  {mark}"
            )
        typer.echo(f"report: {result.report_png}")
    if result.event_emitted:
        info(f"sent tfloop.drift.detected for tfloop.model.{name}", quiet=json_output)
    elif result.event_error:
        typer.secho(f"warning: drift, but no Prefect event sent: {result.event_error}", err=True)
    if drift.drift:
        raise typer.Exit(DRIFT_EXIT_CODE)


def register(app: typer.Typer) -> None:
    """Add ``tfloop monitor`` to app."""
    app.command("monitor")(monitor_command)
