"""MLflow tracking for training runs, through an explicit ``MlflowClient`` (no process-global MLflow state).

:class:`TrackingSettings` says where runs go; :class:`RunTracker` creates the experiment when missing (with
the configured artifact location), opens or resumes a run, and logs parameters, per-epoch metrics, tags,
dictionaries, figures and files. A Keras callback from :meth:`RunTracker.epoch_callback` logs each epoch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage import TfloopError

if TYPE_CHECKING:
    import keras
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

MODEL_NAME_TAG = "tfloop.model_name"
FINGERPRINT_TAG = "tfloop.dataset_fingerprint"
MODEL_ARTIFACT = "model/model.keras"
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


class TrackingError(TfloopError):
    """MLflow could not be reached or refused an operation."""


@dataclass(frozen=True)
class TrackingSettings:
    """Where runs are tracked: the MLflow tracking URI, the experiment and (for a new experiment) its
    artifact location (``None``: the tracking server's default)."""

    tracking_uri: str
    experiment: str = "tfloop"
    artifact_root: str | None = None


def metric_name(name: str) -> str:
    """``name`` with characters MLflow rejects in metric names replaced by ``_``."""
    return _METRIC_NAME.sub("_", name)


class RunTracker:
    """One MLflow run, created or resumed; every logging call goes to this run."""

    def __init__(
        self, settings: TrackingSettings, *, run_id: str | None = None, run_name: str | None = None
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.settings = settings
        self.client: MlflowClient = MlflowClient(tracking_uri=settings.tracking_uri)
        try:
            self.experiment_id = self._experiment_id()
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            else:
                run = self.client.create_run(self.experiment_id, run_name=run_name)
                self.run_id = run.info.run_id
        except MlflowException as error:
            raise TrackingError(
                f"MLflow at {settings.tracking_uri} refused to start a run: {error.message}. Check "
                "MLFLOW_TRACKING_URI (or TFLOOP_HOME for the default SQLite store)."
            ) from error

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(
                self.client.create_experiment(
                    self.settings.experiment, artifact_location=self.settings.artifact_root
                )
            )
        except MlflowException:
            experiment = self.client.get_experiment_by_name(self.settings.experiment)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(metric_name(key), float(value), now, step or 0)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_dict(self, data: Mapping[str, Any] | list[Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)  # type: ignore[arg-type]

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_file(self, path: Path, *, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def epoch_callback(self, *, prefix: str, step_offset: int) -> keras.callbacks.Callback:
        """A Keras callback logging every epoch's metrics as ``<prefix>_<name>`` at step offset + epoch."""
        import keras

        tracker = self

        class MlflowEpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
                values = {f"{prefix}_{key}": value for key, value in (logs or {}).items()}
                tracker.log_metrics(values, step=step_offset + epoch)

        return MlflowEpochLogger()
