"""The drift watch (``tfloop monitor``): the recent prediction log of a model against the reference its
published version carries (``<base>/<name>/<N>/reference.json``, from the training run); a PNG report, the
values logged to MLflow, and the Prefect event ``tfloop.drift.detected`` (which the ``drift-retrain``
deployment in flows.yaml retrains on) when it drifted."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import storage
from storage import versions
from storage.predictions import model_log_uri, read_predictions
from training.drift import BYTES_EDGES, DriftOptions, DriftReference, DriftReport, InputStats, compare

DRIFT_EVENT = "tfloop.drift.detected"


class MonitorError(storage.TfloopError):
    """The watch cannot run: no model version, no reference, no log."""


@dataclass(frozen=True, kw_only=True)
class MonitorRequest:
    """What to watch: a model's published version, the window of its prediction log, and where to report."""

    model_name: str
    model_base: str
    feedback_uri: str
    tracking_uri: str
    since: datetime
    until: datetime | None = None
    artifact_root: str | None = None  # where a new <model>-monitor experiment keeps its artifacts
    model_version: int | None = None  # None: the live version
    all_versions: bool = False  # count the predictions of every version, not only the watched one
    options: DriftOptions = field(default_factory=DriftOptions)


@dataclass(frozen=True, kw_only=True)
class MonitorResult:
    """The watch's answer: the comparison and what was done with it."""

    model_name: str
    model_version: int
    run_id: str | None
    since: str
    until: str | None
    report: DriftReport
    report_png: str | None
    mlflow_run_id: str | None
    event_emitted: bool = False
    event_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "run_id": self.run_id,
            "since": self.since,
            "until": self.until,
            "drift": self.report.drift,
            "verdict": self.report.verdict,
            "enough_predictions": self.report.enough,
            "predictions": self.report.predictions,
            "checks": [asdict(check) for check in self.report.checks],
            "report": self.report_png,
            "mlflow_run_id": self.mlflow_run_id,
            "event_emitted": self.event_emitted,
            "event_error": self.event_error,
        }


def load_reference(*, model_base: str, model_name: str, version: int) -> tuple[str | None, DriftReference]:
    """The training run id (from ``tfloop.json``) and the drift reference a published version carries."""
    folder = versions.version_uri(model_base, model_name, version)
    reference_uri = storage.join(folder, versions.REFERENCE_FILE)
    try:
        metadata = json.loads(storage.read_text(storage.join(folder, versions.METADATA_FILE)))
    except (storage.StorageError, ValueError):
        metadata = {}
    run_id = metadata.get("run_id") if isinstance(metadata, dict) else None
    if not storage.exists(reference_uri):
        how = (
            f"train and export a new version (`tfloop train --data ... --export-to {model_base}`); versions "
            "exported before tfloop recorded references cannot be watched"
        )
        raise MonitorError(f"version {version} of {model_name} carries no {reference_uri}: {how}")
    try:
        return run_id, DriftReference.from_dict(json.loads(storage.read_text(reference_uri)))
    except (ValueError, KeyError, TypeError) as error:
        raise MonitorError(
            f"{reference_uri} is not a drift reference ({type(error).__name__}: {error}); export the "
            "version again from a run made by this tfloop"
        ) from error


