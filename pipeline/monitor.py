"""The drift watch (``tfloop monitor``): the recent prediction log of a model against its training run's
reference; a PNG report, the figures logged to MLflow, and the Prefect event ``tfloop.drift.detected``
(which the ``drift-retrain`` deployment in flows.yaml retrains on) when it drifted."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import storage
from storage import versions
from storage.predictions import read_predictions
from training.drift import REFERENCE_ARTIFACT, DriftOptions, DriftReference, DriftReport, compare

DRIFT_EVENT = "tfloop.drift.detected"


class MonitorError(storage.TfloopError):
    """The watch cannot run: no model version, no reference, no log."""


@dataclass(frozen=True)
class MonitorRequest:
    model_name: str
    model_base: str
    feedback_uri: str
    tracking_uri: str
    since: datetime
    until: datetime | None = None
    model_version: int | None = None  # None: the live version
    all_versions: bool = False
    options: DriftOptions = field(default_factory=DriftOptions)


@dataclass(frozen=True)
class MonitorResult:
    model_name: str
    model_version: int
    run_id: str
    since: str
    report: DriftReport
    report_png: str | None
    mlflow_run_id: str | None
    event_emitted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "run_id": self.run_id,
            "since": self.since,
            "drift": self.report.drift,
            "enough_predictions": self.report.enough,
            "predictions": self.report.predictions,
            "checks": [asdict(check) for check in self.report.checks],
            "report": self.report_png,
            "mlflow_run_id": self.mlflow_run_id,
            "event_emitted": self.event_emitted,
        }


def load_reference(
    *, model_base: str, model_name: str, version: int, tracking_uri: str
) -> tuple[str, DriftReference]:
    """The training run of a published version and that run's drift reference."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    metadata_uri = storage.join(versions.version_uri(model_base, model_name, version), "tfloop.json")
    try:
        run_id = json.loads(storage.read_text(metadata_uri)).get("run_id")
    except (storage.StorageError, ValueError) as error:
        raise MonitorError(
            f"version {version} of {model_name} has no readable tfloop.json: {error}"
        ) from error
    if not run_id:
        raise MonitorError(
            f"version {version} of {model_name} was not exported from a training run (no run_id in "
            "tfloop.json), so it has no reference to compare with; export a run made by `tfloop train`"
        )
    with tempfile.TemporaryDirectory(prefix="tfloop-monitor-") as workdir:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=workdir, tracking_uri=tracking_uri
            )
            return run_id, DriftReference.from_dict(json.loads(Path(path).read_text()))
        except (MlflowException, OSError, ValueError, KeyError) as error:
            raise MonitorError(
                f"training run {run_id} (version {version}) has no usable {REFERENCE_ARTIFACT} in the "
                f"MLflow store at {tracking_uri} ({type(error).__name__}); older runs lack it: train "
                "again, or pass --tracking-uri when the run lives elsewhere"
            ) from error


def drift_figure(reference: DriftReference, report: DriftReport, *, title: str) -> Any:
    """Predicted-class shares and top-1 confidence: the reference against recent predictions."""
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    shares, confidence = figure.subplots(1, 2)
    x = np.arange(len(reference.labels))
    shares.bar(x - 0.2, reference.predicted_shares, 0.4, label="test split (reference)")
    shares.bar(x + 0.2, report.recent_shares, 0.4, label="recent predictions")
    shares.set_xticks(x, reference.labels, rotation=30, ha="right")
    shares.set_ylabel("share of predictions")
    shares.set_title("Predicted classes")
    shares.legend()
    bins = np.arange(len(reference.confidence)) / len(reference.confidence)
    width = 1 / len(reference.confidence)
    confidence.bar(bins, reference.confidence, width, align="edge", alpha=0.6, label="test split (reference)")
    confidence.bar(bins, report.recent_confidence, width, align="edge", alpha=0.6, label="recent predictions")
    confidence.set_xlabel("top-1 score")
    confidence.set_title("Confidence")
    confidence.legend()
    verdict = "DRIFT" if report.drift else ("too few predictions" if not report.enough else "no drift")
    figure.suptitle(f"{title}: {verdict} ({report.predictions} predictions)")
    return figure


def emit_drift_event(*, model_name: str, version: int, result: dict[str, Any]) -> bool:
    """Send ``tfloop.drift.detected`` for the model to the Prefect API in PREFECT_API_URL; False (nothing
    sent) when none is configured."""
    import asyncio

    from prefect.events.clients import PrefectEventsClient
    from prefect.events.schemas.events import Event
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        return False
    event = Event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"tfloop.model.{model_name}", "tfloop.model.version": str(version)},
        payload=result,
    )

    async def send() -> None:
        async with PrefectEventsClient(api_url=api_url) as client:
            await client.emit(event)

    asyncio.run(send())
    return True


def run_monitor(request: MonitorRequest, *, report_path: Path | None, emit: bool) -> MonitorResult:
    """Compare, write the PNG, log to MLflow, emit the event when it drifted."""
    version = request.model_version or versions.live_version(request.model_base, request.model_name)
    if version is None:
        raise MonitorError(
            f"no published version of {request.model_name} below {request.model_base}: nothing is served yet"
        )
    run_id, reference = load_reference(
        model_base=request.model_base,
        model_name=request.model_name,
        version=version,
        tracking_uri=request.tracking_uri,
    )
    predicted: list[str] = []
    confidences: list[float] = []
    sizes: list[int] = []
    pixels: list[int] = []
    try:
        for record in read_predictions(
            request.feedback_uri, request.model_name, since=request.since, until=request.until
        ):
            if not request.all_versions and record.model_version != version:
                continue
            predicted.append(record.label)
            confidences.append(record.confidence)
            sizes.append(record.bytes)
            pixels.append(record.width * record.height)
    except (ValueError, KeyError) as error:
        raise MonitorError(
            f"the prediction log below {request.feedback_uri} has an unreadable batch: {error}"
        ) from error
    report = compare(
        reference,
        predicted=predicted,
        confidences=confidences,
        input_bytes=sizes,
        input_pixels=pixels,
        options=request.options,
    )
    title = f"{request.model_name} v{version}"
    png = None
    figure = drift_figure(reference, report, title=title)
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(report_path, dpi=100)
        png = str(report_path)
    mlflow_run = log_monitor_run(request, version=version, report=report, figure=figure)
    emitted = False
    result = MonitorResult(
        model_name=request.model_name,
        model_version=version,
        run_id=run_id,
        since=request.since.astimezone(UTC).isoformat(),
        report=report,
        report_png=png,
        mlflow_run_id=mlflow_run,
        event_emitted=False,
    )
    if emit and report.drift:
        emitted = emit_drift_event(model_name=request.model_name, version=version, result=result.to_dict())
    return MonitorResult(**{**result.__dict__, "event_emitted": emitted})


def log_monitor_run(request: MonitorRequest, *, version: int, report: DriftReport, figure: Any) -> str:
    """One MLflow run in the experiment ``<model>-monitor``: each check's value, the verdict, the figure."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=request.tracking_uri)
    name = f"{request.model_name}-monitor"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    run = client.create_run(
        experiment_id,
        tags={"tfloop.model_name": request.model_name, "tfloop.model_version": str(version)},
        run_name=f"drift v{version}",
    )
    run_id = run.info.run_id
    metrics = {"drift": float(report.drift), "predictions": float(report.predictions)}
    for check in report.checks:
        key = f"{check.name.replace(' ', '_').replace('-', '')}_{check.statistic}"
        metrics[key] = check.value
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_figure(run_id, figure, "drift_report.png")
    client.set_terminated(run_id)
    return run_id
