"""Typed settings for the tfloop CLI and flows: where embedded state lives and which services to use.

Everything defaults to one state folder (``.tfloop/`` in the working directory, ``TFLOOP_HOME`` overrides)
holding MLflow's SQLite store and artifacts, exported models, the feedback queue, datasets and Prefect's
home. Environment variables override single settings for production (an MLflow server, GCS buckets).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TfloopSettings(BaseSettings):
    """Settings read once from the environment and passed to the code that needs them."""

    model_config = SettingsConfigDict(env_prefix="TFLOOP_", extra="ignore")

    home: Path = Field(default=Path(".tfloop"), description="State folder for embedded defaults.")
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "TFLOOP_MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI; default: SQLite in the state folder.",
    )
    model_base: str | None = Field(default=None, description="Export base (local path or gs://).")
    feedback_uri: str | None = Field(default=None, description="Feedback queue root (local path or gs://).")
    data_uri: str | None = Field(default=None, description="Base training dataset (local path or gs://).")
    model_name: str = Field(default="tfloop-classifier", description="Registered/served model name.")
    experiment: str = Field(default="tfloop", description="MLflow experiment name.")

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return str(self.home_dir / "mlartifacts")

    @property
    def models_uri(self) -> str:
        return self.model_base or str(self.home_dir / "models")

    @property
    def feedback_root(self) -> str:
        return self.feedback_uri or str(self.home_dir / "feedback")

    @property
    def dataset_uri(self) -> str:
        return self.data_uri or str(self.home_dir / "data" / "demo")

    @property
    def checkpoints_dir(self) -> Path:
        return self.home_dir / "checkpoints"

    @property
    def prefect_home(self) -> Path:
        return self.home_dir / "prefect"