def drift_figure(reference: DriftReference, report: DriftReport, *, title: str) -> Any:
    """Class shares (training prior, test-split predictions, recent predictions), top-1 confidence and
    encoded input size: the reference against recent predictions."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.4), layout="constrained")
    shares, confidence, sizes = figure.subplots(1, 3)
    x = np.arange(len(reference.labels))
    shares.bar(x - 0.27, reference.class_prior, 0.27, label="training split (prior)")
    shares.bar(x, reference.predicted_shares, 0.27, label="test split predictions")
    shares.bar(x + 0.27, report.recent_shares, 0.27, label="recent predictions")
    shares.set_xticks(x, reference.labels, rotation=30, ha="right")
    shares.set_ylabel("share")
    shares.set_title("Predicted classes")
    shares.legend(fontsize="small")
    bins = np.arange(len(reference.confidence)) / len(reference.confidence)
    width = 1 / len(reference.confidence)
    confidence.bar(bins, reference.confidence, width, align="edge", alpha=0.6, label="test split")
    confidence.bar(bins, report.recent_confidence, width, align="edge", alpha=0.6, label="recent")
    confidence.set_xlabel("top-1 score")
    confidence.set_title("Confidence")
    confidence.legend(fontsize="small")
    ticks = np.arange(len(reference.input_bytes))
    sizes.bar(ticks - 0.2, reference.input_bytes, 0.4, label="training images")
    sizes.bar(ticks + 0.2, report.recent_bytes, 0.4, label="recent inputs")
    names = [f"<{int(top) // 1024} KiB" if np.isfinite(top) else "more" for top in BYTES_EDGES[1:]]
    sizes.set_xticks(ticks, names, rotation=60, ha="right", fontsize="x-small")
    sizes.set_title("Encoded input size")
    sizes.legend(fontsize="small")
    figure.suptitle(f"{title}: {report.verdict} ({report.predictions} predictions)")
    return figure


def emit_drift_event(*, model_name: str, version: int, payload: dict[str, Any]) -> bool:
    """Send ``tfloop.drift.detected`` for the model to the Prefect API in ``PREFECT_API_URL`` (server or
    Cloud); False (nothing sent) when none is configured. Raises what the events client raises when the
    API cannot be reached."""
    import asyncio

    from prefect.events.clients import get_events_client
    from prefect.events.schemas.events import Event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    event = Event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"tfloop.model.{model_name}",
            "tfloop.model": model_name,
            "tfloop.model_version": str(version),
        },
        payload=payload,
    )

    async def send() -> None:
        # emit_event() would queue the event on a background worker and drop delivery errors; a one-shot
        # client tells the caller whether the event arrived.
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    asyncio.run(send())
    return True


def collect(request: MonitorRequest, *, version: int) -> tuple[list[str], list[float], InputStats]:
    """The window's predicted labels, top-1 scores and input statistics (of ``version`` unless
    ``all_versions``)."""
    folder = model_log_uri(request.feedback_uri, request.model_name)
    if not storage.list_dirs(folder):
        raise MonitorError(
            f"no prediction log of {request.model_name} at {folder}: serving writes it there when its "
            "TFLOOP_FEEDBACK_URI is this feedback queue and TFLOOP_SERVE_PREDICTION_LOG is on; pass the "
            "queue serving uses with --feedback-uri"
        )
    predicted: list[str] = []
    confidences: list[float] = []
    inputs = InputStats()
    try:
        for record in read_predictions(
            request.feedback_uri, request.model_name, since=request.since, until=request.until
        ):
            if not request.all_versions and record.model_version != version:
                continue
            predicted.append(record.label)
            confidences.append(record.confidence)
            inputs.bytes.append(record.bytes)
            inputs.width.append(record.width)
            inputs.height.append(record.height)
            inputs.format.append(record.format)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise MonitorError(
            f"the prediction log at {folder} has an unreadable batch ({type(error).__name__}: {error})"
        ) from error
    return predicted, confidences, inputs


def run_monitor(request: MonitorRequest, *, report_path: Path | None, emit: bool) -> MonitorResult:
    """Compare the window's predictions with the version's reference, write the PNG to ``report_path``,
    log to MLflow, and (with ``emit``) send the drift event when it drifted. A failed send does not fail
    the watch: ``event_error`` says what happened."""
    version = request.model_version or versions.live_version(request.model_base, request.model_name)
    if version is None:
        raise MonitorError(
            f"no published version of {request.model_name} below {request.model_base}: nothing is served yet"
        )
    if not versions.is_complete(request.model_base, request.model_name, version):
        raise MonitorError(
            f"{request.model_name} has no complete version {version} below {request.model_base}"
        )
    run_id, reference = load_reference(
        model_base=request.model_base, model_name=request.model_name, version=version
    )
    predicted, confidences, inputs = collect(request, version=version)
    report = compare(
        reference, predicted=predicted, confidences=confidences, inputs=inputs, options=request.options
    )
    figure = drift_figure(reference, report, title=f"{request.model_name} v{version}")
    png = None
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(report_path, dpi=100)
        png = str(report_path)
    result = MonitorResult(
        model_name=request.model_name,
        model_version=version,
        run_id=run_id,
        since=request.since.astimezone(UTC).isoformat(),
        until=request.until.astimezone(UTC).isoformat() if request.until else None,
        report=report,
        report_png=png,
        mlflow_run_id=log_monitor_run(request, version=version, report=report, figure=figure),
    )
    if emit and report.drift:
        try:
            emitted = emit_drift_event(
                model_name=request.model_name, version=version, payload=result.to_dict()
            )
        # The events client raises websocket, OS and plain exceptions alike; the report stands regardless.
        except Exception as error:  # noqa: BLE001
            return replace(result, event_error=f"{type(error).__name__}: {error}")
        return replace(
            result,
            event_emitted=emitted,
            event_error=None if emitted else "PREFECT_API_URL is not set: no Prefect API to send to",
        )
    return result


def check_metric_key(name: str, statistic: str) -> str:
    """The MLflow metric name of one check: ``predicted_class_shares_psi``, ``top1_confidence_psi``, ..."""
    return f"{name.replace(' ', '_').replace('-', '')}_{statistic}"


def log_monitor_run(request: MonitorRequest, *, version: int, report: DriftReport, figure: Any) -> str:
    """One MLflow run in the experiment ``<model>-monitor``, tagged with the watched version: each
    check's value, the verdict, the prediction count and the figure."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=request.tracking_uri)
    name = f"{request.model_name}-monitor"
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(name, artifact_location=request.artifact_root)
    )
    run = client.create_run(
        experiment_id,
        tags={
            "tfloop.model_name": request.model_name,
            "tfloop.model_version": str(version),
            "tfloop.drift": report.verdict,
        },
        run_name=f"drift v{version}",
    )
    run_id = run.info.run_id
    client.log_param(run_id, "since", request.since.astimezone(UTC).isoformat())
    metrics = {"drift": float(report.drift), "predictions": float(report.predictions)}
    for check in report.checks:
        metrics[check_metric_key(check.name, check.statistic)] = check.value
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_figure(run_id, figure, "drift_report.png")
    client.set_terminated(run_id)
    return run_id
